"""The selective scan as Mosaic TPU kernels: the states of a block of channels stay in VMEM.

Grid (batch, channel blocks, chunks), the chunk axis sequential. A program holds `h [N, W]` f32 for W
channels (W = 128, or all channels when fewer) in VMEM scratch across the chunks; each step reads one chunk
of x, dt `[L, W]`, b, c as `[N, L]` (states on sublanes, tokens on lanes) and keep `[L, 1]`, and walks its L
tokens in a `fori_loop` (`token_forward`), reading and writing one row per token. The training forward also
writes the state entering each chunk (`[batch, chunks, N, channels]`: N / L of the size of x).

Backward, chunks last to first: recompute the chunk's L states from its saved entering state into a VMEM
buffer `[L, N, W]`, then walk the tokens in reverse (`token_backward`) with g = dL/dh in VMEM across chunks.
db and dc are sums over channels, so each channel block writes its own partial `[N, L]` and the wrapper adds
them; da is a sum over batch rows and tokens, accumulated in VMEM and written once per (row, block).

Shapes in (the wrapper in kernels/selective_scan.py pads seq to whole chunks): x, dt `[bs, T, D]`, a `[N, D]`,
b, c `[bs, T, N]`, keep `[bs, T, 1]`, h0 `[bs, N, D]`, all f32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from longctx.kernels.selective_scan_token import token_backward, token_forward

F32 = jnp.float32


def _width(d: int) -> int:
  return 128 if d % 128 == 0 else d


def _one_hot_row(t, n):
  return (lax.broadcasted_iota(jnp.int32, (1, n), 1) == t).astype(F32)


def _token_inputs(t, x_ref, dt_ref, keep_ref, b_rows, c_rows):
  """Token t of the chunk: x_t, dt_t `[1, W]`, b_t, c_t `[N, 1]` (a one-hot lane sum: no dynamic lane slice),
  keep_t `[1, 1]`."""
  pick = _one_hot_row(t, b_rows.shape[1])
  b_t = jnp.sum(b_rows * pick, axis=1, keepdims=True)
  c_t = jnp.sum(c_rows * pick, axis=1, keepdims=True)
  row = pl.ds(t, 1)
  return x_ref[row, :], dt_ref[row, :], b_t, c_t, keep_ref[row, :]


def _forward_kernel(x_ref, dt_ref, a_ref, b_ref, c_ref, keep_ref, h0_ref, y_ref, h_out_ref, *rest, save_states):
  states_ref = rest[0] if save_states else None
  h_scr = rest[-1]
  ch = pl.program_id(2)

  @pl.when(ch == 0)
  def _():
    h_scr[...] = h0_ref[...]

  if save_states:
    states_ref[...] = h_scr[...]
  a, b_rows, c_rows = a_ref[...], b_ref[...], c_ref[...]

  def token(t, h):
    x_t, dt_t, b_t, c_t, keep_t = _token_inputs(t, x_ref, dt_ref, keep_ref, b_rows, c_rows)
    h, y_t = token_forward(h, a, x_t, dt_t, b_t, c_t, keep_t)
    y_ref[pl.ds(t, 1), :] = y_t
    return h

  h = lax.fori_loop(0, x_ref.shape[0], token, h_scr[...])
  h_scr[...] = h

  @pl.when(ch == pl.num_programs(2) - 1)
  def _():
    h_out_ref[...] = h


def _rows_layout(v, n_chunks, chunk):
  """`[bs, T, N]` -> `[bs, chunks, N, L]`: a chunk's b or c with tokens on lanes."""
  bs, _, n = v.shape
  return jnp.swapaxes(v.reshape(bs, n_chunks, chunk, n), 2, 3)


def forward(x, dt, a, b, c, keep, h0, *, chunk_size, save_states, interpret):
  """Returns y `[bs, T, D]`, the final state `[bs, N, D]` and (if `save_states`) the state entering each chunk
  `[bs, chunks, N, D]`."""
  bs, t, d = x.shape
  n = a.shape[0]
  L, w = chunk_size, _width(d)
  chunks = t // L
  token_block = pl.BlockSpec((None, L, w), lambda i, j, ch: (i, ch, j))
  rows_block = pl.BlockSpec((None, None, n, L), lambda i, j, ch: (i, ch, 0, 0))
  state_block = pl.BlockSpec((None, n, w), lambda i, j, ch: (i, 0, j))
  out_specs = [token_block, state_block]
  out_shape = [jax.ShapeDtypeStruct((bs, t, d), F32), jax.ShapeDtypeStruct((bs, n, d), F32)]
  if save_states:
    out_specs.append(pl.BlockSpec((None, None, n, w), lambda i, j, ch: (i, ch, 0, j)))
    out_shape.append(jax.ShapeDtypeStruct((bs, chunks, n, d), F32))
  outs = pl.pallas_call(
      functools.partial(_forward_kernel, save_states=save_states),
      grid=(bs, d // w, chunks),
      in_specs=[token_block, token_block, pl.BlockSpec((n, w), lambda i, j, ch: (0, j)), rows_block, rows_block,
                pl.BlockSpec((None, L, 1), lambda i, j, ch: (i, ch, 0)), state_block],
      out_specs=out_specs,
      out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM((n, w), F32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="selective_scan_forward",
  )(x, dt, a, _rows_layout(b, chunks, L), _rows_layout(c, chunks, L), keep, h0)
  return outs[0], outs[1], (outs[2] if save_states else None)


def _backward_kernel(x_ref, dt_ref, a_ref, b_ref, c_ref, keep_ref, states_ref, dy_ref, dh_ref,
                     dx_ref, ddt_ref, db_ref, dc_ref, da_ref, dh0_ref, g_scr, da_scr, hs_scr):
  step = pl.program_id(2)
  L = x_ref.shape[0]

  @pl.when(step == 0)
  def _():
    g_scr[...] = dh_ref[...]
    da_scr[...] = jnp.zeros(da_scr.shape, F32)

  a, b_rows, c_rows = a_ref[...], b_ref[...], c_ref[...]
  s = states_ref[...]

  def recompute(t, h):
    x_t, dt_t, b_t, c_t, keep_t = _token_inputs(t, x_ref, dt_ref, keep_ref, b_rows, c_rows)
    h, _ = token_forward(h, a, x_t, dt_t, b_t, c_t, keep_t)
    hs_scr[t] = h
    return h

  lax.fori_loop(0, L, recompute, s)

  def token(i, carry):
    g, da, db_rows, dc_rows = carry
    t = L - 1 - i
    x_t, dt_t, b_t, c_t, keep_t = _token_inputs(t, x_ref, dt_ref, keep_ref, b_rows, c_rows)
    h_prev = jnp.where(t == 0, s, hs_scr[jnp.maximum(t - 1, 0)])
    g, dx_t, ddt_t, db_t, dc_t, da_t = token_backward(g, hs_scr[t], h_prev, a, x_t, dt_t, b_t, c_t, keep_t,
                                                      dy_ref[pl.ds(t, 1), :])
    dx_ref[pl.ds(t, 1), :] = dx_t
    ddt_ref[pl.ds(t, 1), :] = ddt_t
    pick = _one_hot_row(t, L)
    return g, da + da_t, db_rows + db_t * pick, dc_rows + dc_t * pick

  zeros = jnp.zeros(b_rows.shape, F32)
  g, da, db_rows, dc_rows = lax.fori_loop(0, L, token, (g_scr[...], da_scr[...], zeros, zeros))
  db_ref[...] = db_rows
  dc_ref[...] = dc_rows
  g_scr[...] = g
  da_scr[...] = da

  @pl.when(step == pl.num_programs(2) - 1)
  def _():
    dh0_ref[...] = g
    da_ref[...] = da


def backward(x, dt, a, b, c, keep, states, dy, dh, *, chunk_size, interpret):
  """Gradients: dx, ddt `[bs, T, D]`, da `[N, D]`, db, dc `[bs, T, N]`, dh0 `[bs, N, D]`."""
  bs, t, d = x.shape
  n = a.shape[0]
  L, w = chunk_size, _width(d)
  chunks, blocks = t // L, d // w
  back = lambda ch: chunks - 1 - ch
  token_block = pl.BlockSpec((None, L, w), lambda i, j, ch: (i, back(ch), j))
  rows_block = pl.BlockSpec((None, None, n, L), lambda i, j, ch: (i, back(ch), 0, 0))
  state_block = pl.BlockSpec((None, n, w), lambda i, j, ch: (i, 0, j))
  partial_rows = pl.BlockSpec((None, None, None, n, L), lambda i, j, ch: (i, j, back(ch), 0, 0))
  dx, ddt, db, dc, da, dh0 = pl.pallas_call(
      _backward_kernel,
      grid=(bs, blocks, chunks),
      in_specs=[token_block, token_block, pl.BlockSpec((n, w), lambda i, j, ch: (0, j)), rows_block, rows_block,
                pl.BlockSpec((None, L, 1), lambda i, j, ch: (i, back(ch), 0)),
                pl.BlockSpec((None, None, n, w), lambda i, j, ch: (i, back(ch), 0, j)), token_block, state_block],
      out_specs=[token_block, token_block, partial_rows, partial_rows, state_block, state_block],
      out_shape=[jax.ShapeDtypeStruct((bs, t, d), F32)] * 2 + [jax.ShapeDtypeStruct((bs, blocks, chunks, n, L), F32)] * 2
      + [jax.ShapeDtypeStruct((bs, n, d), F32)] * 2,
      scratch_shapes=[pltpu.VMEM((n, w), F32), pltpu.VMEM((n, w), F32), pltpu.VMEM((L, n, w), F32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="selective_scan_backward",
  )(x, dt, a, _rows_layout(b, chunks, L), _rows_layout(c, chunks, L), keep, states, dy, dh)
  tokens_last = lambda v: jnp.swapaxes(v.sum(axis=1), 2, 3).reshape(bs, t, n)  # partials summed over blocks
  return dx, ddt, da.sum(axis=0), tokens_last(db), tokens_last(dc), dh0
