"""Flash attention forward and backward as Mosaic TPU Pallas kernels (the "pallas_tpu" impl of ring_attention.py).

Semantics are ring_attention.py's (its module docstring): the visibility rule over positions and documents,
grouped-query heads, a query that sees nothing gets output 0 and lse -inf, and the backward pass takes
`delta = rowsum(do * out) - dlse` so a cotangent on the lse is exact.

Design (the shape of the standard Pallas TPU flash attention):

* Forward: grid (batch, head, query block, key block), the key-block axis "arbitrary" (sequential). The
  running max `m` and normaliser `l` (`[block_q, 1]`) and the unnormalised output (`[block_q, head_dim]`)
  live in VMEM scratch in float32: set at key block 0, written out (out, lse) at the last key block. Only
  one query block and one key/value block are in VMEM at a time, so the sequence length is not bounded by
  VMEM. The key/value BlockSpecs pick the kv head as `lax.div(head, group)`.
* dq: the same grid, dq accumulated in VMEM scratch and recomputing p = exp(s - lse).
* dk / dv: grid (batch, kv head, key block, group heads x query blocks), the last axis arbitrary; dk and
  dv accumulate in VMEM scratch over every query head of the group. This kernel works in the transposed
  frame (scores `[block_k, block_q]` = k q^T) so that every matmul is a plain or rhs-transposed one.
* Skipping: for each (batch row, query block) the range of key blocks that may be visible (and for each
  (batch row, key block) the range of query blocks) is computed in XLA (attention_blocks.py) and passed
  by scalar prefetch into SMEM. Pairs outside the range are skipped with `pl.when`, and the key/value
  (resp. query) index maps clamp the block index into the range, so a skipped block repeats the previous
  block index and is not fetched again.
* Masks: query positions / documents enter as columns `[block_q, 1]`, key ones as rows `[1, block_k]`
  (rows laid out `[num_blocks, 1, block]` so any block length is a legal block shape); both are
  broadcast to the full `[block_q, block_k]` int32 tile before the comparisons, with no in-kernel
  transposes. Matmuls take the inputs' dtype (float32 or bfloat16) and accumulate in float32.
* Block sizes: Mosaic needs the last two dims of every block to be multiples of (8, 128) or the array's
  own. The head dim is always whole, and the position / document rows are laid out so that the block
  length is their whole last dim, so the one constraint left is the sublane dim of the q / k / v blocks:
  each block size is cut to its sequence length and rounded up to a multiple of 8 (the sequences are
  padded to whole blocks with never-visible tokens, attention_blocks.py). Mosaic accepts any multiple of 8
  for float32 and bfloat16 alike; 128 or more fills the MXU and the lanes of the score tile. No index
  arithmetic uses Python `//` or `%` on traced integers (their lowering asks for the chip's generation):
  `lax.div` / `lax.rem` only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from longctx.kernels.attention_blocks import pad_to, padded_ids, round_up, visible_ranges, visible_tile

_NT = (((1,), (1,)), ((), ()))  # x y^T
_NN = (((1,), (0,)), ((), ()))  # x y
_SUBLANES = 8  # a block's second-to-last dim: a multiple of this (or the whole array's)


def block_sizes(block_q: int, block_k: int, q_len: int, k_len: int) -> tuple[int, int]:
  """The (block_q, block_k) the kernels run with: each cut to its sequence and rounded up to a multiple of 8."""
  return round_up(min(block_q, q_len), _SUBLANES), round_up(min(block_k, k_len), _SUBLANES)


def _dot(x, y, dims):
  """float32-accumulated matmul. Low-precision inputs name the DEFAULT precision: their products are exact on the
  MXU anyway, and Mosaic rejects the fp32 contract precision a global `jax_default_matmul_precision="highest"`
  would ask of them. float32 inputs follow that setting."""
  precision = None if x.dtype == jnp.float32 else lax.Precision.DEFAULT
  return lax.dot_general(x, y, dims, precision=precision, preferred_element_type=jnp.float32)


def _clamp(i, row, first, last):
  """Block index `i` clamped into `[first[row], last[row]]` (the first block for an empty range)."""
  lo = first[row]
  return jnp.minimum(jnp.maximum(i, lo), jnp.maximum(last[row], lo))


def _in_range(i, row, first, last):
  return (first[row] <= i) & (i <= last[row])


def _heads_first(x, n):
  """`[b, s, h, d] -> [b, h, n, d]`, padding s to n with zeros."""
  return jnp.swapaxes(pad_to(x, n, 1, 0), 1, 2)


def _as_rows(x, block):
  """`[..., n * block] -> [..., n, 1, block]`: one row per block, a legal block shape for any block length."""
  return x.reshape(*x.shape[:-1], x.shape[-1] // block, 1, block)


def _params(*semantics):
  return pltpu.CompilerParams(dimension_semantics=semantics)


_SEMANTICS = ("parallel", "parallel", "parallel", "arbitrary")


# ----------------------------------------------------------------------------- forward


def _forward_kernel(k_first, k_last, q_ref, k_ref, v_ref, qp_ref, kp_ref, qd_ref, kd_ref, o_ref, lse_ref, m_ref,
                    l_ref, acc_ref, *, num_q_blocks, num_k_blocks, window, scale):
  """One (batch, head, query block, key block) step of the online softmax.

  Refs: q `[bq, d]`, k/v `[bk, d]`, qp/qd `[bq, 1]`, kp/kd `[1, bk]`; out `[bq, d]`, lse `[bq, 1]`;
  scratch m, l `[bq, 1]`, acc `[bq, d]` (float32).
  """
  row = pl.program_id(0) * num_q_blocks + pl.program_id(2)
  j = pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  @pl.when(_in_range(j, row, k_first, k_last))
  def _step():
    v = v_ref[...]
    mask = visible_tile(qp_ref[...], kp_ref[...], qd_ref[...], kd_ref[...], window)
    s = jnp.where(mask, _dot(q_ref[...], k_ref[...], _NT) * scale, -jnp.inf)
    m_prev = m_ref[...]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    m_safe = jnp.where(m_new > -jnp.inf, m_new, 0.0)
    p = jnp.where(mask, jnp.exp(s - m_safe), 0.0)
    corr = jnp.exp(m_prev - m_safe)
    l_ref[...] = l_ref[...] * corr + jnp.sum(p, axis=1, keepdims=True)
    acc_ref[...] = acc_ref[...] * corr + _dot(p.astype(v.dtype), v, _NN)
    m_ref[...] = m_new

  @pl.when(j == num_k_blocks - 1)
  def _finish():
    l = l_ref[...]
    seen = l > 0
    o_ref[...] = acc_ref[...] / jnp.where(seen, l, 1.0)
    lse_ref[...] = jnp.where(seen, m_ref[...] + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)


def forward(q, k, v, q_pos, k_pos, q_doc, k_doc, *, window, scale, block_q, block_k, interpret):
  """Attention of q over k, v under the visibility rule.

  q `[b, sq, h, d]`, k/v `[b, sk, kvh, d]`, q_pos `[sq]`, k_pos `[sk]`, q_doc `[b, sq]`, k_doc `[b, sk]`.
  Returns (out f32 `[b, sq, h, d]`, lse f32 `[b, h, sq]`, -inf where nothing is visible).
  """
  b, sq, h, d = q.shape
  sk, kvh = k.shape[1], k.shape[2]
  g = h // kvh
  bq, bk = block_sizes(block_q, block_k, sq, sk)
  sqp, skp = round_up(sq, bq), round_up(sk, bk)
  nq, nk = sqp // bq, skp // bk
  qp, kp, qd, kd = padded_ids(q_pos, k_pos, q_doc, k_doc, q_len=sqp, k_len=skp)
  k_first, k_last, _, _ = visible_ranges(qp, kp, qd, kd, block_q=bq, block_k=bk, window=window)

  def kv_block(bi, hi, i, j, first, last):
    return bi, lax.div(hi, g), _clamp(j, bi * nq + i, first, last), 0

  def k_rows(bi, hi, i, j, first, last):
    return _clamp(j, bi * nq + i, first, last), 0, 0

  def k_docs(bi, hi, i, j, first, last):
    return bi, _clamp(j, bi * nq + i, first, last), 0, 0

  q_block = pl.BlockSpec((None, None, bq, d), lambda bi, hi, i, j, *_: (bi, hi, i, 0))
  q_rows = pl.BlockSpec((None, None, bq, 1), lambda bi, hi, i, j, *_: (bi, hi, i, 0))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
      grid=(b, h, nq, nk),
      in_specs=[
          q_block,
          pl.BlockSpec((None, None, bk, d), kv_block),
          pl.BlockSpec((None, None, bk, d), kv_block),
          pl.BlockSpec((bq, 1), lambda bi, hi, i, j, *_: (i, 0)),
          pl.BlockSpec((None, 1, bk), k_rows),
          pl.BlockSpec((None, bq, 1), lambda bi, hi, i, j, *_: (bi, i, 0)),
          pl.BlockSpec((None, None, 1, bk), k_docs),
      ],
      out_specs=[q_block, q_rows],
      scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                      pltpu.VMEM((bq, d), jnp.float32)],
  )
  kernel = functools.partial(_forward_kernel, num_q_blocks=nq, num_k_blocks=nk, window=window, scale=scale)
  out, lse = pl.pallas_call(
      kernel,
      grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct((b, h, sqp, d), jnp.float32),
                 jax.ShapeDtypeStruct((b, h, sqp, 1), jnp.float32)],
      compiler_params=_params(*_SEMANTICS),
      interpret=interpret,
      name="flash_attention_forward",
  )(k_first.reshape(-1), k_last.reshape(-1), _heads_first(q, sqp), _heads_first(k, skp), _heads_first(v, skp),
    qp[:, None], _as_rows(kp, bk), qd[..., None], _as_rows(kd, bk))
  return jnp.swapaxes(out, 1, 2)[:, :sq], lse[..., 0][..., :sq]


# ----------------------------------------------------------------------------- backward


def _dq_kernel(k_first, k_last, q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, qp_ref, kp_ref, qd_ref, kd_ref,
               dq_ref, acc_ref, *, num_q_blocks, num_k_blocks, window, scale):
  """dq of one (batch, head, query block), accumulated over key blocks, recomputing p = exp(s - lse).

  Refs: q, do `[bq, d]`, lse, delta, qp, qd `[bq, 1]`, k, v `[bk, d]`, kp, kd `[1, bk]`; dq, acc `[bq, d]`.
  """
  row = pl.program_id(0) * num_q_blocks + pl.program_id(2)
  j = pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  @pl.when(_in_range(j, row, k_first, k_last))
  def _step():
    k = k_ref[...]
    mask = visible_tile(qp_ref[...], kp_ref[...], qd_ref[...], kd_ref[...], window)
    s = _dot(q_ref[...], k, _NT) * scale
    p = jnp.where(mask, jnp.exp(s - lse_ref[...]), 0.0)
    dp = _dot(do_ref[...], v_ref[...], _NT)
    ds = p * (dp - delta_ref[...]) * scale
    acc_ref[...] += _dot(ds.astype(k.dtype), k, _NN)

  @pl.when(j == num_k_blocks - 1)
  def _finish():
    dq_ref[...] = acc_ref[...]


def _dkv_kernel(q_first, q_last, q_ref, do_ref, lse_ref, delta_ref, qp_ref, qd_ref, k_ref, v_ref, kp_ref, kd_ref,
                dk_ref, dv_ref, dk_acc, dv_acc, *, num_q_blocks, num_k_blocks, num_steps, window, scale):
  """dk, dv of one (batch, kv head, key block), accumulated over its group's heads and query blocks.

  Transposed frame: scores `[bk, bq]` = k q^T. Refs: q, do `[bq, d]`, lse, delta, qp, qd `[1, bq]`,
  k, v `[bk, d]`, kp, kd `[bk, 1]`; dk, dv and their accumulators `[bk, d]`.
  """
  col = pl.program_id(0) * num_k_blocks + pl.program_id(2)
  t = pl.program_id(3)

  @pl.when(t == 0)
  def _init():
    dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
    dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

  @pl.when(_in_range(lax.rem(t, num_q_blocks), col, q_first, q_last))
  def _step():
    q, do = q_ref[...], do_ref[...]
    mask = visible_tile(qp_ref[...], kp_ref[...], qd_ref[...], kd_ref[...], window)  # [bk, bq]
    s = _dot(k_ref[...], q, _NT) * scale
    p = jnp.where(mask, jnp.exp(s - lse_ref[...]), 0.0)
    dv_acc[...] += _dot(p.astype(do.dtype), do, _NN)
    dp = _dot(v_ref[...], do, _NT)
    ds = p * (dp - delta_ref[...]) * scale
    dk_acc[...] += _dot(ds.astype(q.dtype), q, _NN)

  @pl.when(t == num_steps - 1)
  def _finish():
    dk_ref[...] = dk_acc[...]
    dv_ref[...] = dv_acc[...]


def backward(q, k, v, q_pos, k_pos, q_doc, k_doc, lse, delta, do, *, window, scale, block_q, block_k, interpret):
  """Gradients of one `forward` pass given its final lse and delta = rowsum(do * out) - dlse (`[b, h, sq]`).

  Shapes as in `forward`, do like q. Returns float32 (dq `[b, sq, h, d]`, dk, dv `[b, sk, kvh, d]`).
  """
  b, sq, h, d = q.shape
  sk, kvh = k.shape[1], k.shape[2]
  g = h // kvh
  bq, bk = block_sizes(block_q, block_k, sq, sk)
  sqp, skp = round_up(sq, bq), round_up(sk, bk)
  nq, nk = sqp // bq, skp // bk
  qp, kp, qd, kd = padded_ids(q_pos, k_pos, q_doc, k_doc, q_len=sqp, k_len=skp)
  k_first, k_last, q_first, q_last = visible_ranges(qp, kp, qd, kd, block_q=bq, block_k=bk, window=window)
  qt, dot = _heads_first(q, sqp), _heads_first(do.astype(q.dtype), sqp)
  kt, vt = _heads_first(k, skp), _heads_first(v, skp)
  lse = pad_to(jnp.where(jnp.isfinite(lse), lse, 0.0), sqp, 2, 0)  # [b, h, sqp]
  delta = pad_to(delta.astype(jnp.float32), sqp, 2, 0)
  common = dict(num_q_blocks=nq, num_k_blocks=nk, window=window, scale=scale)

  def kv_block(bi, hi, i, j, first, last):
    return bi, lax.div(hi, g), _clamp(j, bi * nq + i, first, last), 0

  q_block = pl.BlockSpec((None, None, bq, d), lambda bi, hi, i, j, *_: (bi, hi, i, 0))
  q_rows = pl.BlockSpec((None, None, bq, 1), lambda bi, hi, i, j, *_: (bi, hi, i, 0))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, **common),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(b, h, nq, nk),
          in_specs=[
              q_block, q_block, q_rows, q_rows,
              pl.BlockSpec((None, None, bk, d), kv_block),
              pl.BlockSpec((None, None, bk, d), kv_block),
              pl.BlockSpec((bq, 1), lambda bi, hi, i, j, *_: (i, 0)),
              pl.BlockSpec((None, 1, bk), lambda bi, hi, i, j, f, l: (_clamp(j, bi * nq + i, f, l), 0, 0)),
              pl.BlockSpec((None, bq, 1), lambda bi, hi, i, j, *_: (bi, i, 0)),
              pl.BlockSpec((None, None, 1, bk), lambda bi, hi, i, j, f, l: (bi, _clamp(j, bi * nq + i, f, l), 0, 0)),
          ],
          out_specs=q_block,
          scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
      ),
      out_shape=jax.ShapeDtypeStruct((b, h, sqp, d), jnp.float32),
      compiler_params=_params(*_SEMANTICS),
      interpret=interpret,
      name="flash_attention_dq",
  )(k_first.reshape(-1), k_last.reshape(-1), qt, dot, lse[..., None], delta[..., None], kt, vt, qp[:, None],
    _as_rows(kp, bk), qd[..., None], _as_rows(kd, bk))

  def q_index(bi, kv, j, t, first, last):
    """(head, query block) of step t: the group's heads in turn, each over the clamped query-block range."""
    return kv * g + lax.div(t, nq), _clamp(lax.rem(t, nq), bi * nk + j, first, last)

  def q_block_t(bi, kv, j, t, first, last):
    head, i = q_index(bi, kv, j, t, first, last)
    return bi, head, i, 0

  def q_rows_t(bi, kv, j, t, first, last):
    head, i = q_index(bi, kv, j, t, first, last)
    return bi, head, i, 0, 0

  def q_pos_t(bi, kv, j, t, first, last):
    return q_index(bi, kv, j, t, first, last)[1], 0, 0

  def q_doc_t(bi, kv, j, t, first, last):
    return bi, q_index(bi, kv, j, t, first, last)[1], 0, 0

  k_block = pl.BlockSpec((None, None, bk, d), lambda bi, kv, j, t, *_: (bi, kv, j, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, num_steps=g * nq, **common),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(b, kvh, nk, g * nq),
          in_specs=[
              pl.BlockSpec((None, None, bq, d), q_block_t),
              pl.BlockSpec((None, None, bq, d), q_block_t),
              pl.BlockSpec((None, None, None, 1, bq), q_rows_t),
              pl.BlockSpec((None, None, None, 1, bq), q_rows_t),
              pl.BlockSpec((None, 1, bq), q_pos_t),
              pl.BlockSpec((None, None, 1, bq), q_doc_t),
              k_block, k_block,
              pl.BlockSpec((bk, 1), lambda bi, kv, j, t, *_: (j, 0)),
              pl.BlockSpec((None, bk, 1), lambda bi, kv, j, t, *_: (bi, j, 0)),
          ],
          out_specs=[k_block, k_block],
          scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
      ),
      out_shape=[jax.ShapeDtypeStruct((b, kvh, skp, d), jnp.float32)] * 2,
      compiler_params=_params(*_SEMANTICS),
      interpret=interpret,
      name="flash_attention_dkv",
  )(q_first.reshape(-1), q_last.reshape(-1), qt, dot, _as_rows(lse, bq), _as_rows(delta, bq), _as_rows(qp, bq),
    _as_rows(qd, bq), kt, vt, kp[:, None], kd[..., None])
  back = lambda x, n: jnp.swapaxes(x, 1, 2)[:, :n]
  return back(dq, sq), back(dk, sk), back(dv, sk)


__all__ = ["backward", "block_sizes", "forward"]
