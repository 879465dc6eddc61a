"""One token of the selective scan, forward and backward, for the inside of a Pallas kernel.

Shared by kernels/selective_scan_tpu.py, kernels/selective_scan_gpu.py and kernels/selective_scan_xla.py. A kernel holds a block of W
channels: the state `h [N, W]` f32 (states on sublanes, channels on lanes), `a [N, W]` (A transposed), and per
token the rows x_t, dt_t `[1, W]`, the columns b_t, c_t `[N, 1]` and keep_t `[1, 1]` (0 where a document
starts). Only elementwise math and reductions: what Mosaic and Triton both lower. The XLA form
(kernels/selective_scan_xla.py) runs the same functions with a leading batch axis on every argument
(`h [bs, N, W]`, `x_t [bs, 1, W]`, ...): the reductions are over the last two axes.

    decay = keep_t exp(dt_t a)          h_t = decay h_{t-1} + b_t (dt_t x_t)          y_t = sum_n c_t h_t

Backward through one token, walking the sequence in reverse with g = dL/dh_t accumulated from later tokens:

    g += c_t dy_t        dc_t = sum_w h_t dy_t        du = g (u = b_t dt_t x_t): dx_t, ddt_t, db_t
    d decay = g h_{t-1}: ddt_t += sum_n d_decay decay a,  da += d_decay decay dt_t      g <- decay g
"""

from __future__ import annotations

import jax.numpy as jnp


def token_forward(h, a, x_t, dt_t, b_t, c_t, keep_t):
  """Returns (h_t `[N, W]`, y_t `[1, W]`)."""
  h = keep_t * jnp.exp(dt_t * a) * h + b_t * (dt_t * x_t)
  return h, jnp.sum(c_t * h, axis=-2, keepdims=True)


def token_backward(g, h_t, h_prev, a, x_t, dt_t, b_t, c_t, keep_t, dy_t):
  """Returns (g for token t - 1, dx_t `[1, W]`, ddt_t `[1, W]`, db_t `[N, 1]`, dc_t `[N, 1]`, da_t `[N, W]`)."""
  g = g + c_t * dy_t
  dc_t = jnp.sum(h_t * dy_t, axis=-1, keepdims=True)
  gb = jnp.sum(g * b_t, axis=-2, keepdims=True)
  dx_t, ddt_t = gb * dt_t, gb * x_t
  db_t = jnp.sum(g * (dt_t * x_t), axis=-1, keepdims=True)
  decay = keep_t * jnp.exp(dt_t * a)
  d_decay = g * h_prev * decay
  ddt_t = ddt_t + jnp.sum(d_decay * a, axis=-2, keepdims=True)
  return decay * g, dx_t, ddt_t, db_t, dc_t, d_decay * dt_t
