"""The baseline Transformer: streaming equivalence, reset isolation, document masks, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import model_contract as contract
from conftest import rel_err
from longctx.models import TransformerConfig, create_model, list_models

WINDOW = 8


def randint(seed, shape, high=50):
  return jnp.asarray(np.random.default_rng(seed).integers(0, high, shape, dtype=np.int32))


@pytest.fixture(scope="module")
def model():
  """The baseline with the causal token conv over embeddings (the shell's, which adds state); without it, the
  shared contract (tests/test_contract.py) covers the same config."""
  cfg = TransformerConfig(vocab_size=50, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, window=WINDOW,
                          embed_conv=4)
  cfg.validate()
  return create_model(cfg, seed=0)


@pytest.fixture(scope="module")
def step(model):
  """One jitted segment step, shared by the tests (compiled once per input shape)."""
  return contract.make_step(model)


def stream(model, step, tokens, seg, *, segment_ids=None, reset_first=True):
  """Feed `tokens [batch, n]` in segments of `seg`; return the concatenated logits.

  As the lanes do, `reset` is set where a segment's first token starts a document.
  """
  b, n = tokens.shape
  state = jax.jit(model.init_state, static_argnums=0)(b)
  segment_ids = jnp.zeros_like(tokens) if segment_ids is None else segment_ids
  outs = []
  for i in range(0, n, seg):
    starts_doc = segment_ids[:, i] != segment_ids[:, i - 1] if i else jnp.full((b,), reset_first)
    reset = starts_doc
    logits, state = step(tokens[:, i:i + seg], state, reset, segment_ids[:, i:i + seg])
    outs.append(logits)
  return jnp.concatenate(outs, axis=1)


def test_registry_lists_the_baseline():
  assert "transformer" in list_models()
  assert list_models()["transformer"]


@pytest.mark.parametrize("n", [32, 40])
def test_one_segment_equals_four_segments_equals_token_by_token(model, step, n):
  tokens = randint(n, (2, n))
  full = stream(model, step, tokens, n)
  assert rel_err(stream(model, step, tokens, n // 4), full) < 1e-5
  assert rel_err(stream(model, step, tokens, 1), full) < 1e-5
  # Uneven segments: 3, 3, 3, ... tokens.
  assert rel_err(stream(model, step, tokens, 3), full) < 1e-5


def test_streaming_equivalence_with_document_boundaries(model, step):
  """Two documents inside the stream: segmentation does not matter either."""
  tokens = randint(1, (2, 32))
  doc = (jnp.arange(32) >= 13).astype(jnp.int32)[None].repeat(2, 0)  # a document starts at 13
  full = stream(model, step, tokens, 32, segment_ids=doc)
  # Per segment, ids restart at the row's first token; the model normalises them.
  assert rel_err(stream(model, step, tokens, 8, segment_ids=doc), full) < 1e-5
  assert rel_err(stream(model, step, tokens, 1, segment_ids=doc), full) < 1e-5


def test_reset_isolation(model, step):
  """Mixed reset patterns, both directions: reset rows are a fresh start, the others their own stream."""
  contract.reset_isolation(model, step, seg=16, vocab=50)


def test_no_leak_across_document_boundary_inside_a_segment(model, step):
  tokens = randint(5, (1, 24))
  seg_ids = (jnp.arange(24) >= 10).astype(jnp.int32)[None]
  other = tokens.at[0, :10].set((tokens[0, :10] + 7) % 50)  # change only the first document
  state = model.init_state(1)
  a, _ = step(tokens, state, jnp.array([True]), seg_ids)
  b, _ = step(other, state, jnp.array([True]), seg_ids)
  np.testing.assert_array_equal(np.asarray(a[0, 10:]), np.asarray(b[0, 10:]))
  assert not np.allclose(np.asarray(a[0, :10]), np.asarray(b[0, :10]))
  # ... and the cache carried into the next segment does not leak the first document either.
  nxt = randint(6, (1, 8))
  _, sa = step(tokens, state, jnp.array([True]), seg_ids)
  _, sb = step(other, state, jnp.array([True]), seg_ids)
  zeros = jnp.zeros((1, 8), jnp.int32)
  la, _ = step(nxt, sa, jnp.array([False]), zeros)
  lb, _ = step(nxt, sb, jnp.array([False]), zeros)
  np.testing.assert_array_equal(np.asarray(la), np.asarray(lb))


def test_window_limits_what_is_seen(model, step):
  """A token more than `window` positions back has no influence; one inside the window does."""
  tokens = randint(7, (1, 24))
  base = stream(model, step, tokens, 24)
  far = tokens.at[0, 2].set((tokens[0, 2] + 1) % 50)
  # Position 2 is visible (through layers and the token conv) to positions <= 2 + 2 * WINDOW + K-1.
  changed = stream(model, step, far, 24)
  horizon = 2 + 2 * WINDOW + model.embedding.history_len
  np.testing.assert_array_equal(np.asarray(base[0, horizon + 1:]), np.asarray(changed[0, horizon + 1:]))
  assert not np.allclose(np.asarray(base[0, 3]), np.asarray(changed[0, 3]))


def test_gradients_flow_through_the_cache(model):
  """The loss on segment 2 has a gradient w.r.t. the tokens' embeddings used in segment 1."""
  graphdef, params = nnx.split(model)
  tokens = randint(8, (1, 16))

  def loss(params, x1_scale):
    m = nnx.merge(graphdef, params)
    state = m.init_state(1)
    _, state = m(tokens[:, :8], state, reset=jnp.array([True]))
    state = jax.tree.map(lambda s: s * x1_scale if s.dtype == jnp.float32 else s, state)
    logits, _ = m(tokens[:, 8:], state, reset=jnp.array([False]))
    return jnp.sum(logits)

  g_params, g_state = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, 1.0)
  assert abs(float(g_state)) > 0
  norms = [float(jnp.linalg.norm(x)) for x in jax.tree.leaves(g_params)]
  assert all(np.isfinite(norms)) and sum(n > 0 for n in norms) == len(norms)


def test_token_conv_matches_numpy():
  """y_t = e_t + sum_j kernel_j e_{t-j}, dropping taps that reach into another document or an empty slot."""
  from longctx.layers.embedding import token_conv

  rng = np.random.default_rng(0)
  taps, seq, d = 4, 11, 5
  e = rng.normal(size=(2, taps - 1 + seq, d)).astype(np.float32)
  kernel = rng.normal(size=(taps, d)).astype(np.float32)
  doc = np.zeros((2, taps - 1 + seq), np.int32)
  doc[0, :2] = -1  # row 0: only one history slot is filled
  doc[1, taps - 1 + 6:] = 1  # row 1: a document starts at segment position 6
  want = np.zeros((2, seq, d), np.float32)
  for b in range(2):
    for t in range(seq):
      i = taps - 1 + t
      want[b, t] = e[b, i] + sum(kernel[j] * e[b, i - j] for j in range(taps) if doc[b, i - j] == doc[b, i])
  got = np.asarray(token_conv(jnp.asarray(e), jnp.asarray(kernel), jnp.asarray(doc)))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("width", [-1, 1])
def test_embed_conv_width_is_checked(width):
  from longctx.errors import ConfigError

  with pytest.raises(ConfigError, match=r"model.embed_conv=.* must be 0 \(off\) or a width >= 2"):
    TransformerConfig(embed_conv=width).validate()


@pytest.mark.parametrize("kernel", ["pallas", "reference"])
def test_attention_kernels_agree(kernel):
  """model.kernel: the flash kernel in XLA (auto on CPU), its Pallas kernel (interpreted on CPU) and dense
  attention give the same logits and state, with flash blocks smaller than the window and a segment that
  is not a multiple of the block."""
  tokens = randint(21, (2, 27))
  ids = (jnp.arange(27) >= 11).astype(jnp.int32)[None].repeat(2, 0)
  results = {}
  for k in ("xla", kernel):
    cfg = TransformerConfig(vocab_size=50, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, window=WINDOW,
                            kernel=k, attention_block=4)
    model = create_model(cfg, seed=0)
    state = model.init_state(2)
    logits, state = model(tokens[:, :13], state, reset=jnp.ones(2, bool), segment_ids=ids[:, :13])
    logits2, state = model(tokens[:, 13:], state, reset=jnp.zeros(2, bool), segment_ids=ids[:, 13:])
    results[k] = (jnp.concatenate([logits, logits2], axis=1), state["blocks"])
  assert rel_err(results[kernel][0], results["xla"][0]) < 1e-5
  for a, b in zip(jax.tree.leaves(results[kernel][1]), jax.tree.leaves(results["xla"][1])):
    assert rel_err(a, b) < 1e-6


def test_the_kernel_switch_is_one_place():
  """auto is Pallas where its kernel is known to compile (PALLAS_PLATFORMS) and XLA elsewhere; pallas is the TPU
  kernel interpreted on CPU, the platform's own kernel compiled where it is known to compile, refused on any other
  accelerator."""
  from longctx.errors import ConfigError
  from longctx.layers.kernel import AUTO_KEEPS_XLA, OPS, PALLAS_PLATFORMS, compiling_for, resolve

  assert resolve("auto", "attention", platform="cpu").impl == "xla"
  assert resolve("pallas", "attention", platform="cpu").interpret
  assert PALLAS_PLATFORMS["attention"] == ("tpu", "gpu")
  assert resolve("auto", "delta_rule", platform="gpu").impl == "xla"  # its Triton kernel was measured slower
  with compiling_for("tpu"):  # the TPU dry run compiles, on a CPU, the kernels a TPU would run
    assert resolve("auto", "selective_scan", chunk_size=16) == resolve("pallas", "attention", platform="tpu")
    assert not resolve("pallas", "attention").interpret
  assert resolve("auto", "selective_scan", chunk_size=16).impl == "xla"
  # A chunk the platform's kernel cannot run: auto keeps XLA, pallas says why in one line.
  assert resolve("auto", "linear_recurrence", platform="gpu", chunk_size=8).impl == "xla"
  assert resolve("auto", "linear_recurrence", platform="tpu", chunk_size=8).impl == "pallas"
  assert resolve("auto", "selective_scan", platform="tpu", chunk_size=12).impl == "xla"
  with pytest.raises(ConfigError, match=r"the linear_recurrence GPU kernel needs model.chunk_size=24 to be a power"):
    resolve("pallas", "linear_recurrence", platform="gpu", chunk_size=24)
  with pytest.raises(ConfigError, match=r"the selective_scan TPU kernel needs model.chunk_size=12 to be a multiple"):
    resolve("pallas", "selective_scan", platform="cpu", chunk_size=12)
  for op in OPS:
    for platform in ("tpu", "gpu"):
      if platform in PALLAS_PLATFORMS[op]:
        auto = "xla" if platform in AUTO_KEEPS_XLA.get(op, ()) else "pallas"
        assert resolve("auto", op, platform=platform).impl == auto
        assert resolve("pallas", op, platform=platform).impl == "pallas"
        assert not resolve("pallas", op, platform=platform).interpret
      else:
        assert resolve("auto", op, platform=platform).impl == "xla"
        with pytest.raises(ConfigError, match=f"the {op} Pallas kernel is not known to compile on {platform}"):
          resolve("pallas", op, platform=platform)
  with pytest.raises(ConfigError, match="model.kernel='cuda' is not one of"):
    resolve("cuda", "attention")


def test_logit_cap_soft_caps_the_head():
  """`model.logit_cap` (the shell's head, any model): logits = cap * tanh(uncapped / cap), same weights."""
  import dataclasses

  cfg = TransformerConfig(vocab_size=50, d_model=32, num_layers=1, num_heads=4, window=8)
  capped_cfg = dataclasses.replace(cfg, logit_cap=2.0)
  capped_cfg.validate()
  plain, capped = create_model(cfg, seed=0), create_model(capped_cfg, seed=0)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 50, (2, 12)), jnp.int32)
  run = lambda m: m(tokens, m.init_state(2), reset=jnp.ones(2, bool))[0]
  raw, out = run(plain), run(capped)
  assert float(jnp.max(jnp.abs(raw))) > 2.0  # the cap binds somewhere
  assert float(jnp.max(jnp.abs(out))) < 2.0 and rel_err(out, 2.0 * jnp.tanh(raw / 2.0)) < 1e-6
  from longctx.errors import ConfigError

  with pytest.raises(ConfigError, match="logit_cap"):
    dataclasses.replace(cfg, logit_cap=-1.0).validate()
