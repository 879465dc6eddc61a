"""The chunked linear recurrence as Pallas Triton kernels for NVIDIA GPUs: forward, and backward in reverse.

Design: one program per (batch row, head), grid (b, h). A program walks its chunks in a `fori_loop` with
the state `[dk, dv]` f32 in registers as the loop carry; each iteration loads one chunk (`ref[pl.ds(..)]`),
runs `chunk_forward` of kernels/linear_recurrence_chunk.py and stores the chunk's outputs. For training the
forward also stores the state entering every chunk; the backward program walks the chunks last to first
with the state's gradient as the carry and recomputes each chunk from its saved entering state.

Triton's rules: every array a program holds has a power-of-two size and matmul dims are >= 16. The wrapper
pads the key and value dims up to a power of two >= 16 (zero channels change nothing: a zero key channel
adds nothing to q k^T or to the state, a zero value column is a zero output column) and needs a chunk
length that is a power of two >= 16.

Takes and returns the layouts of kernels/linear_recurrence_tpu.py (module docstring there), so the caller
in kernels/linear_recurrence.py is the same for both; the rows are re-viewed here as one long row per
(batch, head) (`[.., 1, T]`, a free reshape).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from longctx.kernels.linear_recurrence_chunk import chunk_backward, chunk_forward

F32 = jnp.float32


def _pow2(n: int) -> int:
  return max(16, 1 << (n - 1).bit_length())


def _pad_last(x, size, axis=-1):
  if x is None or x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths)


def check_chunk_size(chunk_size: int) -> None:
  if chunk_size < 16 or chunk_size & (chunk_size - 1):
    raise ValueError(f"chunk_size={chunk_size}: the GPU kernel needs a power of two >= 16 (Triton's tiles)")


def _whole(shape_tail):
  """BlockSpec handing each (b, h) program its whole `[.., *shape_tail]` slab."""
  return pl.BlockSpec((None, None) + tuple(shape_tail), lambda i, j: (i, j) + (0,) * len(shape_tail))


def _per_row(shape_tail):
  """BlockSpec for arrays without a head axis (documents): the batch row's slab."""
  return pl.BlockSpec((None,) + tuple(shape_tail), lambda i, j: (i,) + (0,) * len(shape_tail))


def _prepare(q, k, v, cum, cum_row, doc, doc_row, prev, carry, beta, chunk_size):
  """Pad head dims, re-view rows; returns (inputs, specs, dims) shared by both kernels."""
  b, h, t, dk0 = q.shape
  dv0 = v.shape[-1]
  dk, dv = _pow2(dk0), _pow2(dv0)
  n = t // chunk_size
  vector = cum_row is None
  width = dk if vector else 1
  inputs = [_pad_last(q, dk), _pad_last(k, dk), _pad_last(v, dv), _pad_last(cum, width)]
  specs = [_whole((t, dk)), _whole((t, dk)), _whole((t, dv)), _whole((t, width))]
  if not vector:
    inputs.append(cum_row.reshape(b, h, 1, t))
    specs.append(_whole((1, t)))
  carry = _pad_last(carry, width, axis=-2).reshape(b, h, n * width, 1)
  inputs += [doc, doc_row.reshape(b, 1, t), prev.reshape(b, n, 1), carry]
  specs += [_per_row((t, 1)), _per_row((1, t)), _per_row((n, 1)), _whole((n * width, 1))]
  if beta is not None:
    inputs.append(beta)
    specs.append(_whole((t, 1)))
  return inputs, specs, (dk0, dv0, dk, dv, n, width)


def _load_chunk(refs, ch, c, width, *, vector, has_beta):
  """The chunk `ch`'s arrays (chunk_forward's argument order) from the program's refs; returns (arrays, rest)."""
  refs = list(refs)
  rows = pl.ds(ch * c, c)
  q, k, v, cum = (r[rows, :] for r in refs[:4])
  del refs[:4]
  cum_row = None if vector else refs.pop(0)[:, rows]
  doc_ref, doc_row_ref, prev_ref, carry_ref = refs[:4]
  del refs[:4]
  doc, doc_row, prev = doc_ref[rows, :], doc_row_ref[:, rows], prev_ref[pl.ds(ch, 1), :]
  carry = carry_ref[pl.ds(ch * width, width), :]
  beta = refs.pop(0)[rows, :] if has_beta else None
  return (q, k, v, cum, cum_row, doc, doc_row, prev, carry, beta), refs


def _forward_kernel(*refs, c, n, width, dk, vector, has_beta, save_states):
  num_tail = 4 if save_states else 3  # s0 (the last input), then the outputs
  head, (s0_ref, o_ref, s_out_ref, *saved) = refs[:-num_tail], refs[-num_tail:]
  states_ref = saved[0] if save_states else None

  def chunk(ch, s):
    (q, k, v, cum, cum_row, doc, doc_row, prev, carry, beta), _ = _load_chunk(head, ch, c, width, vector=vector,
                                                                               has_beta=has_beta)
    if save_states:
      states_ref[pl.ds(ch * dk, dk), :] = s
    out, s_new = chunk_forward(q, k, v, s, cum, cum_row, doc, doc_row, prev, carry, beta)
    o_ref[pl.ds(ch * c, c), :] = out.astype(o_ref.dtype)
    return s_new

  s_out_ref[...] = jax.lax.fori_loop(0, n, chunk, s0_ref[...])


def forward(q, k, v, cum, cum_row, doc, doc_row, prev, carry, beta, s0, *, chunk_size, save_states, interpret):
  """Same contract as kernels/linear_recurrence_tpu.forward."""
  check_chunk_size(chunk_size)
  b, h, t = q.shape[:3]
  inputs, specs, (dk0, dv0, dk, dv, n, width) = _prepare(q, k, v, cum, cum_row, doc, doc_row, prev, carry, beta,
                                                         chunk_size)
  vector, has_beta = cum_row is None, beta is not None
  s0 = _pad_last(_pad_last(s0, dv), dk, axis=-2)
  out_specs = [_whole((t, dv)), _whole((dk, dv))]
  out_shape = [jax.ShapeDtypeStruct((b, h, t, dv), v.dtype), jax.ShapeDtypeStruct((b, h, dk, dv), F32)]
  if save_states:
    out_specs.append(_whole((n * dk, dv)))
    out_shape.append(jax.ShapeDtypeStruct((b, h, n * dk, dv), F32))
  outs = pl.pallas_call(
      functools.partial(_forward_kernel, c=chunk_size, n=n, width=width, dk=dk, vector=vector, has_beta=has_beta,
                        save_states=save_states),
      grid=(b, h),
      in_specs=specs + [_whole((dk, dv))],
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
      interpret=interpret,
      name="linear_recurrence_forward",
  )(*inputs, s0)
  out, s = outs[0][..., :dv0], outs[1][:, :, :dk0, :dv0]
  states = outs[2].reshape(b, h, n, dk, dv)[..., :dk0, :dv0] if save_states else None
  return out, s, states


def _backward_kernel(*refs, c, n, width, dk, vector, has_beta):
  num_out = 7 if has_beta else 6
  head, (states_ref, do_ref, ds_final_ref) = refs[:-(num_out + 3)], refs[-(num_out + 3):-num_out]
  outs = refs[-num_out:]
  dq_ref, dk_ref, dv_ref, dcum_ref, dcarry_ref = outs[:5]
  dbeta_ref = outs[5] if has_beta else None
  ds0_ref = outs[-1]

  def chunk(i, ds_next):
    ch = n - 1 - i
    (q, k, v, cum, cum_row, doc, doc_row, prev, carry, beta), _ = _load_chunk(head, ch, c, width, vector=vector,
                                                                               has_beta=has_beta)
    rows = pl.ds(ch * c, c)
    s = states_ref[pl.ds(ch * dk, dk), :]
    dq, dk_, dv_, dcum, dcarry, dbeta, ds = chunk_backward(q, k, v, s, cum, cum_row, doc, doc_row, prev, carry,
                                                           beta, do_ref[rows, :], ds_next)
    dq_ref[rows, :] = dq
    dk_ref[rows, :] = dk_
    dv_ref[rows, :] = dv_
    dcum_ref[rows, :] = dcum
    dcarry_ref[pl.ds(ch * width, width), :] = dcarry
    if has_beta:
      dbeta_ref[rows, :] = dbeta
    return ds

  ds0_ref[...] = jax.lax.fori_loop(0, n, chunk, ds_final_ref[...])


def backward(q, k, v, cum, cum_row, doc, doc_row, prev, carry, beta, states, do, ds_final, *, chunk_size, interpret):
  """Same contract as kernels/linear_recurrence_tpu.backward."""
  check_chunk_size(chunk_size)
  b, h, t = q.shape[:3]
  inputs, specs, (dk0, dv0, dk, dv, n, width) = _prepare(q, k, v, cum, cum_row, doc, doc_row, prev, carry, beta,
                                                         chunk_size)
  vector, has_beta = cum_row is None, beta is not None
  states = _pad_last(_pad_last(states, dv), dk, axis=-2).reshape(b, h, n * dk, dv)
  ds_final = _pad_last(_pad_last(ds_final, dv), dk, axis=-2)
  out_specs = [_whole((t, dk)), _whole((t, dk)), _whole((t, dv)), _whole((t, width)), _whole((n * width, 1))]
  out_shape = [jax.ShapeDtypeStruct((b, h, t, dk), F32), jax.ShapeDtypeStruct((b, h, t, dk), F32),
               jax.ShapeDtypeStruct((b, h, t, dv), F32), jax.ShapeDtypeStruct((b, h, t, width), F32),
               jax.ShapeDtypeStruct((b, h, n * width, 1), F32)]
  if has_beta:
    out_specs.append(_whole((t, 1)))
    out_shape.append(jax.ShapeDtypeStruct((b, h, t, 1), F32))
  out_specs.append(_whole((dk, dv)))
  out_shape.append(jax.ShapeDtypeStruct((b, h, dk, dv), F32))
  outs = pl.pallas_call(
      functools.partial(_backward_kernel, c=chunk_size, n=n, width=width, dk=dk, vector=vector, has_beta=has_beta),
      grid=(b, h),
      in_specs=specs + [_whole((n * dk, dv)), _whole((t, dv)), _whole((dk, dv))],
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
      interpret=interpret,
      name="linear_recurrence_backward",
  )(*inputs, states, _pad_last(do, dv), ds_final)
  dq, dk_, dv_, dcum, dcarry = outs[:5]
  cum_width = cum.shape[-1]
  dcarry = dcarry.reshape(b, h, n, width, 1)[:, :, :, :cum_width]
  dbeta = outs[5] if has_beta else None
  return (dq[..., :dk0], dk_[..., :dk0], dv_[..., :dv0], dcum[..., :cum_width], dcarry, dbeta,
          outs[-1][:, :, :dk0, :dv0])
