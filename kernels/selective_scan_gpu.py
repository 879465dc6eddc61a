"""The selective scan as Pallas Triton kernels for NVIDIA GPUs: the states of a block of channels in registers.

Grid (batch, channel blocks of W = 32). A program keeps `h [N, W]` f32 in registers as the carry of a loop
over the chunks and, inside, over the chunk's tokens (`token_forward`), loading one row of x, dt and one
column of b, c per token (tokens contiguous in memory for all four). The training forward also stores the
state entering each chunk.

Backward, one program per (row, block) again, chunks last to first: recompute the chunk's L states from its
saved entering state into a per-program scratch buffer in global memory (L x N x W floats, hot in L1/L2; a
barrier separates the writes from the reverse walk's reads), then walk the tokens in reverse
(`token_backward`) with g = dL/dh in registers. db and dc are sums over channels: each block stores its own
partial and the wrapper adds them; da is summed in registers and stored once.

Triton holds only power-of-two-sized arrays: the wrapper pads the channels to whole blocks and N to a power of
two (zero channels and states stay zero: x = dt = a = 0, b = c = 0). Same contract and layouts as
kernels/selective_scan_tpu.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from longctx.kernels.selective_scan_token import token_backward, token_forward

F32 = jnp.float32
WIDTH = 32


def _pow2(n: int) -> int:
  return 1 << (n - 1).bit_length()


def _pad(v, axis, size):
  if v.shape[axis] == size:
    return v
  widths = [(0, 0)] * v.ndim
  widths[axis] = (0, size - v.shape[axis])
  return jnp.pad(v, widths)


def _prepare(x, dt, a, b, c, keep):
  """Padded inputs and their sizes: x, dt `[bs, T, Dp]`, a `[Np, Dp]`, b, c `[bs, Np, T]`, keep `[bs, T, 1]`."""
  d, n = x.shape[-1], a.shape[0]
  dp, np_ = -(-d // WIDTH) * WIDTH, _pow2(n)
  rows = lambda v: jnp.swapaxes(_pad(v, 2, np_), 1, 2)
  return (_pad(x, 2, dp), _pad(dt, 2, dp), _pad(_pad(a, 0, np_), 1, dp), rows(b), rows(c), keep), (d, n, dp, np_)


def _token(t, x_ref, dt_ref, b_ref, c_ref, keep_ref):
  row, col = pl.ds(t, 1), pl.ds(t, 1)
  return x_ref[row, :], dt_ref[row, :], b_ref[:, col], c_ref[:, col], keep_ref[row, :]


def _forward_kernel(x_ref, dt_ref, a_ref, b_ref, c_ref, keep_ref, h0_ref, y_ref, h_out_ref, *states, chunk, chunks):
  a = a_ref[...]

  def chunk_step(ch, h):
    if states:
      states[0][ch] = h

    def token(i, h):
      t = ch * chunk + i
      x_t, dt_t, b_t, c_t, keep_t = _token(t, x_ref, dt_ref, b_ref, c_ref, keep_ref)
      h, y_t = token_forward(h, a, x_t, dt_t, b_t, c_t, keep_t)
      y_ref[pl.ds(t, 1), :] = y_t
      return h

    return lax.fori_loop(0, chunk, token, h)

  h_out_ref[...] = lax.fori_loop(0, chunks, chunk_step, h0_ref[...])


def _specs(bs, t, np_, chunks):
  tokens = pl.BlockSpec((None, t, WIDTH), lambda i, j: (i, 0, j))
  rows = pl.BlockSpec((None, np_, t), lambda i, j: (i, 0, 0))
  state = pl.BlockSpec((None, np_, WIDTH), lambda i, j: (i, 0, j))
  return tokens, rows, state, pl.BlockSpec((np_, WIDTH), lambda i, j: (0, j)), \
      pl.BlockSpec((None, t, 1), lambda i, j: (i, 0, 0)), \
      pl.BlockSpec((None, chunks, np_, WIDTH), lambda i, j: (i, 0, 0, j))


def forward(x, dt, a, b, c, keep, h0, *, chunk_size, save_states, interpret):
  """Same contract as kernels/selective_scan_tpu.forward."""
  bs, t, _ = x.shape
  (x, dt, a, b, c, keep), (d, n, dp, np_) = _prepare(x, dt, a, b, c, keep)
  chunks = t // chunk_size
  tokens, rows, state, a_spec, keep_spec, states_spec = _specs(bs, t, np_, chunks)
  out_specs = [tokens, state] + ([states_spec] if save_states else [])
  out_shape = [jax.ShapeDtypeStruct((bs, t, dp), F32), jax.ShapeDtypeStruct((bs, np_, dp), F32)]
  if save_states:
    out_shape.append(jax.ShapeDtypeStruct((bs, chunks, np_, dp), F32))
  outs = pl.pallas_call(
      lambda *refs: _forward_kernel(*refs, chunk=chunk_size, chunks=chunks),
      grid=(bs, dp // WIDTH),
      in_specs=[tokens, tokens, a_spec, rows, rows, keep_spec, state],
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=1, num_stages=1),
      interpret=interpret,
      name="selective_scan_forward",
  )(x, dt, a, b, c, keep, _pad(_pad(h0, 1, np_), 2, dp))
  states = outs[2][:, :, :n, :d] if save_states else None
  return outs[0][..., :d], outs[1][:, :n, :d], states


def _backward_kernel(x_ref, dt_ref, a_ref, b_ref, c_ref, keep_ref, states_ref, dy_ref, dh_ref,
                     dx_ref, ddt_ref, db_ref, dc_ref, da_ref, dh0_ref, hs_ref, *, chunk, chunks, barrier):
  a = a_ref[...]

  def chunk_step(k, carry):
    g, da = carry
    ch = chunks - 1 - k
    s = states_ref[ch]

    def recompute(i, h):
      x_t, dt_t, b_t, c_t, keep_t = _token(ch * chunk + i, x_ref, dt_ref, b_ref, c_ref, keep_ref)
      h, _ = token_forward(h, a, x_t, dt_t, b_t, c_t, keep_t)
      hs_ref[i] = h
      return h

    lax.fori_loop(0, chunk, recompute, s)
    barrier()  # the reverse walk reads states other threads may have written

    def token(j, carry):
      g, da = carry
      i = chunk - 1 - j
      t = ch * chunk + i
      x_t, dt_t, b_t, c_t, keep_t = _token(t, x_ref, dt_ref, b_ref, c_ref, keep_ref)
      h_prev = jnp.where(i == 0, s, hs_ref[jnp.maximum(i - 1, 0)])
      g, dx_t, ddt_t, db_t, dc_t, da_t = token_backward(g, hs_ref[i], h_prev, a, x_t, dt_t, b_t, c_t, keep_t,
                                                        dy_ref[pl.ds(t, 1), :])
      dx_ref[pl.ds(t, 1), :] = dx_t
      ddt_ref[pl.ds(t, 1), :] = ddt_t
      db_ref[:, pl.ds(t, 1)] = db_t
      dc_ref[:, pl.ds(t, 1)] = dc_t
      return g, da + da_t

    carry = lax.fori_loop(0, chunk, token, (g, da))
    barrier()  # the next chunk's recompute overwrites the buffer
    return carry

  g, da = lax.fori_loop(0, chunks, chunk_step, (dh_ref[...], jnp.zeros(a.shape, F32)))
  dh0_ref[...] = g
  da_ref[...] = da


def backward(x, dt, a, b, c, keep, states, dy, dh, *, chunk_size, interpret):
  """Same contract as kernels/selective_scan_tpu.backward."""
  bs, t, _ = x.shape
  (x, dt, a, b, c, keep), (d, n, dp, np_) = _prepare(x, dt, a, b, c, keep)
  chunks, blocks = t // chunk_size, dp // WIDTH
  tokens, rows, state, a_spec, keep_spec, states_spec = _specs(bs, t, np_, chunks)
  partial_rows = pl.BlockSpec((None, None, np_, t), lambda i, j: (i, j, 0, 0))
  scratch = pl.BlockSpec((None, None, chunk_size, np_, WIDTH), lambda i, j: (i, j, 0, 0, 0))
  pad_state = lambda v: _pad(_pad(v, v.ndim - 2, np_), v.ndim - 1, dp)
  dx, ddt, db, dc, da, dh0, _ = pl.pallas_call(
      lambda *refs: _backward_kernel(*refs, chunk=chunk_size, chunks=chunks,
                                     barrier=(lambda: None) if interpret else plgpu.debug_barrier),
      grid=(bs, blocks),
      in_specs=[tokens, tokens, a_spec, rows, rows, keep_spec, states_spec, tokens, state],
      out_specs=[tokens, tokens, partial_rows, partial_rows, state, state, scratch],
      out_shape=[jax.ShapeDtypeStruct((bs, t, dp), F32)] * 2 + [jax.ShapeDtypeStruct((bs, blocks, np_, t), F32)] * 2
      + [jax.ShapeDtypeStruct((bs, np_, dp), F32)] * 2
      + [jax.ShapeDtypeStruct((bs, blocks, chunk_size, np_, WIDTH), F32)],
      compiler_params=plgpu.CompilerParams(num_warps=1, num_stages=1),
      interpret=interpret,
      name="selective_scan_backward",
  )(x, dt, a, b, c, keep, pad_state(states), _pad(dy, 2, dp), pad_state(dh))
  rows_back = lambda v: jnp.swapaxes(v.sum(axis=1), 1, 2)[..., :n]  # partials summed over blocks, [bs, T, N]
  return dx[..., :d], ddt[..., :d], da.sum(axis=0)[:n, :d], rows_back(db), rows_back(dc), dh0[:, :n, :d]
