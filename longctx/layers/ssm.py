"""Pieces the Mamba layers share: the causal conv with a carried history, and the time-step init.

Causal depthwise 1-D convolution whose input history is carried between segments:

    y_t[c] = bias[c] + sum_{i=0}^{K-1} weight[i, c] * x_{t-(K-1)+i}[c]

Tap order is that of `torch.nn.Conv1d(groups=channels, padding=K-1)` as Mamba
uses it (HF `conv1d.weight[c, 0, i]` is `weight[i, c]` here): the last tap
multiplies the current input. Inputs of another document count as zeros, so a
document starting inside a segment reads nothing of the one before it; the
state is the last K-1 inputs (which of them belong to the open document
follows from the context, `Context.history_doc`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def causal_conv1d(x: jax.Array, weight: jax.Array, bias: jax.Array | None, *, history: jax.Array,
                  history_doc: jax.Array, doc: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Convolve one segment, continuing from the previous one.

  Args:
    x: `[batch, seq, *channels]` inputs of the segment (channels may be several axes, e.g. heads x head_dim).
    weight: `[K, *channels]`; bias `[*channels]` or None.
    history: `[batch, K-1, *channels]` the last K-1 inputs before the segment.
    history_doc: `[batch, K-1]` their document ids: 0 where they belong to the document the segment's
      first token continues, -1 otherwise (`Context.history_doc`).
    doc: `[batch, seq]` document ids, 0 for the document the history belongs to.
  Returns:
    `y [batch, seq, *channels]` (dtype of x) and the new history `[batch, K-1, *channels]`.
  """
  taps = weight.shape[0]
  seq = x.shape[1]
  full = jnp.concatenate([history.astype(x.dtype), x], axis=1)  # [b, K-1 + seq, c]
  full_doc = jnp.concatenate([history_doc, doc], axis=1)
  y = jnp.zeros_like(x) if bias is None else jnp.broadcast_to(bias.astype(x.dtype), x.shape)
  for i in range(taps):
    same = full_doc[:, i:i + seq] == doc
    same = same.reshape(same.shape + (1,) * (x.ndim - 2))
    y = y + jnp.where(same, full[:, i:i + seq] * weight[i].astype(x.dtype), 0)
  return y, full[:, seq:]


def softplus_inverse(y: jax.Array) -> jax.Array:
  return y + jnp.log(-jnp.expm1(-y))


def init_dt_bias(key: jax.Array, shape: tuple[int, ...], *, dt_min: float, dt_max: float) -> jax.Array:
  """softplus^-1 of time steps log-uniform in [dt_min, dt_max], floored at 1e-4 (mamba_ssm's init)."""
  u = jax.random.uniform(key, shape, jnp.float32)
  dt = jnp.maximum(jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)), 1e-4)
  return softplus_inverse(dt)
