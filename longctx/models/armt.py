"""ARMT, the Associative Recurrent Memory Transformer (Rodkin, Kuratov, Bulatov & Burtsev 2024): RMT's memory
tokens plus an associative memory per layer, written by the delta rule.

Each block of `block_len` tokens is read with `num_memory` write tokens appended (the same learned
embeddings every block, as the reference `AssociativeMemoryCell`): rows `[tokens (L); write slots (m)]`.
Every layer is the baseline's pre-norm block wrapped by its associative memory, per head of
`memory_heads` (A `[dk, d_model / heads]`, z `[dk]`, dk = 6 memory_dim / heads):

    read, before the layer, every row:   h += (phi(h W_q) A) / (phi(h W_q) . z + 1e-5)
    the layer:                           h = Block(h)       (attention + MLP)
    write, after it, from the write slots' outputs s_j (j = 1..m, all at once):
        k_j = phi(s_j W_k),  v_j = s_j W_v,  beta_j = sigmoid(s_j W_b + b_b)
        v~_j = (k_j A) / (k_j . z + 1e-5)                   what A holds for k_j
        A += sum_j beta_j k_j^T (v_j - v~_j)                the delta rule
        z += sum_j clip(1 - k_j . z - 1e-5, 0, 1) k_j       the normaliser, counting only new directions
  phi(x) = DPFP (nu = 3): [relu(x), relu(-x)] times its rolls by 1..3, then L2-normalised.

W_v starts at zero (`value_init`), so an untrained memory adds nothing. The tokens attend as the baseline does (window
over [XL cache; block], rotary); the write slots are position-free and see the block's tokens of its last
document and the write slots <= their own. Information crosses blocks only through A and z (and the XL
cache): the write slots are not carried, unlike RMT's memory.

Documents (blockwise.py): a token of a document that starts inside the block reads an empty memory (its
read is 0), and the block writes into the memory of its last document (the carried one, or an empty one
if that document started inside the block); nothing is run twice. Deviations from the reference code:
the first write of a document counts the normaliser at 1 - 1e-5 instead of 1 (an empty memory is not a
special case), the write slots are position-free instead of continuing the positions, and the window
over the XL cache is the baseline's.

State (besides the shell's pos and history), per layer: the XL cache k, v `[batch, window, kv_heads,
head_dim]`; A `[batch, memory_heads, dk, d_model / memory_heads]`, z `[batch, memory_heads, dk]` float32.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from longctx.errors import ConfigError
from longctx.layers import Block, dense, param, register_mixer
from longctx.layers.attention import Keys, WindowAttention, attention
from longctx.layers.context import Context
from longctx.models.blockwise import BlockwiseConfig, BlockwiseLM
from longctx.models.registry import register_model

DPFP_NU = 3
EPS = 1e-5


@dataclasses.dataclass
class ARMTConfig(BlockwiseConfig):
  mixer = "armt_attention"
  tiny = {"num_memory": 4, "memory_dim": 32, "value_init": 0.5}  # the contract needs a memory that holds something

  name: str = "armt"
  num_memory: int = 16  # write tokens m appended to every block
  # Width of the memory's query/key projections (before DPFP's 6x expansion). Narrow ones make near-zero DPFP
  # features whose normalisation amplifies rounding: at 8 the tiny model's gradients differed 3e-5 between
  # 8 devices and 1 (float32), at 32 1e-6.
  memory_dim: int = 64
  memory_heads: int = 1  # heads of the associative memory (d_model and memory_dim split over them)
  correction: bool = True  # z counts only the part of a key the memory does not hold yet (the paper's gamma)
  value_init: float = 0.0  # W_v drawn at this x 1/d_model variance; 0 (the reference): an untrained memory adds nothing

  def validate(self) -> None:
    super().validate()
    for key in ("num_memory", "memory_dim", "memory_heads"):
      if getattr(self, key) < 1:
        raise ConfigError(f"model.{key}={getattr(self, key)} must be >= 1")
    if self.value_init < 0:
      raise ConfigError(f"model.value_init={self.value_init} must be >= 0 (0 = W_v starts at zero)")
    if self.memory_dim % self.memory_heads or self.d_model % self.memory_heads:
      raise ConfigError(f"model.memory_dim={self.memory_dim} and d_model={self.d_model} must be divisible by "
                        f"model.memory_heads={self.memory_heads}")

  @property
  def memory_key_dim(self) -> int:
    """dk per memory head (DPFP expands each projected channel 2 nu = 6 times)."""
    return 2 * DPFP_NU * self.memory_dim // self.memory_heads


# ----------------------------------------------------------------------------- the math


def dpfp(x: jax.Array, nu: int = DPFP_NU) -> jax.Array:
  """Deterministic parameter-free projection (Schlag et al. 2021): `[..., n] -> [..., 2 nu n]`, >= 0, then
  L2-normalised."""
  x = jnp.concatenate([jax.nn.relu(x), jax.nn.relu(-x)], axis=-1)
  rolled = jnp.concatenate([jnp.roll(x, j, axis=-1) for j in range(1, nu + 1)], axis=-1)
  y = jnp.concatenate([x] * nu, axis=-1) * rolled
  return y / jnp.maximum(jnp.linalg.norm(y, axis=-1, keepdims=True), 1e-12)


def memory_read(phi_q: jax.Array, a: jax.Array, z: jax.Array) -> jax.Array:
  """`phi_q [batch, n, H, dk]`, A `[batch, H, dk, dv]`, z `[batch, H, dk]` -> `[batch, n, H, dv]`."""
  num = jnp.einsum("bnhk,bhkv->bnhv", phi_q, a)
  return num / (jnp.einsum("bnhk,bhk->bnh", phi_q, z)[..., None] + EPS)


def memory_write(a, z, phi_k, v, beta, *, correction: bool):
  """One block's write of m slots: `phi_k [batch, m, H, dk]`, `v [batch, m, H, dv]`, `beta [batch, m, H]`."""
  held = memory_read(phi_k, a, z)
  a = a + jnp.einsum("bmhk,bmhv->bhkv", phi_k, beta[..., None] * (v - held))
  if correction:
    denom = jnp.einsum("bmhk,bhk->bmh", phi_k, z) + EPS
    coef = jax.lax.stop_gradient(jnp.clip(1.0 - denom / jnp.sum(phi_k * phi_k, axis=-1), 0.0, 1.0))
  else:
    coef = jnp.ones(phi_k.shape[:-1], phi_k.dtype)
  return a, z + jnp.einsum("bmh,bmhk->bhk", coef, phi_k)


# ----------------------------------------------------------------------------- layers


class AssociativeBlock(Block):
  """The baseline's block wrapped by its associative memory (module docstring): read, the block, write."""

  def __init__(self, cfg: ARMTConfig, mixer, *, rngs: nnx.Rngs):
    super().__init__(cfg, mixer, rngs=rngs)
    d, hm, dm = cfg.d_model, cfg.memory_heads, cfg.memory_dim // cfg.memory_heads
    self.cfg = cfg
    self.wq = param(rngs, (d, hm, dm), ("embed", None, None), fan_in=d)
    self.wk = param(rngs, (d, hm, dm), ("embed", None, None), fan_in=d)
    self.wv = (param(rngs, (d, hm, d // hm), ("embed", None, None), fan_in=d, scale=cfg.value_init) if cfg.value_init
               else nnx.Param(jnp.zeros((d, hm, d // hm), jnp.float32), logical_axes=("embed", None, None)))
    self.wb = param(rngs, (d, hm), ("embed", None), fan_in=d)
    self.bb = nnx.Param(jnp.zeros((hm,), jnp.float32), logical_axes=(None,))

  def init_state(self, batch_size: int) -> dict:
    cfg = self.cfg
    hm, dk = cfg.memory_heads, cfg.memory_key_dim
    return {**self.mixer.init_state(batch_size),
            "A": jnp.zeros((batch_size, hm, dk, cfg.d_model // hm), jnp.float32),
            "z": jnp.zeros((batch_size, hm, dk), jnp.float32)}

  def fresh_state(self, batch_size: int) -> dict:
    return self.init_state(batch_size)

  def __call__(self, x, state, ctx: Context):
    cfg = self.cfg
    b, L = ctx.doc.shape
    a, z = state["A"], state["z"]
    # Rows that read an empty memory: tokens of a document that started inside the block; the write slots if
    # the block's last document did.
    fresh = jnp.concatenate([ctx.doc > 0, jnp.broadcast_to(ctx.doc[:, -1:] > 0, (b, cfg.num_memory))], axis=1)
    read = memory_read(dpfp(dense(x, self.wq[...]).astype(jnp.float32)), a, z)
    read = jnp.where(fresh[:, :, None, None], 0.0, read).reshape(x.shape)
    x, mixer_state = super().__call__(x + read.astype(x.dtype), {k: state[k] for k in state if k not in ("A", "z")},
                                      ctx)
    slots = x[:, L:]
    last_fresh = (ctx.doc[:, -1] > 0)[:, None, None]
    a = jnp.where(last_fresh[..., None], 0.0, a)
    z = jnp.where(last_fresh, 0.0, z)
    beta = jax.nn.sigmoid(dense(slots, self.wb[...]).astype(jnp.float32) + self.bb[...])
    a, z = memory_write(a, z, dpfp(dense(slots, self.wk[...]).astype(jnp.float32)),
                        dense(slots, self.wv[...]).astype(jnp.float32), beta, correction=cfg.correction)
    return x, {**mixer_state, "A": a, "z": z}


@register_mixer("armt_attention")
class ARMTAttention(WindowAttention):
  """The baseline's attention over rows [tokens (L); write slots (m)]: the tokens as the baseline, the write slots
  over the block's tokens of its last document and the write slots <= their own (position-free).

  State: the XL cache k, v of the tokens (its block, `AssociativeBlock`, adds the memory's A and z).
  """

  block_class = AssociativeBlock

  def __call__(self, h, state, ctx: Context):
    cfg = self.cfg
    m, L = cfg.num_memory, ctx.doc.shape[1]
    q, k, v = self.qkv(h)
    qt, kt, vt, qw, kw, vw = q[:, :L], k[:, :L], v[:, :L], q[:, L:], k[:, L:], v[:, L:]
    b, slots = h.shape[0], jnp.arange(m)
    run = lambda q, blocks, **kw: attention(q, blocks, kernel=cfg.kernel, block_size=cfg.attention_block or None,
                                            **kw)
    q_pos, window = self.window_keys(kt, vt, state, ctx)
    tokens = window[1]
    y = jnp.concatenate([
        run(self.rotate(qt, q_pos), window, q_pos=q_pos, q_doc=ctx.doc, q_sharded=True),
        run(qw, [Keys(kw, vw, pos=slots, doc=jnp.zeros((b, m), jnp.int32)),
                 Keys(tokens.k, tokens.v, pos=tokens.pos, doc=tokens.doc, sharded=True,
                      q_pos=jnp.full((m,), cfg.window + L), q_doc=jnp.broadcast_to(ctx.doc[:, -1:], (b, m)))],
            q_pos=slots, q_doc=jnp.zeros((b, m), jnp.int32))], axis=1)
    return self.out(y), self.roll(state, kt, vt)

  @classmethod
  def flops_per_token(cls, cfg: ARMTConfig, *, seg_len: int) -> float:
    d, h, hd = cfg.d_model, cfg.num_heads, cfg.resolved_head_dim
    kvh = cfg.num_kv_heads or h
    block, m = cfg.resolved_block_len, cfg.num_memory
    rows = (block + m) / block  # the write slots are processed like tokens, their MLP included
    keys = cfg.memory_key_dim * cfg.memory_heads  # 6 x memory_dim
    read = 2 * d * cfg.memory_dim + 2 * keys * d / cfg.memory_heads  # q projection, phi(q) A per head
    write = (2 * d * (cfg.memory_dim + d + cfg.memory_heads) + 4 * keys * d / cfg.memory_heads) * m / block
    attend = 2 * d * hd * (2 * h + 2 * kvh) + 2 * 2 * h * hd * (cfg.window + m)
    return float((attend + read) * rows + write + 2 * 3 * d * cfg.resolved_d_ff * m / block)




# ----------------------------------------------------------------------------- the model


@register_model("armt", config=ARMTConfig,
                description="ARMT: RMT's write tokens + a delta-rule associative memory per layer (BABILong leader)")
class ARMT(BlockwiseLM):
  context_parallel = "ring attention for the block's tokens; write slots replicated; memory reads per token"

  def __init__(self, cfg: ARMTConfig, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    self.memory_tokens = param(rngs, (cfg.num_memory, cfg.d_model), ("memory", "embed"), fan_in=cfg.d_model)

  def forward_step(self, x, state, ctx: Context):
    """One block with the write tokens appended; returns the tokens' hidden states."""
    b, L = ctx.doc.shape
    mem = jnp.broadcast_to(self.memory_tokens[...].astype(x.dtype), (b, self.cfg.num_memory, x.shape[-1]))
    h, new = super().forward_step(jnp.concatenate([x, mem], axis=1), state, ctx)
    return h[:, :L], new

  @classmethod
  def activation_bytes_per_token(cls, cfg: ARMTConfig, *, dtype_bytes: int) -> float:
    rows = (cfg.resolved_block_len + cfg.num_memory) / cfg.resolved_block_len
    return super().activation_bytes_per_token(cfg, dtype_bytes=dtype_bytes) * rows + float(
        cfg.num_layers * (2 * cfg.memory_key_dim * cfg.memory_heads + cfg.d_model) * 4 * rows)
