"""Pieces the Mamba layers share: the causal conv with a carried history, and the time-step init.

Causal depthwise 1-D convolution whose input history is carried between segments:

    y_t[c] = bias[c] + sum_{i=0}^{K-1} weight[i, c] * x_{t-(K-1)+i}[c]

Tap order is that of `torch.nn.Conv1d(groups=channels, padding=K-1)` as Mamba
uses it (HF `conv1d.weight[c, 0, i]` is `weight[i, c]` here): the last tap
multiplies the current input. Inputs of another document count as zeros, so a
document starting inside a segment reads nothing of the one before it; the
state is the last K-1 inputs plus whether they belong to the open document.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def causal_conv1d(x: jax.Array, weight: jax.Array, bias: jax.Array | None, *, history: jax.Array,
                  history_valid: jax.Array, doc: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Convolve one segment, continuing from the previous one.

  Args:
    x: `[batch, seq, channels]` inputs of the segment.
    weight: `[K, channels]`; bias `[channels]` or None.
    history: `[batch, K-1, channels]` the last K-1 inputs before the segment.
    history_valid: `[batch, K-1]` bool, the history entry belongs to the document
      the segment's first token continues (False after a reset).
    doc: `[batch, seq]` document ids, 0 for the document the history belongs to.
  Returns:
    `y [batch, seq, channels]` (dtype of x), the new history `[batch, K-1, channels]`
    and its validity `[batch, K-1]`.
  """
  taps = weight.shape[0]
  seq = x.shape[1]
  full = jnp.concatenate([history.astype(x.dtype), x], axis=1)  # [b, K-1 + seq, c]
  full_doc = jnp.concatenate([jnp.where(history_valid, 0, -1), doc], axis=1)
  y = jnp.zeros_like(x) if bias is None else jnp.broadcast_to(bias.astype(x.dtype), x.shape)
  for i in range(taps):
    same = (full_doc[:, i:i + seq] == doc)[..., None]
    y = y + jnp.where(same, full[:, i:i + seq] * weight[i].astype(x.dtype), 0)
  new_history = full[:, seq:]
  new_valid = full_doc[:, seq:] == doc[:, -1:]
  return y, new_history, new_valid


def softplus_inverse(y: jax.Array) -> jax.Array:
  return y + jnp.log(-jnp.expm1(-y))


def init_dt_bias(key: jax.Array, shape: tuple[int, ...], *, dt_min: float, dt_max: float) -> jax.Array:
  """softplus^-1 of time steps log-uniform in [dt_min, dt_max], floored at 1e-4 (mamba_ssm's init)."""
  u = jax.random.uniform(key, shape, jnp.float32)
  dt = jnp.maximum(jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)), 1e-4)
  return softplus_inverse(dt)
