"""The one dense contraction (layers/linear.py `dense`): values and gradients equal autodiff's einsum on fresh
random inputs, and its weight gradient runs without the transposed copy autodiff's form makes on XLA:CPU."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from longctx.layers.linear import GatedMLP, dense

CASES = [  # x shape, w shape, in_dims, the einsum autodiff differentiates
    ((2, 5, 8), (8, 3, 4), 1, "bsd,dhk->bshk"),  # a head projection
    ((2, 5, 3, 4), (3, 4, 8), 2, "bshk,hkd->bsd"),  # an output projection over heads
    ((2, 5, 8), (8, 16), 1, "bsd,df->bsf"),  # MLP in (wider out)
    ((3, 2, 5, 16), (16, 8), 1, "absf,fd->absd"),  # MLP out (narrower out), three token axes
]


@pytest.mark.parametrize("x_shape,w_shape,in_dims,spec", CASES)
@pytest.mark.parametrize("dtype,preferred", [(jnp.float32, None), (jnp.bfloat16, None), (jnp.bfloat16, jnp.float32)],
                         ids=["f32", "bf16", "bf16->f32"])
def test_dense_equals_autodiff(x_shape, w_shape, in_dims, spec, dtype, preferred):
  rng = np.random.default_rng(len(spec) + x_shape[-1])
  x = jnp.asarray(rng.standard_normal(x_shape), dtype)
  w = jnp.asarray(rng.standard_normal(w_shape), jnp.float32)
  ours = lambda x, w: dense(x, w, in_dims=in_dims, preferred_element_type=preferred)
  autodiff = lambda x, w: jnp.einsum(spec, x, w.astype(x.dtype), preferred_element_type=preferred)
  y = ours(x, w)
  assert y.dtype == autodiff(x, w).dtype and y.shape == autodiff(x, w).shape
  r = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
  grads = lambda f: jax.jit(jax.grad(lambda x, w: jnp.sum(f(x, w).astype(jnp.float32) * r), argnums=(0, 1)))(x, w)
  (dx, dw), (dx_ref, dw_ref) = grads(ours), grads(autodiff)
  assert dx.dtype == dx_ref.dtype and dw.dtype == dw_ref.dtype
  tol = 1e-6 if dtype == jnp.float32 else 1e-2
  for got, want in ((y, autodiff(x, w)), (dx, dx_ref), (dw, dw_ref)):
    assert rel_err(got.astype(jnp.float32), want.astype(jnp.float32)) < tol


def test_mlp_weight_gradient_has_no_transposed_copy():
  """The SwiGLU's backward on XLA:CPU: autodiff's weight gradients contract over (batch, seq) and XLA copies the
  `[tokens, d_ff]` hidden gradient into a `[d_ff, tokens]` layout first (~10 ms per weight at this size, the
  largest non-matmul cost of a d_model-128 step); `dense` merges the token axes and no such array exists."""
  batch, seq, d, ff = 4, 64, 32, 96
  mlp = GatedMLP(d, ff, rngs=__import__("flax").nnx.Rngs(0))
  x = jnp.ones((batch, seq, d), jnp.float32)

  def loss(params, x):
    gate, up, down = params
    h = jax.nn.silu(dense(x, gate)) * dense(x, up)
    return jnp.sum(dense(h, down) ** 2)

  params = (mlp.gate[...], mlp.up[...], mlp.down[...])
  hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile().as_text()
  transposed = re.findall(rf"= f32\[{ff},{batch * seq}\]", hlo) + re.findall(rf"= f32\[{ff},{batch},{seq}\]", hlo)
  assert not transposed, f"a [d_ff, tokens] copy in the backward: {transposed}"
  assert re.search(rf"= f32\[{d},{ff}\]\S* dot\(", hlo), "the weight gradient is no longer one dot"
