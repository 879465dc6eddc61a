"""Normalisation layers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def rms_norm(x: jax.Array, scale: jax.Array, *, eps: float) -> jax.Array:
  """RMSNorm over the last axis, computed in float32, returned in x's dtype."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * scale.astype(jnp.float32)).astype(x.dtype)


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """`x / |x|` over the last axis, in float32 (a zero vector stays 0): the position-free, scale-free keys
  and queries of cosine / kNN attention and of Titans' memory."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


class RMSNorm(nnx.Module):
  """RMSNorm with a learned scale `[features]` (logical axis `embed`)."""

  def __init__(self, features: int, *, eps: float = 1e-6, axis_name: str = "embed", init: float = 1.0):
    self.eps = eps
    self.scale = nnx.Param(jnp.full((features,), init, jnp.float32), logical_axes=(axis_name,))

  def __call__(self, x: jax.Array) -> jax.Array:
    return rms_norm(x, self.scale[...], eps=self.eps)
