"""Griffin: the recurrent block (conv, gates, RG-LRU) against a float64 token loop (documents inside the segment,
a carried state and conv history), the diagonal recurrence's associative scan and its gradients against the
token scan, the bounded sqrt derivative, the config's refusals. The streaming contract (any cut, reset, no
leak, sharded with its context-parallel form) is tests/test_contract.py's; logits parity with transformers'
RecurrentGemma, export and import-hf, are tests/test_export.py's."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import rel_err
from longctx.errors import ConfigError
from longctx.layers.context import Context
from longctx.layers.recurrence import diagonal_recurrence
from longctx.models import GriffinConfig, create_model
from longctx.models.griffin import sqrt_bound_derivative

B, S, K = 2, 19, 4
CFG = GriffinConfig(vocab_size=50, d_model=32, num_layers=1, num_heads=2, lru_width=48, window=8,
                    block_types="recurrent", kernel="xla")


@pytest.fixture(scope="module")
def mixer():
  CFG.validate()
  return create_model(CFG, seed=0).blocks[0].mixer


def gelu(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def numpy_block(mixer, x, seg, start, conv0, h0):
  """float64, token by token: the y branch, the conv over x W_x (reading only its own document's inputs), the
  gates, a = exp(-8 r softplus(Lambda)), h = a h + sqrt(1 - a^2) i u (h = i u at a document's first token)."""
  w = lambda p: np.asarray(p[...], np.float64)
  heads, bw = w(mixer.b_input).shape
  proj = lambda p, b: np.einsum("bsd,dhk->bshk", x, w(p)) + w(b)
  y, xw = gelu(proj(mixer.wy, mixer.by)), proj(mixer.wx, mixer.bx)
  conv = w(mixer.conv)
  out = np.zeros((B, S, heads, bw))
  h_last = np.zeros((B, heads, bw))
  for b in range(B):
    hist_doc = [0 if i >= K - 1 - start[b] else -1 for i in range(K - 1)]
    full, full_doc = np.concatenate([conv0[b], xw[b]]), hist_doc + list(seg[b])
    h = h0[b].copy()
    first = 0
    for t in range(S):
      if t > 0 and seg[b, t] != seg[b, t - 1]:
        first = t
      pos = start[b] + t if seg[b, t] == 0 else t - first
      u = w(mixer.conv_bias) + sum(conv[i] * full[t + i] for i in range(K) if full_doc[t + i] == seg[b, t])
      gate = lambda wt, bias: 1 / (1 + np.exp(-(np.einsum("hi,hij->hj", u, w(wt)) + w(bias))))
      a = np.exp(-8 * gate(mixer.w_a, mixer.b_a) * np.log1p(np.exp(w(mixer.a_param))))
      i_u = gate(mixer.w_input, mixer.b_input) * u
      h = i_u if pos == 0 else a * h + np.sqrt(1 - a * a) * i_u
      out[b, t] = h
    h_last[b] = h
  return np.einsum("bshk,hkd->bsd", out * y, w(mixer.wo)) + w(mixer.bo), h_last


def inputs(seed):
  rng = np.random.default_rng(seed)
  seg = np.zeros((B, S), np.int32)
  seg[0, 6:] = 1
  seg[0, 9:] = 2
  seg[1, 13:] = 1
  start = np.array([5, 2], np.int32)  # lane 1: only the last 2 of the 3 conv inputs carried belong to its document
  heads, bw = CFG.num_heads, CFG.lru_width // CFG.num_heads
  return (rng.standard_normal((B, S, 32)), seg, start, rng.standard_normal((B, K - 1, heads, bw)),
          0.5 * rng.standard_normal((B, heads, bw)))


@pytest.mark.parametrize("kernel", ["reference", "xla"])
def test_recurrent_block_equals_the_float64_token_loop(mixer, kernel):
  x, seg, start, conv0, h0 = inputs(0)
  run = nnx.clone(mixer)  # the module fixture keeps its own kernel
  run.cfg = dataclasses.replace(CFG, kernel=kernel)
  ctx = Context.of(jnp.asarray(seg), jnp.asarray(start))
  y, state = run(jnp.asarray(x, jnp.float32), {"conv": jnp.asarray(conv0, jnp.float32),
                                               "h": jnp.asarray(h0, jnp.float32)}, ctx)
  y_ref, h_ref = numpy_block(mixer, x, seg, start, conv0, h0)
  assert rel_err(y, y_ref) < 1e-5 and rel_err(state["h"], h_ref) < 1e-5
  np.testing.assert_allclose(np.asarray(state["conv"])[0], (np.einsum(
      "sd,dhk->shk", x[0], np.asarray(mixer.wx[...])) + np.asarray(mixer.bx[...]))[-(K - 1):], rtol=1e-5, atol=1e-6)


def test_associative_scan_and_its_gradients_equal_the_token_scan():
  """Values and gradients w.r.t. a (document starts as a = 0 included), x and the initial state."""
  rng = np.random.default_rng(1)
  a = rng.uniform(0.5, 1.0, (2, 37, 3, 4))
  a[0, 11] = a[1, 30] = 0.0
  x, h0 = rng.standard_normal((2, 37, 3, 4)), rng.standard_normal((2, 3, 4))
  cot = rng.standard_normal((2, 37, 3, 4))

  def loss(a, x, h0, kernel):
    h, last = diagonal_recurrence(a, x, initial_state=h0, kernel=kernel)
    return jnp.sum(h * cot) + jnp.sum(jnp.sin(last))

  args = tuple(jnp.asarray(v, jnp.float32) for v in (a, x, h0))
  for kernel in ("xla", "auto"):
    h, last = diagonal_recurrence(*args[:2], initial_state=args[2], kernel=kernel)
    h_ref, last_ref = diagonal_recurrence(*args[:2], initial_state=args[2], kernel="reference")
    assert rel_err(h, h_ref) < 1e-6 and rel_err(last, last_ref) < 1e-6
    g = jax.grad(loss, argnums=(0, 1, 2))(*args, kernel)
    g_ref = jax.grad(loss, argnums=(0, 1, 2))(*args, "reference")
    for ga, gb in zip(g, g_ref):
      assert float(jnp.linalg.norm(gb)) > 0 and rel_err(ga, gb) < 1e-5


def test_sqrt_derivative_is_bounded_near_zero():
  grad = jax.grad(lambda x: sqrt_bound_derivative(x, 1000.0))
  assert float(grad(jnp.float32(0.0))) == pytest.approx(1000.0)
  assert float(grad(jnp.float32(0.25))) == pytest.approx(1.0)  # 1 / (2 sqrt(x)) where that is below the cap
  assert float(sqrt_bound_derivative(jnp.float32(0.25), 1000.0)) == pytest.approx(0.5)


def test_layer_pattern_repeats_the_block_types():
  cfg = GriffinConfig(num_layers=5)
  assert cfg.layer_pattern() == ["rglru", "rglru", "local_attention", "rglru", "rglru"]
  assert GriffinConfig(num_layers=2, block_types="recurrent").layer_pattern() == ["rglru", "rglru"]


@pytest.mark.parametrize("change,match", [
    (dict(block_types="recurrent,mlp"), "block_types='recurrent,mlp' must be a comma-separated pattern"),
    (dict(lru_width=30), "lru_width=30 must be a positive multiple of model.num_heads=4"),
    (dict(rope_fraction=0.3), "rope_fraction=0.3 x head_dim=32 must be an even number"),
    (dict(kernel="pallas"), "RG-LRU scan has no Pallas kernel"),
    (dict(conv_width=0), "conv_width=0 must be >= 1"),
])
def test_config_refuses(change, match):
  with pytest.raises(ConfigError, match=match):
    GriffinConfig(**change).validate()
