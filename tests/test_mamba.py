"""Mamba: the carried causal conv, the model against a token-by-token numpy port of HF's decode path,
every scan form agrees, the model contract (streaming, token-by-token, resets, documents), gradients,
sharding, errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import model_contract as contract
from conftest import rel_err
from longctx.errors import ConfigError
from longctx.layers.ssm import causal_conv1d
from longctx.models import MambaConfig, create_model, list_models

VOCAB = 50
CFG = MambaConfig(vocab_size=VOCAB, d_model=32, num_layers=2, state_size=8)


@pytest.fixture(scope="module")
def model():
  CFG.validate()
  return create_model(CFG, seed=0)


@pytest.fixture(scope="module")
def step(model):
  return contract.make_step(model)


def test_registered():
  assert "mamba" in list_models()


def test_causal_conv_in_pieces_equals_one_pass_and_respects_documents():
  """numpy definition (zeros before a document), and cutting the input anywhere changes nothing."""
  rng = np.random.default_rng(0)
  b, t, c, k = 2, 19, 5, 4
  x = rng.standard_normal((b, t, c)).astype(np.float32)
  w = rng.standard_normal((k, c)).astype(np.float32)
  bias = rng.standard_normal((c,)).astype(np.float32)
  doc = np.cumsum(rng.random((b, t)) < 0.15, axis=1).astype(np.int32)
  ref = np.zeros_like(x)
  for r in range(b):
    for i in range(t):
      taps = [x[r, i - (k - 1) + j] * w[j] if i - (k - 1) + j >= 0 and doc[r, i - (k - 1) + j] == doc[r, i]
              else np.zeros(c)
              for j in range(k)]
      ref[r, i] = bias + np.sum(taps, axis=0)
  hist, valid = jnp.zeros((b, k - 1, c)), jnp.zeros((b, k - 1), bool)
  whole, _, _ = causal_conv1d(jnp.asarray(x), jnp.asarray(w), jnp.asarray(bias), history=hist, history_valid=valid,
                              doc=jnp.asarray(doc))
  assert rel_err(whole, ref) < 1e-6
  pieces = []
  for lo, hi in [(0, 2), (2, 3), (3, 11), (11, 19)]:
    d = jnp.asarray(doc[:, lo:hi] - doc[:, lo:lo + 1])
    if lo:  # a piece starting a document drops the history, as `reset` does
      valid = valid & jnp.asarray(doc[:, lo] == doc[:, lo - 1])[:, None]
    y, hist, valid = causal_conv1d(jnp.asarray(x[:, lo:hi]), jnp.asarray(w), jnp.asarray(bias), history=hist,
                                   history_valid=valid, doc=d)
    pieces.append(y)
  assert rel_err(jnp.concatenate(pieces, axis=1), ref) < 1e-6


def _softplus(x):
  return np.logaddexp(0.0, x)


def _silu(x):
  return x / (1.0 + np.exp(-x))


def _rms(x, w, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def hf_decode_reference(params, cfg, tokens):
  """HF `MambaForCausalLM` one token at a time with its cache (`causal_conv1d_update`,
  `mamba_selective_state_update`), float64 numpy, HF layouts (in_proj.weight `[2 d_inner, d]`,
  conv1d.weight `[d_inner, 1, K]`, ssm_state `[d_inner, N]`). One row, one document."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(params))
  di, n, r = cfg.d_inner, cfg.state_size, cfg.resolved_dt_rank
  conv_state = [np.zeros((di, cfg.conv_kernel)) for _ in range(cfg.num_layers)]
  ssm_state = [np.zeros((di, n)) for _ in range(cfg.num_layers)]
  table = p["embedding"]["table"]
  out = []
  for tok in tokens:
    h = table[tok]
    for i in range(cfg.num_layers):
      blk = p["blocks"][i]
      mix = blk["mixer"]
      proj = mix["in_proj"].T @ _rms(h, blk["norm"]["scale"], cfg.norm_eps)
      x, gate = proj[:di], proj[di:]
      conv_state[i] = np.roll(conv_state[i], -1, axis=-1)
      conv_state[i][:, -1] = x
      x = _silu(np.sum(conv_state[i] * mix["conv_weight"].T, axis=-1) + mix["conv_bias"])
      xdb = mix["x_proj"].T @ x
      time_step, b, c = xdb[:r], xdb[r:r + n], xdb[r + n:]
      dt = _softplus(mix["dt_proj"].T @ time_step + mix["dt_bias"])  # HF dt_proj: weight [d_inner, R], bias
      a = -np.exp(mix["A_log"])
      ssm_state[i] = ssm_state[i] * np.exp(dt[:, None] * a) + (dt * x)[:, None] * b[None, :]
      y = (ssm_state[i] @ c + mix["D"] * x) * _silu(gate)
      h = h + mix["out_proj"].T @ y
    out.append(table @ _rms(h, p["final_norm"]["scale"], cfg.norm_eps))
  return np.stack(out), ssm_state


def test_model_equals_the_hf_decode_path(model, step):
  tokens = contract.randint(11, (1, 29), VOCAB)
  logits, state = step(tokens, model.init_state(1), jnp.array([True]), jnp.zeros_like(tokens))
  ref, ref_ssm = hf_decode_reference(nnx.state(model, nnx.Param), CFG, np.asarray(tokens[0]))
  assert rel_err(logits[0], ref) < 1e-5
  assert rel_err(state["ssm"][0], np.stack(ref_ssm)) < 1e-5


@pytest.mark.parametrize("impl", ["reference", "xla", "pallas"])
def test_every_scan_form_gives_the_same_logits(model, step, impl):
  other = create_model(dataclasses.replace(CFG, scan_impl=impl, chunk_size=8), seed=0)
  tokens = contract.randint(1, (2, 40), VOCAB)
  ids = jnp.asarray(np.cumsum(np.random.default_rng(2).random((2, 40)) < 0.08, axis=1), jnp.int32)
  ref, ref_state = contract.stream(model, step, tokens, 16, segment_ids=ids)
  out, state = contract.stream(other, contract.make_step(other), tokens, 16, segment_ids=ids)
  assert rel_err(out, ref) < 1e-5
  assert rel_err(state["ssm"], ref_state["ssm"]) < 1e-5


def test_segments_and_token_by_token_equal_one_pass(model, step):
  ids = (jnp.arange(48) >= 21).astype(jnp.int32)[None].repeat(2, 0)
  contract.segment_invariance(model, step, n=48, segs=[1, 2, 5, 16], vocab=VOCAB)
  contract.segment_invariance(model, step, n=48, segs=[1, 7, 16], vocab=VOCAB, segment_ids=ids)


def test_reset_isolation(model, step):
  contract.reset_isolation(model, step, seg=8, vocab=VOCAB)


@pytest.mark.parametrize("boundary", [16, 18, 21])
def test_no_leak_across_documents(model, step, boundary):
  contract.no_leak_across_documents(model, step, seg=16, boundary=boundary, vocab=VOCAB)


def test_memory_carries(model, step):
  contract.memory_carries(model, step, seg=8, vocab=VOCAB, horizon=16)


def test_gradients_flow_through_the_state(model):
  contract.gradients_reach(model, seg=8, vocab=VOCAB,
                           names=["A_log", "dt_bias", "dt_proj", "x_proj", "conv_weight", "in_proj"])


def test_sharded_matches_one_device(eight_devices):
  cfg = MambaConfig(vocab_size=259, d_model=32, num_layers=2, state_size=8)
  contract.sharded_matches_one_device(cfg, eight_devices, seg_len=16)


@pytest.mark.parametrize("change,match", [
    (dict(scan_impl="cuda"), "scan_impl"), (dict(state_size=0), "state_size"), (dict(dt_rank=-1), "dt_rank"),
    (dict(expand=0), "expand"), (dict(dt_min=0.5), "dt_min"),
])
def test_config_errors(change, match):
  with pytest.raises(ConfigError, match=match):
    dataclasses.replace(CFG, **change).validate()
