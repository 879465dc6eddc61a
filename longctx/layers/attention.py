"""Attention math as small pure functions.

Shapes: `q [batch, q_len, heads, head_dim]`, `k, v [batch, kv_len, kv_heads, head_dim]`
with `heads` a multiple of `kv_heads` (grouped-query attention). Masks are built
from integer positions and document ids, never materialised at full stream length.

Sliding-window semantics (used by every windowed model): the query at stream
position p sees the keys at positions p - window .. p of the same document.
A Transformer-XL style cache holds the previous `window` keys/values, so the
result does not depend on how a document is cut into segments.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

NEG_INF = -1e30


def rotary(x: jax.Array, positions: jax.Array, *, base: float = 10000.0) -> jax.Array:
  """Rotary position embedding (rotate-half form).

  Args:
    x: `[batch, seq, heads, head_dim]` (head_dim even).
    positions: `[seq]` or `[batch, seq]` integer positions.
  Returns:
    `x` rotated, same shape and dtype.
  """
  half = x.shape[-1] // 2
  inv_freq = 1.0 / (base ** (jnp.arange(half, dtype=jnp.float32) / half))
  pos = positions.astype(jnp.float32)
  angles = pos[..., None] * inv_freq  # [(batch,) seq, half]
  if angles.ndim == 2:
    angles = angles[None]
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def window_mask(q_pos, k_pos, q_doc, k_doc, *, window: int) -> jax.Array:
  """Boolean mask `[batch, q_len, kv_len]`: same document, causal, within `window`.

  Args:
    q_pos: `[q_len]` positions of queries; k_pos: `[kv_len]` positions of keys.
    q_doc: `[batch, q_len]`, k_doc: `[batch, kv_len]` document ids (a key with
      id -1 is never visible).
  """
  dist = q_pos[:, None] - k_pos[None, :]
  in_window = (dist >= 0) & (dist <= window)
  same_doc = (q_doc[:, :, None] == k_doc[:, None, :]) & (k_doc[:, None, :] >= 0)
  return in_window[None] & same_doc


def masked_attention(q, k, v, mask, *, scale: float | None = None) -> jax.Array:
  """Softmax attention with a boolean mask; softmax in float32.

  Args:
    q: `[batch, q_len, heads, head_dim]`; k, v: `[batch, kv_len, kv_heads, head_dim]`.
    mask: `[batch, q_len, kv_len]` bool.
  Returns:
    `[batch, q_len, heads, head_dim]` in q's dtype. Rows with no visible key give 0.
  """
  b, s, h, d = q.shape
  kvh = k.shape[2]
  scale = d ** -0.5 if scale is None else scale
  qg = q.reshape(b, s, kvh, h // kvh, d)
  scores = jnp.einsum("bskgd,btkd->bkgst", qg, k, preferred_element_type=jnp.float32) * scale
  scores = jnp.where(mask[:, None, None], scores, NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1)
  probs = jnp.where(mask[:, None, None], probs, 0.0)  # all-masked rows -> 0, not uniform
  out = jnp.einsum("bkgst,btkd->bskgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.reshape(b, s, h, d).astype(q.dtype)


def sliding_window_attention_reference(q, k, v, *, q_doc, k_doc, window: int) -> jax.Array:
  """Dense reference: queries are the last `q_len` positions of the `kv_len` keys.

  Args:
    q: `[batch, q_len, heads, head_dim]` (already rotated).
    k, v: `[batch, kv_len, kv_heads, head_dim]`, kv_len >= q_len; key i sits at
      position i and query j at position kv_len - q_len + j.
    q_doc: `[batch, q_len]`; k_doc: `[batch, kv_len]` document ids.
  """
  kv_len, q_len = k.shape[1], q.shape[1]
  k_pos = jnp.arange(kv_len)
  q_pos = k_pos[kv_len - q_len:]
  return masked_attention(q, k, v, window_mask(q_pos, k_pos, q_doc, k_doc, window=window))


def sliding_window_attention(q, k, v, *, q_doc, k_doc, window: int, block: int | None = None) -> jax.Array:
  """Sliding-window attention, computed blockwise in O(q_len * 2 * block) memory.

  Same contract as `sliding_window_attention_reference` with kv_len = window + q_len
  (a cache of `window` entries followed by the segment). The segment is cut into
  query blocks of `block` (>= window) tokens; each block attends to the `block`
  keys before it plus itself, which covers its whole window. Falls back to the
  dense form when the segment fits in one block.
  """
  b, s, h, d = q.shape
  kv_len = k.shape[1]
  if kv_len != window + s:
    raise ValueError(f"sliding_window_attention expects kv_len = window + q_len, got {kv_len} != {window} + {s}")
  block = max(window, 1) if block is None else block
  if block < window:
    raise ValueError(f"block={block} must be >= window={window}")
  if s <= block:
    return sliding_window_attention_reference(q, k, v, q_doc=q_doc, k_doc=k_doc, window=window)
  nb = -(-s // block)
  pad = nb * block - s
  # Left-pad keys so that the cache occupies exactly one block, right-pad the segment.
  lead = block - window
  kp = jnp.pad(k, ((0, 0), (lead, pad), (0, 0), (0, 0)))
  vp = jnp.pad(v, ((0, 0), (lead, pad), (0, 0), (0, 0)))
  kdp = jnp.pad(k_doc, ((0, 0), (lead, pad)), constant_values=-1)
  qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
  qdp = jnp.pad(q_doc, ((0, 0), (0, pad)), constant_values=-2)
  # Key blocks i and i+1 serve query block i.
  kb = kp.reshape(b, nb + 1, block, *k.shape[2:])
  vb = vp.reshape(b, nb + 1, block, *v.shape[2:])
  kdb = kdp.reshape(b, nb + 1, block)
  k2 = jnp.concatenate([kb[:, :-1], kb[:, 1:]], axis=2)  # [b, nb, 2*block, kvh, d]
  v2 = jnp.concatenate([vb[:, :-1], vb[:, 1:]], axis=2)
  kd2 = jnp.concatenate([kdb[:, :-1], kdb[:, 1:]], axis=2)  # [b, nb, 2*block]
  qb = qp.reshape(b, nb, block, h, d)
  qdb = qdp.reshape(b, nb, block)
  # Within a block pair, query j sits at position block + j, key i at position i.
  k_pos = jnp.arange(2 * block)
  q_pos = block + jnp.arange(block)
  fold = lambda x: x.reshape(b * nb, *x.shape[2:])
  mask = window_mask(q_pos, k_pos, fold(qdb), fold(kd2), window=window)
  out = masked_attention(fold(qb), fold(k2), fold(v2), mask)
  return out.reshape(b, nb * block, h, d)[:, :s]


ATTENTION_IMPLS = ("pairs", "flash", "pallas")


def cached_window_attention(q, k, v, *, cache_k, cache_v, q_doc, cache_doc, window: int, rope_base: float,
                            impl: str = "flash", block: int | None = None) -> jax.Array:
  """Sliding-window attention of a segment over [cache; segment], rotary positions applied here.

  The cache holds the `window` keys/values before the segment (positions
  0..window-1, the segment at window..window+seg-1); q, k, v are unrotated.
  When the mesh in context has a `sequence` axis of n > 1 devices (and n
  divides seg), the segment is context-parallel: each device keeps seg/n
  queries, the segment's keys/values go round a ring (`ring_attention`, only
  as many steps as the window reaches), the cache (replicated along `sequence`)
  is one more local block, and the two merge by log-sum-exp.

  Args:
    q: `[batch, seg, heads, head_dim]`; k, v: `[batch, seg, kv_heads, head_dim]`.
    cache_k, cache_v: `[batch, window, kv_heads, head_dim]`.
    q_doc: `[batch, seg]` document ids; cache_doc `[batch, window]` (-1: slot not visible).
    impl: single-device path: "pairs" (`sliding_window_attention`, dense over block pairs),
      "flash" (blockwise online softmax) or "pallas" (its Pallas kernels); the ring
      uses "xla" blocks for "pairs".
    block: query/key block size (None: the window for "pairs", 128 for flash and the ring).
  Returns:
    `[batch, seg, heads, head_dim]`.
  """
  from longctx import sharding as shd
  from longctx.kernels import ring_attention as ra

  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention impl={impl!r} is not one of {ATTENTION_IMPLS}")
  w, s = cache_k.shape[1], q.shape[1]
  n = shd.context_parallel_size()
  kernel_impl = "pallas" if impl == "pallas" else "xla"
  fblock = block or 128
  if n == 1 or s % n:
    positions = jnp.arange(w + s)
    q_rot = rotary(q, positions[w:], base=rope_base)
    k_all = rotary(jnp.concatenate([cache_k.astype(k.dtype), k], axis=1), positions, base=rope_base)
    v_all = jnp.concatenate([cache_v.astype(v.dtype), v], axis=1)
    k_doc = jnp.concatenate([cache_doc, q_doc], axis=1)
    if impl == "pairs":
      return sliding_window_attention(q_rot, k_all, v_all, q_doc=q_doc, k_doc=k_doc, window=window, block=block)
    return ra.flash_attention(q_rot, k_all, v_all, q_pos=positions[w:], k_pos=positions, q_doc=q_doc, k_doc=k_doc,
                              window=window, block_q=fblock, block_k=fblock, impl=kernel_impl)

  def shard(q, k, v, cache_k, cache_v, q_doc, cache_doc, pos):
    cache_pos = jnp.arange(w)
    q, k = rotary(q, pos, base=rope_base), rotary(k, pos, base=rope_base)
    cache = (rotary(cache_k.astype(k.dtype), cache_pos, base=rope_base), cache_v.astype(v.dtype), cache_pos, cache_doc)
    out, _ = window_ring_attention(q, k, v, pos=pos, q_doc=q_doc, window=window, cache=cache, block=fblock,
                                   impl=kernel_impl)
    return out.astype(q.dtype)

  # Positions enter as a sharded input rather than from lax.axis_index: XLA:CPU's SPMD partitioner
  # rejected the PartitionId that axis_index lowers to in deep (>= 12 layer) remat'd steps.
  seq, whole = P(None, shd.SEQUENCE_AXIS), P()
  return shd.over_sequence(shard, in_specs=(seq, seq, seq, whole, whole, seq, whole, P(shd.SEQUENCE_AXIS)),
                           out_specs=seq)(q, k, v, cache_k, cache_v, q_doc, cache_doc, w + jnp.arange(s))


# ----------------------------------------------------------------------------- context-parallel pieces
# Called inside `sharding.over_sequence`, where each device of the `sequence` axis holds a contiguous shard
# of a sequence's tokens. Each returns (out `[batch, q_len, heads, head_dim]` float32, lse `[batch, heads,
# q_len]`) so that a model's several key sets (tokens, cache, memory slots, a persistent prefix) merge
# exactly with `ring_attention.merge_attention`.


def window_ring_attention(q, k, v, *, pos, q_doc, window: int | None, cache=None, block: int = 128,
                          impl: str = "xla"):
  """This shard's queries over every shard's tokens (a ring, only the steps `window` reaches) and `cache`.

  Args:
    q: `[batch, local, heads, head_dim]`; k, v: `[batch, local, kv_heads, head_dim]` (rotary applied by the
      caller). pos: `[local]` the visibility rule's global positions; q_doc: `[batch, local]`.
    window: keys at most this many positions back (None: every earlier one).
    cache: None, or `(k, v, k_pos, k_doc)`, a key block every device holds whole (an XL cache, a block's
      buffer): `[batch, n, kv_heads, head_dim]` twice, `[n]`, `[batch, n]`; seen under the same rule.
    block: flash block size; impl: "xla" or "pallas".
  """
  from jax import lax

  from longctx import sharding as shd
  from longctx.kernels import ring_attention as ra

  steps = ra.ring_steps_for_window(window, q.shape[1], lax.axis_size(shd.SEQUENCE_AXIS))
  out = ra.ring_attention(q, k, v, axis_name=shd.SEQUENCE_AXIS, q_pos=pos, k_pos=pos, q_doc=q_doc, k_doc=q_doc,
                          window=window, num_steps=steps, block_q=block, block_k=block, impl=impl, return_lse=True)
  if cache is None:
    return out[0].astype(jnp.float32), out[1]
  ck, cv, c_pos, c_doc = cache
  local = ra.flash_attention(q, ck, cv, q_pos=pos, k_pos=c_pos, q_doc=q_doc, k_doc=c_doc, window=window,
                             block_q=block, block_k=block, impl=impl, return_lse=True)
  return ra.merge_attention(*local, *out)


def merge_over_sequence(out, lse):
  """Merge the partial results of replicated queries over each shard's own keys: every device gets the
  attention over the union (all-gathered, then merged by lse). out `[batch, q_len, heads, head_dim]`,
  lse `[batch, heads, q_len]`."""
  from jax import lax

  from longctx import sharding as shd
  from longctx.kernels import ring_attention as ra

  outs, lses = lax.all_gather((out, lse), shd.SEQUENCE_AXIS)
  merged = (outs[0].astype(jnp.float32), lses[0])
  for i in range(1, outs.shape[0]):
    merged = ra.merge_attention(*merged, outs[i], lses[i])
  return merged
