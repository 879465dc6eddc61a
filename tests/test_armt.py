"""ARMT: the associative memory's DPFP, read and delta-rule write against a float64 loop written from the paper's
reference code (write by write, from an empty memory, the normaliser's correction on and off), gradients
through the write, the block's per-document reads and writes, the config's refusals. The streaming contract
(any cut into blocks, reset, no leak, memory beyond the horizon, sharded) is tests/test_contract.py's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from longctx.errors import ConfigError
from longctx.layers.context import Context
from longctx.models import ARMTConfig, create_model
from longctx.models.armt import dpfp, memory_read, memory_write


def np_dpfp(x, nu=3):
  x = np.concatenate([np.maximum(x, 0), np.maximum(-x, 0)], -1)
  rolled = np.concatenate([np.roll(x, j, axis=-1) for j in range(1, nu + 1)], -1)
  y = np.concatenate([x] * nu, -1) * rolled
  return y / np.maximum(np.linalg.norm(y, axis=-1, keepdims=True), 1e-12)


def np_write(a, z, k, v, beta, first, correction):
  """The reference `update_mem` for one head of one lane: k [m, dk] (phi'd), v [m, dv], beta [m]."""
  if first:
    held, coef = np.zeros_like(v), np.ones(len(k))
  else:
    denom = k @ z + 1e-5
    held = (k @ a) / denom[:, None]
    coef = np.clip(1 - denom / np.sum(k * k, -1), 0, 1) if correction else np.ones(len(k))
  return a + k.T @ (beta[:, None] * (v - held)), z + coef @ k


@pytest.mark.parametrize("correction", [True, False])
def test_read_and_write_equal_the_reference_loop(correction):
  rng = np.random.default_rng(0)
  b, m, h, dm, dv, n = 2, 5, 2, 4, 6, 7
  dk = 6 * dm
  a, z = jnp.zeros((b, h, dk, dv)), jnp.zeros((b, h, dk))
  a_ref, z_ref = np.zeros((b, h, dk, dv)), np.zeros((b, h, dk))
  for write in range(3):
    k, v, beta = rng.standard_normal((b, m, h, dm)), rng.standard_normal((b, m, h, dv)), rng.uniform(0, 1, (b, m, h))
    phi_k = np_dpfp(k)
    np.testing.assert_allclose(np.asarray(dpfp(jnp.asarray(k, jnp.float32))), phi_k, rtol=1e-5, atol=1e-6)
    a, z = memory_write(a, z, jnp.asarray(phi_k, jnp.float32), jnp.asarray(v, jnp.float32),
                        jnp.asarray(beta, jnp.float32), correction=correction)
    for i in range(b):
      for j in range(h):
        a_ref[i, j], z_ref[i, j] = np_write(a_ref[i, j], z_ref[i, j], phi_k[i, :, j], v[i, :, j], beta[i, :, j],
                                            write == 0, correction)
    # The first write's normaliser counts 1 - 1e-5 where the reference counts 1 (module docstring).
    assert rel_err(a, a_ref) < 1e-5 and rel_err(z, z_ref) < 2e-5, write
    q = np_dpfp(rng.standard_normal((b, n, h, dm)))
    read = memory_read(jnp.asarray(q, jnp.float32), a, z)
    read_ref = np.einsum("bnhk,bhkv->bnhv", q, a_ref) / (np.einsum("bnhk,bhk->bnh", q, z_ref)[..., None] + 1e-5)
    assert rel_err(read, read_ref) < 1e-4


def test_gradients_flow_through_the_write_but_not_the_normaliser_correction():
  rng = np.random.default_rng(1)
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  a0, z0 = f(1, 1, 12, 3), jnp.abs(f(1, 1, 12))
  phi_k, v, beta = dpfp(f(1, 4, 1, 2)), f(1, 4, 1, 3), jax.nn.sigmoid(f(1, 4, 1))

  def loss(a0, phi_k, v, beta):
    a, z = memory_write(a0, z0, phi_k, v, beta, correction=True)
    return jnp.sum(jnp.sin(a)) + jnp.sum(jnp.cos(z))

  grads = jax.grad(loss, argnums=(0, 1, 2, 3))(a0, phi_k, v, beta)
  assert all(float(jnp.linalg.norm(g)) > 0 for g in grads)
  eps = 1e-3  # the write's value path, by central differences
  dv = np.zeros(v.shape, np.float32)
  dv[0, 1, 0, 2] = eps
  numeric = (loss(a0, phi_k, v + dv, beta) - loss(a0, phi_k, v - dv, beta)) / (2 * eps)
  assert abs(float(numeric) - float(grads[2][0, 1, 0, 2])) < 1e-2 * max(1.0, abs(float(numeric)))


def test_a_document_starting_inside_the_block_reads_an_empty_memory_and_owns_the_write():
  cfg = ARMTConfig(vocab_size=50, d_model=32, num_layers=1, num_heads=4, window=8, block_len=8, num_memory=3,
                   memory_dim=8, value_init=1.0, kernel="reference")
  cfg.validate()
  block = create_model(cfg, seed=0).blocks[0]
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((2, 8 + 3, 32)), jnp.float32)
  state = block.init_state(2)
  state = {**state, "A": jnp.asarray(rng.standard_normal(state["A"].shape), jnp.float32),
           "z": jnp.asarray(np.abs(rng.standard_normal(state["z"].shape)), jnp.float32)}
  doc = np.zeros((2, 8), np.int32)
  doc[1, 5:] = 1  # lane 1: a document starts at token 5
  ctx = Context.of(jnp.asarray(doc), jnp.asarray([4, 4], jnp.int32))
  y, new = block(x, state, ctx)
  # Lane 1's tokens 5.. and its write read nothing of the memory: the same as with an empty memory there.
  empty = {**state, "A": state["A"].at[1].set(0), "z": state["z"].at[1].set(0)}
  y_empty, new_empty = block(x, empty, ctx)
  np.testing.assert_allclose(np.asarray(y[1, 5:]), np.asarray(y_empty[1, 5:]), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(new["A"][1]), np.asarray(new_empty["A"][1]), rtol=1e-6, atol=1e-6)
  assert not np.allclose(np.asarray(y[1, :5]), np.asarray(y_empty[1, :5]), atol=1e-4)  # its earlier tokens read A


@pytest.mark.parametrize("change,match", [
    (dict(num_memory=0), "num_memory=0 must be >= 1"),
    (dict(memory_heads=3), "must be divisible by model.memory_heads=3"),
    (dict(value_init=-1.0), "value_init=-1.0 must be >= 0"),
])
def test_config_refuses(change, match):
  with pytest.raises(ConfigError, match=match):
    ARMTConfig(**change).validate()
