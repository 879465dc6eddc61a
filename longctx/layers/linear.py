"""Dense layers whose parameters carry logical axis names for sharding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], *, fan_in: int,
          scale: float = 1.0) -> nnx.Param:
  """A float32 parameter drawn from N(0, scale / fan_in), tagged with logical `axes`."""
  std = (scale / fan_in) ** 0.5
  value = std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, jnp.float32) / 0.87962566
  return nnx.Param(value, logical_axes=axes)


class GatedMLP(nnx.Module):
  """SwiGLU feed-forward: `down(silu(x @ gate) * (x @ up))`.

  `x [batch, seq, d_model] -> [batch, seq, d_model]`; hidden width `d_ff`.
  """

  def __init__(self, d_model: int, d_ff: int, *, rngs: nnx.Rngs, out_scale: float = 1.0):
    self.gate = param(rngs, (d_model, d_ff), ("embed", "mlp"), fan_in=d_model)
    self.up = param(rngs, (d_model, d_ff), ("embed", "mlp"), fan_in=d_model)
    self.down = param(rngs, (d_ff, d_model), ("mlp", "embed"), fan_in=d_ff, scale=out_scale)

  def __call__(self, x: jax.Array) -> jax.Array:
    g = jnp.einsum("bsd,df->bsf", x, self.gate[...].astype(x.dtype))
    u = jnp.einsum("bsd,df->bsf", x, self.up[...].astype(x.dtype))
    return jnp.einsum("bsf,fd->bsd", jax.nn.silu(g) * u, self.down[...].astype(x.dtype))
