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

Memory (state["memory"]): `[batch, num_memory, d_model]` float32.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jax.sharding import PartitionSpec as P

from longctx import sharding as shd
from longctx.errors import ConfigError
from longctx.kernels import ring_attention as ra
from longctx.layers import (
    RMSNorm, masked_attention, merge_over_sequence, param, rotary, window_mask, window_ring_attention)
from longctx.models.blockwise import BlockwiseConfig, BlockwiseLM, last_doc_mask
from longctx.models.registry import register_model
from longctx.models.transformer import Attention, Block, Embedding


@dataclasses.dataclass
class RMTConfig(BlockwiseConfig):
  name: str = "rmt"
  num_memory: int = 16  # memory tokens m (read and write slots each)
  memory_norm: bool = True  # RMS-normalise the written memory (False = the reference code)

  def validate(self) -> None:
    super().validate()
    if self.num_memory < 1:
      raise ConfigError(f"model.num_memory={self.num_memory} must be >= 1")


def rmt_mask(*, q_doc, k_doc, window: int, num_memory: int) -> jax.Array:
  """Visibility `[batch, 2m + L, W + 2m + L]` of queries [read; tokens; write] over keys [cache; read; tokens; write].

  Args:
    q_doc: `[batch, L]` document ids of the block's tokens; k_doc: `[batch, W + L]`
      ids of [cache; tokens] (-1 = invisible cache slot).
  """
  b, L = q_doc.shape
  W = k_doc.shape[1] - L
  m = num_memory
  causal_m = jnp.broadcast_to(jnp.tril(jnp.ones((m, m), bool)), (b, m, m))
  none = lambda q, k: jnp.zeros((b, q, k), bool)
  all_ = lambda q, k: jnp.ones((b, q, k), bool)
  tok = window_mask(W + jnp.arange(L), jnp.arange(W + L), q_doc, k_doc, window=window)  # [b, L, W + L]
  last = jnp.broadcast_to(last_doc_mask(q_doc)[:, None, :], (b, m, L))
  read_rows = jnp.concatenate([none(m, W), causal_m, none(m, L), none(m, m)], axis=2)
  tok_rows = jnp.concatenate([tok[:, :, :W], all_(L, m), tok[:, :, W:], none(L, m)], axis=2)
  write_rows = jnp.concatenate([none(m, W), all_(m, m), last, causal_m], axis=2)
  return jnp.concatenate([read_rows, tok_rows, write_rows], axis=1)


def rmt_ring_attention(q, k, v, *, cache_k, cache_v, q_doc, cache_doc, window: int, num_memory: int,
                       rope_base: float, block: int = 128) -> jax.Array:
  """`rmt_mask` attention with the block's tokens split over the mesh's `sequence` axis.

  q `[batch, 2m + L, heads, head_dim]`, k, v `[batch, 2m + L, kv_heads, head_dim]` (unrotated,
  rows [read; tokens; write]); cache `[batch, W, kv_heads, head_dim]`; q_doc `[batch, L]`,
  cache_doc `[batch, W]`. Per device, with its L/n tokens:
    tokens  cache block (window rule) + read slots (always visible) + ring over the tokens
    read    read slots <= i (replicated, computed on every device)
    write   read slots + write slots <= i, and the local tokens of the block's last document;
            the per-device partial results are all-gathered and merged by log-sum-exp
  Returns `[batch, 2m + L, heads, head_dim]`.
  """
  m, w = num_memory, cache_k.shape[1]
  L = q.shape[1] - 2 * m
  n = shd.context_parallel_size()
  local = L // n
  rows = lambda t: (t[:, :m], t[:, m:m + L], t[:, m + L:])
  (qr, qt, qw), (kr, kt, kw), (vr, vt, vw) = rows(q), rows(k), rows(v)
  last_doc = q_doc[:, -1:]  # the block's last document, from the last shard's tokens

  def shard(qt, kt, vt, q_doc, pos, qr, kr, vr, qw, kw, vw, cache_k, cache_v, cache_doc, last_doc):
    b = qt.shape[0]
    cache_pos = jnp.arange(w)
    qt, kt = rotary(qt, pos, base=rope_base), rotary(kt, pos, base=rope_base)
    cache = (rotary(cache_k.astype(kt.dtype), cache_pos, base=rope_base), cache_v.astype(vt.dtype), cache_pos,
             cache_doc)
    flash = functools.partial(ra.flash_attention, block_q=block, block_k=block, return_lse=True)
    zeros = lambda t: jnp.zeros((b, t), jnp.int32)
    slot = jnp.arange(m)
    # Token queries: the ring over the tokens and the XL cache, then the read slots (position 0, one
    # document: always visible).
    tokens = ra.merge_attention(
        *window_ring_attention(qt, kt, vt, pos=pos, q_doc=q_doc, window=window, cache=cache, block=block),
        *flash(qt, kr, vr, q_pos=pos, k_pos=jnp.zeros(m, jnp.int32), q_doc=zeros(local), k_doc=zeros(m)))[0]
    # Read queries: read slots <= i.
    read = flash(qr, kr, vr, q_pos=slot, k_pos=slot, q_doc=zeros(m), k_doc=zeros(m))[0]
    # Write queries: all read slots, write slots <= i, and every shard's tokens of the last document.
    write = ra.merge_attention(
        *flash(qw, kr, vr, q_pos=slot, k_pos=jnp.zeros(m, jnp.int32), q_doc=zeros(m), k_doc=zeros(m)),
        *flash(qw, kw, vw, q_pos=slot, k_pos=slot, q_doc=zeros(m), k_doc=zeros(m)))
    write = ra.merge_attention(*write, *merge_over_sequence(*flash(
        qw, kt, vt, q_pos=jnp.full((m,), w + L), k_pos=pos, q_doc=jnp.broadcast_to(last_doc, (b, m)), k_doc=q_doc)))
    return tokens.astype(qt.dtype), read.astype(qt.dtype), write[0].astype(qt.dtype)

  seq, whole = P(None, shd.SEQUENCE_AXIS), P()
  tokens, read, write = shd.over_sequence(
      shard, in_specs=(seq, seq, seq, seq, P(shd.SEQUENCE_AXIS)) + (whole,) * 10, out_specs=(seq, whole, whole))(
          qt, kt, vt, q_doc, w + jnp.arange(L), qr, kr, vr, qw, kw, vw, cache_k, cache_v, cache_doc, last_doc)
  return jnp.concatenate([read, tokens, write], axis=1)


class MemoryAttention(Attention):
  """The baseline's attention weights over [read memory; tokens; write memory] with an XL cache."""

  def __call__(self, x, *, cache_k, cache_v, mask, num_memory, q_doc=None, k_doc=None):
    """x `[batch, 2m + L, d]`; cache `[batch, W, kv_heads, head_dim]`; mask from `rmt_mask`.

    With the mesh's `sequence` axis > 1 (dividing L) and the document ids given, the
    same attention runs as `rmt_ring_attention` (the dense mask is then unused).
    Returns the output `[batch, 2m + L, d]` and the tokens' new unrotated k, v `[batch, L, ...]`.
    """
    m, W = num_memory, cache_k.shape[1]
    L = x.shape[1] - 2 * m
    q = jnp.einsum("bsd,dhk->bshk", x, self.wq[...].astype(x.dtype))
    k = jnp.einsum("bsd,dhk->bshk", x, self.wk[...].astype(x.dtype))
    v = jnp.einsum("bsd,dhk->bshk", x, self.wv[...].astype(x.dtype))
    n = shd.context_parallel_size()
    if n > 1 and L % n == 0 and q_doc is not None:
      out = rmt_ring_attention(q, k, v, cache_k=cache_k, cache_v=cache_v, q_doc=q_doc, cache_doc=k_doc[:, :W],
                               window=self.cfg.window, num_memory=m, rope_base=self.cfg.rope_base,
                               block=self.cfg.attention_block or 128)
      return jnp.einsum("bshk,hkd->bsd", out, self.wo[...].astype(x.dtype)), k[:, m:m + L], v[:, m:m + L]
    pos = jnp.arange(W + L)
    base = self.cfg.rope_base
    rot_tokens = lambda t, p: rotary(t, p, base=base)
    q = jnp.concatenate([q[:, :m], rot_tokens(q[:, m:m + L], pos[W:]), q[:, m + L:]], axis=1)
    k_cache = rot_tokens(cache_k.astype(k.dtype), pos[:W])
    k_all = jnp.concatenate([k_cache, k[:, :m], rot_tokens(k[:, m:m + L], pos[W:]), k[:, m + L:]], axis=1)
    v_all = jnp.concatenate([cache_v.astype(v.dtype), v], axis=1)
    out = masked_attention(q, k_all, v_all, mask)
    return jnp.einsum("bshk,hkd->bsd", out, self.wo[...].astype(x.dtype)), k[:, m:m + L], v[:, m:m + L]


@register_model("rmt", config=RMTConfig,
                description="Recurrent Memory Transformer: read/write memory tokens per block, BPTT through memory")
class RMT(BlockwiseLM):
  context_parallel = "ring attention for the block's tokens; memory slots replicated, write reads merged by lse"

  def __init__(self, cfg: RMTConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embedding = Embedding(cfg, rngs=rngs)
    self.blocks = nnx.List([Block(cfg, rngs=rngs, attention_cls=MemoryAttention) for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    self.memory_init = param(rngs, (cfg.num_memory, cfg.d_model), ("memory", "embed"), fan_in=cfg.d_model)
    # The written memory starts at the scale of the initial memory and the embeddings, N(0, 1/d) per
    # element: at scale 1 it was sqrt(d) = 11x the tokens' residual stream at d_model 128, so a block's
    # attention and MLP moved the next write by a small fraction of the memory's own norm.
    self.memory_out_norm = (RMSNorm(cfg.d_model, eps=cfg.norm_eps, init=cfg.d_model ** -0.5) if cfg.memory_norm
                            else None)

  def init_memory(self, batch_size: int):
    return jnp.zeros((batch_size, self.cfg.num_memory, self.cfg.d_model), jnp.float32)

  def fresh_memory(self, memory):
    return jnp.broadcast_to(self.memory_init[...], memory.shape).astype(memory.dtype)

  def forward_block(self, x, *, memory, caches, q_doc, k_doc):
    m = self.cfg.num_memory
    mem = memory.astype(x.dtype)
    h = jnp.concatenate([mem, x, mem], axis=1)
    mask = rmt_mask(q_doc=q_doc, k_doc=k_doc, window=self.cfg.window, num_memory=m)
    new_kv = []
    for block, (ck, cv) in zip(self.blocks, caches):
      h, k, v = block(h, cache_k=ck, cache_v=cv, mask=mask, num_memory=m, q_doc=q_doc, k_doc=k_doc)
      new_kv.append((k, v))
    written = h[:, -m:]
    if self.memory_out_norm is not None:
      written = self.memory_out_norm(written)
    return h[:, m:-m], new_kv, written

  @classmethod
  def flops_per_token(cls, cfg: RMTConfig, *, seg_len: int) -> float:
    d, h, hd, L = cfg.d_model, cfg.num_heads, cfg.resolved_head_dim, cfg.num_layers
    kvh = cfg.num_kv_heads or h
    block, m = cfg.resolved_block_len, cfg.num_memory
    per_row = 2 * d * hd * (2 * h + 2 * kvh) + 2 * 3 * d * cfg.resolved_d_ff
    rows = (block + 2 * m) / block  # memory slots are processed like tokens
    attn = 2 * 2 * h * hd * (cfg.window + 2 * m) * rows
    return float(L * (per_row * rows + attn) + 2 * d * cfg.vocab_size)


