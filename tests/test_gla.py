"""GLA: the layer's gate and recurrence against a float64 token loop (per-channel decays, documents, a carried
state), and the gradients of the chunked form against the token scan. The streaming contract (any cut,
reset, no leak, sharded) is tests/test_contract.py's."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import rel_err
from longctx.errors import ConfigError
from longctx.layers.context import Context
from longctx.models import GLAConfig, create_model

B, S = 2, 21
CFG = GLAConfig(vocab_size=50, d_model=32, num_layers=1, num_heads=2, gate_rank=4, chunk_size=8, kernel="xla")


@pytest.fixture(scope="module")
def mixer():
  CFG.validate()
  return create_model(CFG, seed=0).blocks[0].mixer


def numpy_layer(mixer, x, seg, s0):
  """float64, token by token: q, k, v, the low-rank sigmoid gate / tau per key channel, S = diag(a) S + k^T v,
  o = q S, per-head RMSNorm times swish(x W_r), W_o; a new document restarts from zero."""
  cfg = mixer.cfg
  w = lambda p: np.asarray(p[...], np.float64)
  proj = lambda p: np.einsum("bsd,dhk->bshk", x, w(p))
  q, k, v, r = proj(mixer.wq) / np.sqrt(cfg.key_dim), proj(mixer.wk), proj(mixer.wv), proj(mixer.wr)
  logits = np.einsum("bsr,rhk->bshk", x @ w(mixer.wa1), w(mixer.wa2)) + w(mixer.ba)
  a = (1 / (1 + np.exp(-logits))) ** (1 / cfg.gate_temperature)
  o = np.zeros(v.shape)
  s = s0.copy()
  for b in range(B):
    for t in range(S):
      if t > 0 and seg[b, t] != seg[b, t - 1]:
        s[b] = 0
      s[b] = a[b, t][..., None] * s[b] + np.einsum("hk,hv->hkv", k[b, t], v[b, t])
      o[b, t] = np.einsum("hk,hkv->hv", q[b, t], s[b])
  y = o / np.sqrt(np.mean(o * o, -1, keepdims=True) + cfg.norm_eps) * w(mixer.norm) * (r / (1 + np.exp(-r)))
  return np.einsum("bshv,hvd->bsd", y, w(mixer.wo)), s


def run(mixer, x, seg, s0, kernel):
  mixer = nnx.clone(mixer)  # the module fixture keeps its own kernel
  mixer.cfg = dataclasses.replace(mixer.cfg, kernel=kernel)
  ctx = Context.of(jnp.asarray(seg), jnp.zeros((B,), jnp.int32))
  return mixer(jnp.asarray(x, jnp.float32), {"s": jnp.asarray(s0, jnp.float32)}, ctx)


def inputs(seed):
  rng = np.random.default_rng(seed)
  seg = np.zeros((B, S), np.int32)
  seg[0, 7:] = 1
  seg[0, 15:] = 2
  seg[1, 12:] = 1
  return rng.standard_normal((B, S, 32)), seg, 0.3 * rng.standard_normal((B, 2, CFG.key_dim, CFG.value_dim))


@pytest.mark.parametrize("kernel", ["reference", "xla"])
def test_layer_equals_the_float64_token_loop(mixer, kernel):
  x, seg, s0 = inputs(0)
  y, state = run(mixer, x, seg, s0, kernel)
  y_ref, s_ref = numpy_layer(mixer, x, seg, s0)
  assert rel_err(y, y_ref) < 1e-5 and rel_err(state["s"], s_ref) < 1e-5


def test_chunked_gradients_equal_the_token_scan(mixer):
  """Gradients w.r.t. the input, every parameter (the gate's low-rank maps and bias included) and the carried
  state of the chunked form (chunks of 8 over 21 tokens, documents inside chunks) equal the token scan's."""
  x, seg, s0 = inputs(1)
  graphdef, params = nnx.split(mixer)
  cot = np.random.default_rng(2).standard_normal((B, S, 32))

  def loss(params, x, s0, kernel):
    m = nnx.merge(graphdef, params)
    y, state = run(m, x, seg, s0, kernel)
    return jnp.sum(y * cot) + jnp.sum(jnp.sin(state["s"]))

  args = (params, jnp.asarray(x, jnp.float32), jnp.asarray(s0, jnp.float32))
  g = jax.grad(loss, argnums=(0, 1, 2))(*args, "xla")
  g_ref = jax.grad(loss, argnums=(0, 1, 2))(*args, "reference")
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    assert float(jnp.linalg.norm(b)) > 0
    assert rel_err(a, b) < 1e-4


@pytest.mark.parametrize("change,match", [
    (dict(gate_rank=0), "gate_rank"), (dict(chunk_size=0), "chunk_size"), (dict(gate_temperature=0.0), "temperature"),
    (dict(key_expand=0.3), "key_expand"), (dict(value_expand=0.0), "value_expand"), (dict(head_dim=8), "head_dim"),
])
def test_config_errors(change, match):
  with pytest.raises(ConfigError, match=match):
    dataclasses.replace(CFG, **change).validate()
