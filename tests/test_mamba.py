"""Mamba: the carried causal conv, the model against a token-by-token numpy port of HF's decode path,
every scan form agrees, gradients, errors (the shared contract: test_contract.py)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import model_contract as contract
from conftest import rel_err
from longctx.errors import ConfigError
from longctx.layers.context import Context
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
  hist, start = jnp.zeros((b, k - 1, c)), jnp.zeros((b,), jnp.int32)
  whole, _ = causal_conv1d(jnp.asarray(x), jnp.asarray(w), jnp.asarray(bias), history=hist,
                           history_doc=Context.of(jnp.asarray(doc), start).history_doc(k - 1), doc=jnp.asarray(doc))
  assert rel_err(whole, ref) < 1e-6
  pieces = []
  for lo, hi in [(0, 2), (2, 3), (3, 11), (11, 19)]:
    d = jnp.asarray(doc[:, lo:hi] - doc[:, lo:lo + 1])
    if lo:  # a piece starting a document drops the history, as `reset` does
      start = jnp.where(jnp.asarray(doc[:, lo] == doc[:, lo - 1]), start, 0)
    ctx = Context.of(d, start)  # which history entries are the open document's follows from its position
    y, hist = causal_conv1d(jnp.asarray(x[:, lo:hi]), jnp.asarray(w), jnp.asarray(bias), history=hist,
                            history_doc=ctx.history_doc(k - 1), doc=d)
    start = ctx.end
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
  assert rel_err(np.stack([blk["ssm"][0] for blk in state["blocks"]]), np.stack(ref_ssm)) < 1e-5


@pytest.mark.parametrize("kernel", ["reference", "xla", "pallas"])
def test_every_scan_form_gives_the_same_logits(model, step, kernel):
  """The associative scan (default) against the chunked linear recurrence under every kernel."""
  other = create_model(dataclasses.replace(CFG, scan="chunked", kernel=kernel, chunk_size=8), seed=0)
  tokens = contract.randint(1, (2, 40), VOCAB)
  ids = jnp.asarray(np.cumsum(np.random.default_rng(2).random((2, 40)) < 0.08, axis=1), jnp.int32)
  ref, ref_state = contract.stream(model, step, tokens, 16, segment_ids=ids)
  out, state = contract.stream(other, contract.make_step(other), tokens, 16, segment_ids=ids)
  assert rel_err(out, ref) < 1e-5
  for a, b in zip(jax.tree.leaves(state["blocks"]), jax.tree.leaves(ref_state["blocks"])):
    assert rel_err(a, b) < 1e-5


def test_gradients_flow_through_the_state(model):
  contract.gradients_reach(model, seg=8, vocab=VOCAB,
                           names=["A_log", "dt_bias", "dt_proj", "x_proj", "conv_weight", "in_proj"])


@pytest.mark.parametrize("change,match", [
    (dict(scan="cuda"), "model.scan"), (dict(kernel="cuda"), "model.kernel"), (dict(state_size=0), "state_size"),
    (dict(dt_rank=-1), "dt_rank"),
    (dict(expand=0), "expand"), (dict(dt_min=0.5), "dt_min"),
])
def test_config_errors(change, match):
  with pytest.raises(ConfigError, match=match):
    dataclasses.replace(CFG, **change).validate()
