"""What the Pallas attention kernels (flash_attention_tpu.py, flash_attention_gpu.py) share: the tile mask, and
what they prepare in XLA.

The visibility rule is ring_attention.py's: query i sees key j iff

    q_doc[i] == k_doc[j],  k_doc[j] >= 0,  0 <= q_pos[i] - k_pos[j] (<= window if given)

Sequences are padded to whole blocks: padded queries get document -2 and padded keys document -1, so
they are never visible and need no other masking. For every (batch row, query block) the kernels get the
range `[first, last]` of key blocks that may hold a visible key, and for every (batch row, key block) the
range of query blocks that may see one of its keys. A pair of blocks may see each other unless the
min / max of their valid tokens' positions and documents rule it out (`_may_see` in ring_attention.py,
per batch row and over valid tokens only). Blocks outside the range are skipped (and on TPU not even
fetched); a pair inside the range that no query sees (possible only when positions or documents are not
monotone along the sequence) is computed under an all-false mask, which leaves the result unchanged.
A row that sees no block gets the empty range first = 0, last = -1.

Ranges rather than a (query block, key block) table: they cost O(batch * blocks) scalars, which fit the
TPU's scalar memory at any sequence length, where a table grows with the square of the length.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

_BIG = np.iinfo(np.int32).max


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def next_power_of_2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def pad_to(x, n, axis, value):
  """`x` padded with `value` to length `n` along `axis`."""
  pad = n - x.shape[axis]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def padded_ids(q_pos, k_pos, q_doc, k_doc, *, q_len, k_len):
  """int32 positions `[q_len]`, `[k_len]` (padded with 0) and documents `[batch, q_len]`, `[batch, k_len]`
  (padded queries -2, padded keys -1)."""
  i32 = lambda x: x.astype(jnp.int32)
  return (pad_to(i32(q_pos), q_len, 0, 0), pad_to(i32(k_pos), k_len, 0, 0), pad_to(i32(q_doc), q_len, 1, -2),
          pad_to(i32(k_doc), k_len, 1, -1))


def visible_tile(q_pos, k_pos, q_doc, k_doc, window):
  """Inside a kernel: the bool visibility mask of one tile from one column and one row of ids (either
  orientation: query ids `[bq, 1]` with key ids `[1, bk]`, or the transpose), broadcast to the full tile first."""
  shape = jnp.broadcast_shapes(q_pos.shape, k_pos.shape)
  q_pos, k_pos, q_doc, k_doc = (jnp.broadcast_to(x, shape) for x in (q_pos, k_pos, q_doc, k_doc))
  dist = q_pos - k_pos
  mask = (dist >= 0) & (q_doc == k_doc) & (k_doc >= 0)
  if window is not None:
    mask &= dist <= window
  return mask


def _bounds(pos, doc, valid, block):
  """Per (batch row, block) over valid tokens: (any valid, min pos, max pos, min doc, max doc), each `[b, n]`.

  pos `[s]`, doc / valid `[b, s]` with s a multiple of `block`; a block with no valid token gets zeros.
  """
  b, s = doc.shape
  shape = (b, s // block, block)
  pos = jnp.broadcast_to(pos, (b, s)).reshape(shape)
  doc, valid = doc.reshape(shape), valid.reshape(shape)
  lo = lambda x: jnp.min(jnp.where(valid, x, _BIG), axis=-1)
  hi = lambda x: jnp.max(jnp.where(valid, x, -_BIG), axis=-1)
  has = jnp.any(valid, axis=-1)
  clean = lambda x: jnp.where(has, x, 0)
  return has, clean(lo(pos)), clean(hi(pos)), clean(lo(doc)), clean(hi(doc))


def block_may_see(q_pos, k_pos, q_doc, k_doc, *, block_q, block_k, window):
  """`[batch, num_q_blocks, num_k_blocks]` bool: False only where no query of the block sees a key of the block.

  Inputs are padded to whole blocks: q_pos `[sq]`, k_pos `[sk]`, q_doc `[b, sq]`, k_doc `[b, sk]`.
  """
  q_has, q_plo, q_phi, q_dlo, q_dhi = (x[:, :, None] for x in _bounds(q_pos, q_doc, q_doc >= 0, block_q))
  k_has, k_plo, k_phi, k_dlo, k_dhi = (x[:, None, :] for x in _bounds(k_pos, k_doc, k_doc >= 0, block_k))
  may = q_has & k_has & (q_phi >= k_plo) & (q_dhi >= k_dlo) & (q_dlo <= k_dhi)
  if window is not None:
    may &= q_plo - k_phi <= window
  return may


def _range(may):
  """First and last True index along the last axis, int32; (0, -1) where there is none."""
  n = may.shape[-1]
  has = jnp.any(may, axis=-1)
  first = jnp.argmax(may, axis=-1).astype(jnp.int32)
  last = (n - 1 - jnp.argmax(may[..., ::-1], axis=-1)).astype(jnp.int32)
  return jnp.where(has, first, 0), jnp.where(has, last, -1)


def visible_ranges(q_pos, k_pos, q_doc, k_doc, *, block_q, block_k, window):
  """Ranges of blocks that may see each other (module docstring), from padded ids as in `block_may_see`.

  Returns (k_first, k_last) `[b, num_q_blocks]`: key blocks per query block, and (q_first, q_last)
  `[b, num_k_blocks]`: query blocks per key block; int32.
  """
  may = block_may_see(q_pos, k_pos, q_doc, k_doc, block_q=block_q, block_k=block_k, window=window)
  return (*_range(may), *_range(jnp.swapaxes(may, 1, 2)))


__all__ = ["block_may_see", "next_power_of_2", "pad_to", "padded_ids", "round_up", "visible_ranges", "visible_tile"]
