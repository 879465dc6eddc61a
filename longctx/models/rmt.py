"""Recurrent Memory Transformer (Bulatov et al. 2022, 2023), decoder form, on the baseline's layers.

Each block of `block_len` tokens is read together with `num_memory` memory
tokens placed twice, as in the reference `MemoryCell` (booydar/recurrent-
memory-transformer):

    input  = [read memory (m); block tokens (L); write memory (m)]
    memory after the block = last layer's hidden states at the write slots

Every layer is the baseline's pre-norm block; its attention sees, per query:
  read slot i   read slots <= i
  token         the read slots, plus the sliding window over [XL cache; block]
                of its own document (exactly the baseline's mask)
  write slot i  the read slots, the block tokens of the block's last document,
                and write slots <= i
Memory slots carry no rotary position; tokens are rotated as in the baseline.
The initial memory is a learned `[m, d_model]` parameter (N(0, 1/d_model), the
embedding scale); gradients flow through the memory across all blocks of a
train step (BPTT over K segments; the trainer stops them between steps).

Deviation from the paper (documented option): `memory_norm=True` RMS-normalises
the written memory with a learned scale (initially 1/sqrt(d_model), the initial memory's and the
embeddings' scale), which keeps memory norms bounded over
streams of millions of tokens; `memory_norm=False` feeds raw hidden states
back as in the reference code.

The attention is the one entry (layers/attention.py) with three query groups: the read slots over
the read slots, the tokens over [XL cache; tokens; read slots], the write slots over [read slots; write
slots; tokens of the last document]; so it runs dense, flash or Pallas (`model.kernel`) and, on a mesh
with a `sequence` axis, as a ring over the block's tokens with the memory slots replicated.

Documents (blockwise.py): the memory tokens run through every layer, so a block in which a document
starts after its first token is run twice, from the carried and from the fresh memory, and each token
(and its cache slot) is taken from the run of its own document's memory.

State (besides the shell's pos and history): per layer the XL cache k, v `[batch, window, kv_heads,
head_dim]`; memory `[batch, num_memory, d_model]` float32.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from longctx.errors import ConfigError
from longctx.layers import RMSNorm, param, register_mixer
from longctx.layers.attention import Keys, WindowAttention, attention, roll_cache, rotary
from longctx.layers.context import Context
from longctx.models.base import LM, pick_rows
from longctx.models.blockwise import BlockwiseConfig, BlockwiseLM
from longctx.models.registry import register_model


@dataclasses.dataclass
class RMTConfig(BlockwiseConfig):
  mixer = "memory_attention"
  tiny = {"num_memory": 4}

  name: str = "rmt"
  num_memory: int = 16  # memory tokens m (read and write slots each)
  memory_norm: bool = True  # RMS-normalise the written memory (False = the reference code)

  def validate(self) -> None:
    super().validate()
    if self.num_memory < 1:
      raise ConfigError(f"model.num_memory={self.num_memory} must be >= 1")


@register_mixer("memory_attention")
class MemoryAttention(WindowAttention):
  """The baseline's attention weights over rows [read memory (m); tokens (L); write memory (m)] with an XL cache.

  State: the XL cache of the tokens (k, v), as the baseline's.
  """

  def __call__(self, h, state, ctx: Context):
    """h `[batch, 2m + L, d_model]` (normed); returns the output `[batch, 2m + L, d_model]` and the new cache."""
    cfg = self.cfg
    m, L = cfg.num_memory, ctx.doc.shape[1]
    q, k, v = self.qkv(h)
    rows = lambda t: (t[:, :m], t[:, m:m + L], t[:, m + L:])
    (qr, qt, qw), (kr, kt, kw), (vr, vt, vw) = rows(q), rows(k), rows(v)
    b, slots = h.shape[0], jnp.arange(m)
    zeros = jnp.zeros((b, m), jnp.int32)
    read = Keys(kr, vr)  # position-free, every document: the read slots as the tokens and write slots see them
    run = lambda q, blocks, **kw: attention(q, blocks, kernel=cfg.kernel,
                                            block_size=cfg.attention_block or None, **kw)
    q_pos, window = self.window_keys(kt, vt, state, ctx)  # [XL cache; tokens], rotated, the window rule
    tokens = window[1]
    y = jnp.concatenate([
        run(qr, [Keys(kr, vr, pos=slots, doc=zeros)], q_pos=slots, q_doc=zeros),  # read slots <= i
        run(rotary(qt, q_pos, base=cfg.rope_base), [*window, read], q_pos=q_pos, q_doc=ctx.doc, q_sharded=True),
        # write slots: every read slot, write slots <= i, and the block's tokens of its last document
        run(qw, [read, Keys(kw, vw, pos=slots, doc=zeros),
                 Keys(tokens.k, tokens.v, pos=tokens.pos, doc=tokens.doc, sharded=True,
                      q_pos=jnp.full((m,), cfg.window + L), q_doc=jnp.broadcast_to(ctx.doc[:, -1:], (b, m)))],
            q_pos=slots, q_doc=zeros)], axis=1)
    return self.out(y), self.roll(state, kt, vt)

  @classmethod
  def flops_per_token(cls, cfg: RMTConfig, *, seg_len: int) -> float:
    d, h, hd = cfg.d_model, cfg.num_heads, cfg.resolved_head_dim
    kvh = cfg.num_kv_heads or h
    block, m = cfg.resolved_block_len, cfg.num_memory
    rows = (block + 2 * m) / block  # memory slots are processed like tokens
    return float(2 * d * hd * (2 * h + 2 * kvh) * rows + 2 * 2 * h * hd * (cfg.window + 2 * m) * rows)


@register_model("rmt", config=RMTConfig,
                description="Recurrent Memory Transformer: read/write memory tokens per block, BPTT through memory")
class RMT(BlockwiseLM):
  context_parallel = "ring attention for the block's tokens; memory slots replicated, write reads merged by lse"

  def __init__(self, cfg: RMTConfig, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    self.memory_init = param(rngs, (cfg.num_memory, cfg.d_model), ("memory", "embed"), fan_in=cfg.d_model)
    # The written memory starts at the scale of the initial memory and the embeddings, N(0, 1/d) per
    # element: at scale 1 it was sqrt(d) = 11x the tokens' residual stream at d_model 128, so a block's
    # attention and MLP moved the next write by a small fraction of the memory's own norm.
    self.memory_out_norm = (RMSNorm(cfg.d_model, eps=cfg.norm_eps, init=cfg.d_model ** -0.5) if cfg.memory_norm
                            else None)

  def init_extra_state(self, batch_size: int) -> dict:
    return {"memory": jnp.zeros((batch_size, self.cfg.num_memory, self.cfg.d_model), jnp.float32)}

  def fresh_extra_state(self, batch_size: int) -> dict:
    shape = (batch_size, self.cfg.num_memory, self.cfg.d_model)
    return {"memory": jnp.broadcast_to(self.memory_init[...], shape).astype(jnp.float32)}

  def forward_step(self, x, state, ctx: Context):
    """One block through every layer from the carried memory, and, where a document starts inside the block,
    again from the fresh memory: each token (and its cache slot) from the run of its document's memory."""
    m = self.cfg.num_memory

    def run(memory):
      mem = memory.astype(x.dtype)
      h, new = LM.forward_step(self, jnp.concatenate([mem, x, mem], axis=1), state, ctx)
      written = h[:, -m:]
      if self.memory_out_norm is not None:
        written = self.memory_out_norm(written)
      return h[:, m:-m], new["blocks"], written

    x_old, blocks_old, mem_old = run(state["memory"])
    later = ctx.doc > 0  # tokens of a document that started inside this block

    def from_fresh(_):
      x_new, blocks_new, mem_new = run(self.fresh_extra_state(x.shape[0])["memory"])
      window = blocks_old[0]["k"].shape[1]
      slot = roll_cache(jnp.zeros((x.shape[0], window), bool), later)  # cache slots of those tokens
      pick_slots = lambda a, b: jnp.where(slot.reshape(slot.shape + (1,) * (a.ndim - 2)), a, b.astype(a.dtype))
      return (jnp.where(later[..., None], x_new, x_old), jax.tree.map(pick_slots, blocks_new, blocks_old),
              pick_rows(later[:, -1], mem_new, mem_old))

    x, blocks, memory = jax.lax.cond(jnp.any(later), from_fresh, lambda _: (x_old, blocks_old, mem_old), None)
    return x, {**state, "blocks": blocks, "memory": memory.astype(state["memory"].dtype)}

  @classmethod
  def flops_per_token(cls, cfg: RMTConfig, *, seg_len: int) -> float:
    """The shell's count, the MLP run on the memory rows too."""
    block, m = cfg.resolved_block_len, cfg.num_memory
    extra_mlp = 2 * 3 * cfg.d_model * cfg.resolved_d_ff * (2 * m / block) * cfg.num_layers
    return super().flops_per_token(cfg, seg_len=seg_len) + float(extra_mlp)
