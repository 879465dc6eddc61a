"""The chunked linear recurrence as Mosaic TPU kernels: forward, and backward through the chunks in reverse.

Design (axlearn's SSD kernel, fla's chunk kernels): the grid is (batch, heads, chunks) with the chunk axis
sequential ("arbitrary") and the state `[dk, dv]` f32 resident in a VMEM scratch buffer across it; each
step reads one chunk of q, k, v (and its prepared decays and documents), runs `chunk_forward` of
kernels/linear_recurrence_chunk.py and writes the chunk's outputs. For training the forward also writes the
state entering every chunk (`[batch, heads, chunks, dk, dv]`, the size of q for C = dk); the backward kernel
walks the chunks last to first (its index maps read chunk n - 1 - i at step i), keeps the state's gradient
in VMEM, and recomputes each chunk's internals from its saved entering state (`chunk_backward`).

Mosaic's tiling rule (the last two block dims divisible by 8 and 128, or equal to the array's) is met by
giving every per-token vector its own trailing unit axis (`[.., C, 1]` columns) and every row its own chunk
axis (`[.., chunks, 1, C]`), so the chunk length needs only be a multiple of 8.

Arrays (the wrapper in kernels/linear_recurrence.py prepares them; n chunks of C tokens, T = n C):
  q, k `[b, h, T, dk]`, v `[b, h, T, dv]`   cum `[b, h, T, 1]` (or `[.., dk]` per channel)
  cum_row `[b, h, n, 1, C]` or None        doc `[b, T, 1]`, doc_row `[b, n, 1, C]`, prev `[b, n, 1, 1]` int32
  carry `[b, h, n, 1, 1]` (or `[.., dk, 1]`)  beta `[b, h, T, 1]` or None      s0 `[b, h, dk, dv]` f32
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from longctx.kernels.linear_recurrence_chunk import chunk_backward, chunk_forward

F32 = jnp.float32


def _specs(dk, dv, c, *, vector, has_beta, reverse):
  """BlockSpecs of the inputs shared by both kernels, in argument order (grid (b, h, n); chunk index read
  backwards when `reverse`)."""
  at = (lambda n, ch: n - 1 - ch) if reverse else (lambda n, ch: ch)

  def per_token(width, n):
    return pl.BlockSpec((None, None, c, width), lambda i, j, ch: (i, j, at(n, ch), 0))

  def specs(n):
    out = [per_token(dk, n), per_token(dk, n), per_token(dv, n), per_token(dk if vector else 1, n)]
    if not vector:
      out.append(pl.BlockSpec((None, None, None, 1, c), lambda i, j, ch: (i, j, at(n, ch), 0, 0)))
    out += [pl.BlockSpec((None, c, 1), lambda i, j, ch: (i, at(n, ch), 0)),
            pl.BlockSpec((None, None, 1, c), lambda i, j, ch: (i, at(n, ch), 0, 0)),
            pl.BlockSpec((None, None, 1, 1), lambda i, j, ch: (i, at(n, ch), 0, 0)),
            pl.BlockSpec((None, None, None, dk if vector else 1, 1), lambda i, j, ch: (i, j, at(n, ch), 0, 0))]
    if has_beta:
      out.append(per_token(1, n))
    return out

  return specs


def _state_spec(dk, dv):
  return pl.BlockSpec((None, None, dk, dv), lambda i, j, ch: (i, j, 0, 0))


def _chunk_refs(refs, *, vector, has_beta):
  """Split a kernel's leading refs into the chunk's loaded arrays (in chunk_forward's order) and the rest."""
  refs = list(refs)
  q, k, v, cum = (r[...] for r in refs[:4])
  del refs[:4]
  cum_row = None if vector else refs.pop(0)[...]
  doc, doc_row, prev, carry = (r[...] for r in refs[:4])
  del refs[:4]
  beta = refs.pop(0)[...] if has_beta else None
  return (q, k, v, cum, cum_row, doc, doc_row, prev, carry, beta), refs


def _forward_kernel(*refs, vector, has_beta, save_states):
  arrays, refs = _chunk_refs(refs, vector=vector, has_beta=has_beta)
  s0_ref, o_ref, s_out_ref, *refs = refs
  states_ref = refs.pop(0) if save_states else None
  (s_scr,) = refs
  ch = pl.program_id(2)

  @pl.when(ch == 0)
  def _():
    s_scr[...] = s0_ref[...]

  s = s_scr[...]
  if save_states:
    states_ref[...] = s
  q, k, v, cum, cum_row, doc, doc_row, prev, carry, beta = arrays
  out, s_new = chunk_forward(q, k, v, s, cum, cum_row, doc, doc_row, prev, carry, beta)
  o_ref[...] = out.astype(o_ref.dtype)
  s_scr[...] = s_new

  @pl.when(ch == pl.num_programs(2) - 1)
  def _():
    s_out_ref[...] = s_new


def forward(q, k, v, cum, cum_row, doc, doc_row, prev, carry, beta, s0, *, chunk_size, save_states, interpret):
  """Returns out `[b, h, T, dv]` (v's dtype), the final state `[b, h, dk, dv]` f32 and, if `save_states`, the
  state entering every chunk `[b, h, n, dk, dv]` f32 (else None)."""
  b, h, t, dk = q.shape
  dv, c = v.shape[-1], chunk_size
  n = t // c
  vector, has_beta = cum_row is None, beta is not None
  inputs = [q, k, v, cum] + ([] if vector else [cum_row]) + [doc, doc_row, prev, carry] + ([beta] if has_beta else [])
  in_specs = _specs(dk, dv, c, vector=vector, has_beta=has_beta, reverse=False)(n) + [_state_spec(dk, dv)]
  out_specs = [pl.BlockSpec((None, None, c, dv), lambda i, j, ch: (i, j, ch, 0)), _state_spec(dk, dv)]
  out_shape = [jax.ShapeDtypeStruct((b, h, t, dv), v.dtype), jax.ShapeDtypeStruct((b, h, dk, dv), F32)]
  if save_states:
    out_specs.append(pl.BlockSpec((None, None, None, dk, dv), lambda i, j, ch: (i, j, ch, 0, 0)))
    out_shape.append(jax.ShapeDtypeStruct((b, h, n, dk, dv), F32))
  outs = pl.pallas_call(
      functools.partial(_forward_kernel, vector=vector, has_beta=has_beta, save_states=save_states),
      grid=(b, h, n),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM((dk, dv), F32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="linear_recurrence_forward",
  )(*inputs, s0)
  return outs[0], outs[1], (outs[2] if save_states else None)


def _backward_kernel(*refs, vector, has_beta):
  arrays, refs = _chunk_refs(refs, vector=vector, has_beta=has_beta)
  states_ref, do_ref, ds_final_ref, *refs = refs
  dq_ref, dk_ref, dv_ref, dcum_ref, dcarry_ref, *refs = refs
  dbeta_ref = refs.pop(0) if has_beta else None
  ds0_ref, ds_scr = refs
  step = pl.program_id(2)

  @pl.when(step == 0)
  def _():
    ds_scr[...] = ds_final_ref[...]

  q, k, v, cum, cum_row, doc, doc_row, prev, carry, beta = arrays
  dq, dk, dv, dcum, dcarry, dbeta, ds = chunk_backward(q, k, v, states_ref[...], cum, cum_row, doc, doc_row, prev,
                                                        carry, beta, do_ref[...], ds_scr[...])
  dq_ref[...] = dq
  dk_ref[...] = dk
  dv_ref[...] = dv
  dcum_ref[...] = dcum
  dcarry_ref[...] = dcarry
  if has_beta:
    dbeta_ref[...] = dbeta
  ds_scr[...] = ds

  @pl.when(step == pl.num_programs(2) - 1)
  def _():
    ds0_ref[...] = ds


def backward(q, k, v, cum, cum_row, doc, doc_row, prev, carry, beta, states, do, ds_final, *, chunk_size, interpret):
  """Gradients (f32, the forward's layouts): dq, dk, dv, dcum, dcarry, dbeta (None without beta), ds0."""
  b, h, t, dk = q.shape
  dv, c = v.shape[-1], chunk_size
  n = t // c
  vector, has_beta = cum_row is None, beta is not None
  inputs = [q, k, v, cum] + ([] if vector else [cum_row]) + [doc, doc_row, prev, carry] + ([beta] if has_beta else [])
  back = lambda ch: n - 1 - ch
  token = lambda width: pl.BlockSpec((None, None, c, width), lambda i, j, ch: (i, j, back(ch), 0))
  in_specs = _specs(dk, dv, c, vector=vector, has_beta=has_beta, reverse=True)(n) + [
      pl.BlockSpec((None, None, None, dk, dv), lambda i, j, ch: (i, j, back(ch), 0, 0)), token(dv),
      _state_spec(dk, dv)]
  cum_width = dk if vector else 1
  out_specs = [token(dk), token(dk), token(dv), token(cum_width),
               pl.BlockSpec((None, None, None, cum_width, 1), lambda i, j, ch: (i, j, back(ch), 0, 0))]
  out_shape = [jax.ShapeDtypeStruct(x.shape, F32) for x in (q, k, v, cum, carry)]
  if has_beta:
    out_specs.append(token(1))
    out_shape.append(jax.ShapeDtypeStruct(beta.shape, F32))
  out_specs.append(_state_spec(dk, dv))
  out_shape.append(jax.ShapeDtypeStruct((b, h, dk, dv), F32))
  outs = pl.pallas_call(
      functools.partial(_backward_kernel, vector=vector, has_beta=has_beta),
      grid=(b, h, n),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM((dk, dv), F32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="linear_recurrence_backward",
  )(*inputs, states, do, ds_final)
  dq, dk_, dv_, dcum, dcarry = outs[:5]
  dbeta = outs[5] if has_beta else None
  return dq, dk_, dv_, dcum, dcarry, dbeta, outs[-1]
