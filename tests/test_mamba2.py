"""Mamba-2: the model equals a token-by-token numpy port of HF's decode path, every SSD form agrees,
gradients, errors (the shared contract: test_contract.py)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import model_contract as contract
from conftest import rel_err
from longctx.errors import ConfigError
from longctx.models import Mamba2Config, create_model, list_models

VOCAB = 50
CFG = Mamba2Config(vocab_size=VOCAB, d_model=32, num_layers=2, head_dim=16, state_size=8, num_groups=2,
                   chunk_size=8)


@pytest.fixture(scope="module")
def model():
  CFG.validate()
  return create_model(CFG, seed=0)


@pytest.fixture(scope="module")
def step(model):
  return contract.make_step(model)


def test_registered():
  assert "mamba2" in list_models()


def _softplus(x):
  return np.logaddexp(0.0, x)


def _silu(x):
  return x / (1.0 + np.exp(-x))


def _rms(x, w, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def hf_decode_reference(params, cfg, tokens):
  """HF `Mamba2ForCausalLM` run one token at a time with its cache (`causal_conv1d_update`,
  `mamba2_selective_state_update`, `MambaRMSNormGated`), in float64 numpy, HF layouts:
  conv_state `[conv_dim, K]`, ssm_state `[H, P, N]`. One row, one document."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(params))
  di, h, hp, n, g = cfg.d_inner, cfg.resolved_num_heads, cfg.head_dim, cfg.state_size, cfg.num_groups
  eps = cfg.norm_eps
  conv_state = [np.zeros((cfg.conv_dim, cfg.conv_kernel)) for _ in range(cfg.num_layers)]
  ssm_state = [np.zeros((h, hp, n)) for _ in range(cfg.num_layers)]
  table = p["embedding"]["table"]
  out = []
  for tok in tokens:
    x = table[tok]
    for i in range(cfg.num_layers):
      blk = p["blocks"][i]
      mix = blk["mixer"]
      hs = _rms(x, blk["norm"]["scale"], eps)
      proj = mix["in_proj"].T @ hs  # HF in_proj.weight is [proj, d_model]
      gate, xbc, dt = proj[:di], proj[di:di + cfg.conv_dim], proj[di + cfg.conv_dim:]
      conv_state[i] = np.roll(conv_state[i], -1, axis=-1)
      conv_state[i][:, -1] = xbc
      weight = mix["conv_weight"].T  # HF conv1d.weight[:, 0, :] is [conv_dim, K]
      xbc = _silu(np.sum(conv_state[i] * weight, axis=-1) + mix["conv_bias"])
      xs, b, c = xbc[:di].reshape(h, hp), xbc[di:di + g * n].reshape(g, n), xbc[di + g * n:].reshape(g, n)
      dt = _softplus(dt + mix["dt_bias"])  # [H]
      a = -np.exp(mix["A_log"])
      rep = h // g
      b, c = np.repeat(b, rep, axis=0), np.repeat(c, rep, axis=0)  # [H, N]
      ssm_state[i] = ssm_state[i] * np.exp(dt * a)[:, None, None] + (dt[:, None] * xs)[:, :, None] * b[:, None, :]
      y = np.einsum("hpn,hn->hp", ssm_state[i], c) + mix["D"][:, None] * xs
      hgate = y.reshape(di) * _silu(gate)
      y = (_rms(hgate.reshape(g, -1), 1.0, eps).reshape(di)) * mix["norm"]
      x = x + mix["out_proj"].T @ y
    x = _rms(x, p["final_norm"]["scale"], eps)
    out.append(table @ x)
  return np.stack(out), ssm_state


def test_model_equals_the_hf_decode_path(model, step):
  """Chunked SSD over a whole segment == HF's token-by-token cache update, logits and SSM state."""
  tokens = contract.randint(11, (1, 29), VOCAB)
  logits, state = step(tokens, model.init_state(1), jnp.array([True]), jnp.zeros_like(tokens))
  ref, ref_ssm = hf_decode_reference(nnx.state(model, nnx.Param), CFG, np.asarray(tokens[0]))
  assert rel_err(logits[0], ref) < 1e-5
  ours = np.stack([np.asarray(blk["ssm"][0]) for blk in state["blocks"]])  # [L, H, N, P]
  assert rel_err(ours.transpose(0, 1, 3, 2), np.stack(ref_ssm)) < 1e-5


@pytest.mark.parametrize("kernel", ["reference", "pallas"])
def test_every_ssd_form_gives_the_same_logits(model, step, kernel):
  """The chunked SSD in XLA (auto on CPU) against the token scan and the Pallas kernel."""
  other = create_model(dataclasses.replace(CFG, kernel=kernel), seed=0)
  tokens = contract.randint(1, (2, 40), VOCAB)
  ids = jnp.asarray(np.cumsum(np.random.default_rng(2).random((2, 40)) < 0.08, axis=1), jnp.int32)
  ref, ref_state = contract.stream(model, step, tokens, 16, segment_ids=ids)
  out, state = contract.stream(other, contract.make_step(other), tokens, 16, segment_ids=ids)
  assert rel_err(out, ref) < 1e-5
  for a, b in zip(jax.tree.leaves(state["blocks"]), jax.tree.leaves(ref_state["blocks"])):
    assert rel_err(a, b) < 1e-5


def test_gradients_flow_through_the_state(model):
  contract.gradients_reach(model, seg=8, vocab=VOCAB, names=["A_log", "dt_bias", "conv_weight", "in_proj"])


@pytest.mark.parametrize("change,match", [
    (dict(kernel="cuda"), "model.kernel"), (dict(head_dim=24), "head_dim"), (dict(num_heads=3), "num_heads"),
    (dict(num_groups=3), "num_groups"), (dict(state_size=0), "state_size"), (dict(dt_min=0.5), "dt_min"),
])
def test_config_errors(change, match):
  with pytest.raises(ConfigError, match=match):
    dataclasses.replace(CFG, **change).validate()
