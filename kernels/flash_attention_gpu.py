"""Flash attention forward and backward as Pallas Triton kernels for NVIDIA GPUs (the "pallas_gpu" impl of
ring_attention.py).

Semantics are ring_attention.py's (its module docstring): the visibility rule over positions and documents,
grouped-query heads, a query that sees nothing gets output 0 and lse -inf, and the backward pass takes
`delta = rowsum(do * out) - dlse` so a cotangent on the lse is exact.

Design (a grid of independent programs, the loops inside, as in Triton's fused-attention tutorial):

* Forward: grid (batch, head, query block). A program loads its query block once, then loops
  (`lax.fori_loop`) over key blocks, loading each key/value block from HBM with `pl.load` and keeping the
  running max, normaliser (`[block_q]`) and unnormalised output (`[block_q, head_dim]`) in registers, in
  float32; it writes out and lse once at the end.
* dq: the same grid and loop, recomputing p = exp(s - lse), dq in registers.
* dk / dv: grid (batch, kv head, key block). A program holds its key/value block and dk, dv in registers
  and loops over the group's query heads, and for each over query blocks, so no two programs write the
  same rows (no atomics).
* Skipping: for each (batch row, query block) the range of key blocks that may be visible (and for each
  (batch row, key block) the range of query blocks) is computed in XLA (attention_blocks.py); the loops
  run over that range only.
* Layout: arrays stay `[batch, seq, heads, head_dim]` (the BlockSpecs index the head, the kv head as
  `lax.div(head, group)`), sequences padded to whole blocks with never-visible tokens.
* Block sizes: Triton tensors need power-of-2 dims and its matmuls dims of at least 16, so each block size
  is cut to its sequence length and rounded up to a power of 2, at least 16. Each is also capped at 128 rows
  for 2-byte dtypes and 64 for float32, so that the tiles, double-buffered by the software pipeline, fit in
  shared memory (227 KiB per block on an H100 / H200: float32 blocks of 128 asked for 258 KiB). The head
  dim is zero-padded to a power of 2, at least 16 (zeros change neither q k^T nor, after slicing, p v).
* Precision: matmuls take the inputs' dtype (float32, bfloat16 or float16) and accumulate in float32.
  float32 inputs follow jax's matmul precision like XLA's own GPU matmuls: TF32 by default, full float32
  under `jax.default_matmul_precision("highest")`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from longctx.kernels.attention_blocks import (next_power_of_2, pad_to, padded_ids, round_up, visible_ranges,
                                              visible_tile)

_NT = (((1,), (1,)), ((), ()))  # x y^T
_NN = (((1,), (0,)), ((), ()))  # x y
_MIN_DIM = 16  # Triton's smallest matmul dim
_MAX_BLOCK_BYTES = 256  # a block's length times the item size: 128 rows of bf16 / f16, 64 of f32


def block_sizes(block_q: int, block_k: int, q_len: int, k_len: int, dtype) -> tuple[int, int]:
  """The (block_q, block_k) the kernels run with (module docstring): each cut to its sequence and to the
  shared-memory cap, then rounded up to a power of 2 of at least 16."""
  cap = _MAX_BLOCK_BYTES // jnp.dtype(dtype).itemsize
  size = lambda block, n: max(_MIN_DIM, next_power_of_2(min(block, n, cap)))
  return size(block_q, q_len), size(block_k, k_len)


def _dot(x, y, dims):
  return lax.dot_general(x, y, dims, preferred_element_type=jnp.float32)


def _params(head_dim):
  return plgpu.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)


def _pad(x, seq_len, head_dim):
  """`[b, s, h, d]` zero-padded to `[b, seq_len, h, head_dim]`."""
  return pad_to(pad_to(x, seq_len, 1, 0), head_dim, 3, 0)


# ----------------------------------------------------------------------------- forward


def _forward_kernel(first_ref, last_ref, q_ref, k_ref, v_ref, qp_ref, kp_ref, qd_ref, kd_ref, o_ref, lse_ref, *,
                    block_k, window, scale):
  """One (batch, head, query block): an online softmax over the visible range of key blocks.

  Refs: first / last scalars, q `[bq, d]`, k/v `[sk, d]`, qp/qd `[bq]`, kp/kd `[sk]`; out `[bq, d]`, lse `[bq]`.
  """
  q = q_ref[...]
  qp, qd = qp_ref[...][:, None], qd_ref[...][:, None]
  bq, d = q.shape

  def body(j, carry):
    acc, m, l = carry
    keys = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
    v = v_ref[keys, :]
    mask = visible_tile(qp, kp_ref[keys][None, :], qd, kd_ref[keys][None, :], window)
    s = jnp.where(mask, _dot(q, k_ref[keys, :], _NT) * scale, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    m_safe = jnp.where(m_new > -jnp.inf, m_new, 0.0)
    p = jnp.where(mask, jnp.exp(s - m_safe[:, None]), 0.0)
    corr = jnp.exp(m - m_safe)
    acc = acc * corr[:, None] + _dot(p.astype(v.dtype), v, _NN)
    return acc, m_new, l * corr + jnp.sum(p, axis=1)

  init = (jnp.zeros((bq, d), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32))
  acc, m, l = lax.fori_loop(first_ref[...], last_ref[...] + 1, body, init)
  seen = l > 0
  o_ref[...] = acc / jnp.where(seen, l, 1.0)[:, None]
  lse_ref[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)


def forward(q, k, v, q_pos, k_pos, q_doc, k_doc, *, window, scale, block_q, block_k, interpret):
  """Attention of q over k, v under the visibility rule.

  q `[b, sq, h, d]`, k/v `[b, sk, kvh, d]`, q_pos `[sq]`, k_pos `[sk]`, q_doc `[b, sq]`, k_doc `[b, sk]`.
  Returns (out f32 `[b, sq, h, d]`, lse f32 `[b, h, sq]`, -inf where nothing is visible).
  """
  b, sq, h, d = q.shape
  sk, kvh = k.shape[1], k.shape[2]
  g = h // kvh
  bq, bk = block_sizes(block_q, block_k, sq, sk, q.dtype)
  sqp, skp, dp = round_up(sq, bq), round_up(sk, bk), max(_MIN_DIM, next_power_of_2(d))
  qp, kp, qd, kd = padded_ids(q_pos, k_pos, q_doc, k_doc, q_len=sqp, k_len=skp)
  k_first, k_last, _, _ = visible_ranges(qp, kp, qd, kd, block_q=bq, block_k=bk, window=window)
  per_block = pl.BlockSpec((None, None), lambda bi, hi, i: (bi, i))
  q_block = pl.BlockSpec((None, bq, None, dp), lambda bi, hi, i: (bi, i, hi, 0))
  kv_all = pl.BlockSpec((None, skp, None, dp), lambda bi, hi, i: (bi, 0, lax.div(hi, g), 0))
  out, lse = pl.pallas_call(
      functools.partial(_forward_kernel, block_k=bk, window=window, scale=scale),
      grid=(b, h, sqp // bq),
      in_specs=[per_block, per_block, q_block, kv_all, kv_all,
                pl.BlockSpec((bq,), lambda bi, hi, i: (i,)),
                pl.BlockSpec((skp,), lambda bi, hi, i: (0,)),
                pl.BlockSpec((None, bq), lambda bi, hi, i: (bi, i)),
                pl.BlockSpec((None, skp), lambda bi, hi, i: (bi, 0))],
      out_specs=[q_block, pl.BlockSpec((None, None, bq), lambda bi, hi, i: (bi, hi, i))],
      out_shape=[jax.ShapeDtypeStruct((b, sqp, h, dp), jnp.float32),
                 jax.ShapeDtypeStruct((b, h, sqp), jnp.float32)],
      compiler_params=_params(dp),
      interpret=interpret,
      name="flash_attention_forward",
  )(k_first, k_last, _pad(q, sqp, dp), _pad(k, skp, dp), _pad(v, skp, dp), qp, kp, qd, kd)
  return out[:, :sq, :, :d], lse[..., :sq]


# ----------------------------------------------------------------------------- backward


def _dq_kernel(first_ref, last_ref, q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, qp_ref, kp_ref, qd_ref, kd_ref,
               dq_ref, *, block_k, window, scale):
  """dq of one (batch, head, query block) over its visible key blocks, recomputing p = exp(s - lse).

  Refs: q, do `[bq, d]`, lse, delta, qp, qd `[bq]`, k, v `[sk, d]`, kp, kd `[sk]`; dq `[bq, d]`.
  """
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
  qp, qd = qp_ref[...][:, None], qd_ref[...][:, None]

  def body(j, dq):
    keys = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
    k = k_ref[keys, :]
    mask = visible_tile(qp, kp_ref[keys][None, :], qd, kd_ref[keys][None, :], window)
    p = jnp.where(mask, jnp.exp(_dot(q, k, _NT) * scale - lse), 0.0)
    ds = p * (_dot(do, v_ref[keys, :], _NT) - delta) * scale
    return dq + _dot(ds.astype(k.dtype), k, _NN)

  dq_ref[...] = lax.fori_loop(first_ref[...], last_ref[...] + 1, body, jnp.zeros(q.shape, jnp.float32))


def _dkv_kernel(first_ref, last_ref, q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, qp_ref, kp_ref, qd_ref, kd_ref,
                dk_ref, dv_ref, *, block_q, group, window, scale):
  """dk, dv of one (batch, kv head, key block) over the group's heads and the visible query blocks.

  Refs: q, do `[sq, g, d]`, lse, delta `[g, sq]`, qp, qd `[sq]`, k, v `[bk, d]`, kp, kd `[bk]`; dk, dv `[bk, d]`.
  """
  k, v = k_ref[...], v_ref[...]
  kp, kd = kp_ref[...][None, :], kd_ref[...][None, :]
  first, last = first_ref[...], last_ref[...]

  def one_head(head, carry):
    def body(i, carry):
      dk, dv = carry
      rows = pl.ds(pl.multiple_of(i * block_q, block_q), block_q)
      q, do = q_ref[rows, head, :], do_ref[rows, head, :]
      mask = visible_tile(qp_ref[rows][:, None], kp, qd_ref[rows][:, None], kd, window)
      p = jnp.where(mask, jnp.exp(_dot(q, k, _NT) * scale - lse_ref[head, rows][:, None]), 0.0)  # [bq, bk]
      ds = p * (_dot(do, v, _NT) - delta_ref[head, rows][:, None]) * scale
      tn = (((0,), (0,)), ((), ()))  # x^T y
      return dk + _dot(ds.astype(q.dtype), q, tn), dv + _dot(p.astype(do.dtype), do, tn)

    return lax.fori_loop(first, last + 1, body, carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, group, one_head, (zeros, zeros))
  dk_ref[...] = dk
  dv_ref[...] = dv


def backward(q, k, v, q_pos, k_pos, q_doc, k_doc, lse, delta, do, *, window, scale, block_q, block_k, interpret):
  """Gradients of one `forward` pass given its final lse and delta = rowsum(do * out) - dlse (`[b, h, sq]`).

  Shapes as in `forward`, do like q. Returns float32 (dq `[b, sq, h, d]`, dk, dv `[b, sk, kvh, d]`).
  """
  b, sq, h, d = q.shape
  sk, kvh = k.shape[1], k.shape[2]
  g = h // kvh
  bq, bk = block_sizes(block_q, block_k, sq, sk, q.dtype)
  sqp, skp, dp = round_up(sq, bq), round_up(sk, bk), max(_MIN_DIM, next_power_of_2(d))
  qp, kp, qd, kd = padded_ids(q_pos, k_pos, q_doc, k_doc, q_len=sqp, k_len=skp)
  k_first, k_last, q_first, q_last = visible_ranges(qp, kp, qd, kd, block_q=bq, block_k=bk, window=window)
  qx, dox = _pad(q, sqp, dp), _pad(do.astype(q.dtype), sqp, dp)
  kx, vx = _pad(k, skp, dp), _pad(v, skp, dp)
  lse = pad_to(jnp.where(jnp.isfinite(lse), lse, 0.0), sqp, 2, 0)
  delta = pad_to(delta.astype(jnp.float32), sqp, 2, 0)
  common = dict(window=window, scale=scale)

  per_block = pl.BlockSpec((None, None), lambda bi, hi, i: (bi, i))
  q_block = pl.BlockSpec((None, bq, None, dp), lambda bi, hi, i: (bi, i, hi, 0))
  q_rows = pl.BlockSpec((None, None, bq), lambda bi, hi, i: (bi, hi, i))
  kv_all = pl.BlockSpec((None, skp, None, dp), lambda bi, hi, i: (bi, 0, lax.div(hi, g), 0))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, block_k=bk, **common),
      grid=(b, h, sqp // bq),
      in_specs=[per_block, per_block, q_block, q_block, q_rows, q_rows, kv_all, kv_all,
                pl.BlockSpec((bq,), lambda bi, hi, i: (i,)),
                pl.BlockSpec((skp,), lambda bi, hi, i: (0,)),
                pl.BlockSpec((None, bq), lambda bi, hi, i: (bi, i)),
                pl.BlockSpec((None, skp), lambda bi, hi, i: (bi, 0))],
      out_specs=q_block,
      out_shape=jax.ShapeDtypeStruct((b, sqp, h, dp), jnp.float32),
      compiler_params=_params(dp),
      interpret=interpret,
      name="flash_attention_dq",
  )(k_first, k_last, qx, dox, lse, delta, kx, vx, qp, kp, qd, kd)

  k_block = pl.BlockSpec((None, bk, None, dp), lambda bi, kv, j: (bi, j, kv, 0))
  q_group = pl.BlockSpec((None, sqp, g, dp), lambda bi, kv, j: (bi, 0, kv, 0))
  rows_group = pl.BlockSpec((None, g, sqp), lambda bi, kv, j: (bi, kv, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, block_q=bq, group=g, **common),
      grid=(b, kvh, skp // bk),
      in_specs=[pl.BlockSpec((None, None), lambda bi, kv, j: (bi, j)),
                pl.BlockSpec((None, None), lambda bi, kv, j: (bi, j)),
                q_group, q_group, rows_group, rows_group, k_block, k_block,
                pl.BlockSpec((sqp,), lambda bi, kv, j: (0,)),
                pl.BlockSpec((bk,), lambda bi, kv, j: (j,)),
                pl.BlockSpec((None, sqp), lambda bi, kv, j: (bi, 0)),
                pl.BlockSpec((None, bk), lambda bi, kv, j: (bi, j))],
      out_specs=[k_block, k_block],
      out_shape=[jax.ShapeDtypeStruct((b, skp, kvh, dp), jnp.float32)] * 2,
      compiler_params=_params(dp),
      interpret=interpret,
      name="flash_attention_dkv",
  )(q_first, q_last, qx, dox, lse, delta, kx, vx, qp, kp, qd, kd)
  return dq[:, :sq, :, :d], dk[:, :sk, :, :d], dv[:, :sk, :, :d]


__all__ = ["backward", "block_sizes", "forward"]
