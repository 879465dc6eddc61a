"""Block-Recurrent Transformer: the model contract, both gates against numpy, and config errors."""

import jax.numpy as jnp
import numpy as np
import pytest

import model_contract as contract
from conftest import rel_err
from longctx.errors import ConfigError, LongctxError
from longctx.models import create_model, list_models
from longctx.models.block_recurrent import (
    BlockRecurrent, BlockRecurrentConfig, cosine_attention, fixed_gate, lstm_gate)

VOCAB, WINDOW, BLOCK, STATES, LAYERS = 50, 8, 8, 4, 2


def tiny_config(**kw):
  kw = dict(dict(vocab_size=VOCAB, d_model=32, num_layers=LAYERS, num_heads=4, num_kv_heads=2, window=WINDOW,
                 block_len=BLOCK, num_states=STATES), **kw)
  cfg = BlockRecurrentConfig(**kw)
  cfg.validate()
  return cfg


@pytest.fixture(scope="module")
def model():  # meliad's recommended setting: fixed gate, no state FFN; recurrent layer -2 = layer 0
  return create_model(tiny_config(), seed=0)


@pytest.fixture(scope="module")
def step(model):
  return contract.make_step(model)


def test_registered():
  assert "block_recurrent" in list_models()


def test_state_shape(model):
  state = model.init_state(3)["blocks"][0]["state"]
  assert state.shape == (3, STATES, 32) and state.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(model.fresh_state(3)["blocks"][0]["state"][1]),
                                np.asarray(model.blocks[0].mixer.initial_state[...]))
  assert "state" not in model.init_state(3)["blocks"][1]  # layer 1 is a baseline block
  assert isinstance(model, BlockRecurrent)


# ----------------------------------------------------------------------------- the model contract


class TestTail(contract.BlockwiseTailContract):
  VOCAB, BLOCK = VOCAB, BLOCK
  HORIZON = LAYERS * WINDOW  # the XL cache


def test_gradients_flow_through_the_recurrence(model):
  # The last segment is one block: its own state update reaches no logit, and the initial state is read
  # only at the first segment's reset, so these gradients crossed the carried state.
  flat = contract.gradients_reach(model, seg=BLOCK, vocab=VOCAB,
                                  names=["initial_state", "state_ids", "state_gate", "state_cross_wq"])
  assert not any("state" in p for p in flat if p.startswith("['blocks'][1]"))  # layer 1 is a baseline block


class TestLstmContract(contract.BlockwiseContract):
  """The other gate, with the state FFN (its own gate), on the last layer, and a token conv."""
  VOCAB, BLOCK = VOCAB, BLOCK
  HORIZON = LAYERS * WINDOW + 2  # the XL cache, plus the conv's history of embed_conv - 1 tokens

  @pytest.fixture(scope="class")
  @classmethod
  def model(cls):
    return create_model(tiny_config(gate="lstm", state_ffn=True, recurrent_layers=[1], embed_conv=3), seed=1)

  @pytest.fixture(scope="class")
  @classmethod
  def step(cls, model):
    return contract.make_step(model)

  def test_gradients_flow_through_the_recurrence(self, model):
    flat = contract.gradients_reach(model, seg=BLOCK, vocab=VOCAB,
                                    names=["initial_state", "state_ids", "state_gate", "state_ffn_gate"])
    assert {"w_input", "b_input", "w_forget", "b_forget"} <= {p.split("'")[-2] for p in flat if "state_gate" in p}


# ----------------------------------------------------------------------------- pieces against numpy


def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


def test_fixed_gate_matches_numpy():
  rng = np.random.default_rng(0)
  state, update, bias = rng.normal(size=(2, 3, 5)), rng.normal(size=(2, 3, 5)), rng.normal(size=(5,))
  g = _sigmoid(bias)
  want = state * g + update * (1 - g)
  got = fixed_gate(jnp.asarray(state, jnp.float32), jnp.asarray(update, jnp.float32),
                   bias=jnp.asarray(bias, jnp.float32))
  assert rel_err(got, want) < 1e-6


def test_lstm_gate_matches_numpy():
  rng = np.random.default_rng(1)
  state, update, hidden = rng.normal(size=(2, 3, 5)), rng.normal(size=(2, 3, 5)), rng.normal(size=(2, 3, 7))
  w_i, w_f, b_i, b_f = rng.normal(size=(7, 5)), rng.normal(size=(7, 5)), rng.normal(size=5), rng.normal(size=5)
  f = _sigmoid(hidden @ w_f + b_f + 1)
  i = _sigmoid(hidden @ w_i + b_i - 1)
  want = state * f + update * i
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  got = lstm_gate(f32(state), f32(update), f32(hidden), w_input=f32(w_i), b_input=f32(b_i), w_forget=f32(w_f),
                  b_forget=f32(b_f))
  assert rel_err(got, want) < 1e-5


def test_cosine_attention_matches_numpy():
  rng = np.random.default_rng(2)
  q, k, v = rng.normal(size=(1, 3, 4, 8)), rng.normal(size=(1, 5, 2, 8)), rng.normal(size=(1, 5, 2, 8))
  scale = np.array([1.0, -2.0, 3.0, 0.5])  # the absolute value is used
  q_doc, k_doc = np.array([[0, 1, 1]]), np.array([[0, 1, 0, 1, -1]])  # a query sees the keys of its document
  mask = q_doc[:, :, None] == k_doc[:, None, :]
  qn = q / np.linalg.norm(q, axis=-1, keepdims=True)
  kn = k / np.linalg.norm(k, axis=-1, keepdims=True)
  want = np.zeros_like(q)
  for hd in range(4):
    kv = hd // 2  # query head h reads kv head h // (h / kv)
    s = np.abs(scale[hd]) * qn[0, :, hd] @ kn[0, :, kv].T
    s = np.where(mask[0], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want[0, :, hd] = p @ v[0, :, kv]
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  for kernel in ("reference", "xla"):
    got = cosine_attention(f32(q), f32(k), f32(v), scale=f32(scale), q_doc=jnp.asarray(q_doc),
                           k_doc=jnp.asarray(k_doc), kernel=kernel)
    assert rel_err(got, want) < 1e-5, kernel


def test_flops_count_the_state_path():
  cfg = tiny_config()
  from longctx.models import TransformerConfig, get_model_class

  base = get_model_class("transformer").flops_per_token(
      TransformerConfig(vocab_size=VOCAB, d_model=32, num_layers=LAYERS, num_heads=4, num_kv_heads=2,
                        window=WINDOW), seg_len=32)
  ours = BlockRecurrent.flops_per_token(cfg, seg_len=32)
  more = BlockRecurrent.flops_per_token(tiny_config(num_states=16), seg_len=32)
  lstm = BlockRecurrent.flops_per_token(tiny_config(gate="lstm", state_ffn=True), seg_len=32)
  assert base < ours < more and ours < lstm


def test_errors_are_clear(model):
  with pytest.raises(LongctxError, match="not a multiple of model.block_len=8"):
    model(jnp.zeros((2, 12), jnp.int32), model.init_state(2), reset=jnp.ones((2,), bool))
  with pytest.raises(ConfigError, match="recurrent_layers.*out of range"):
    BlockRecurrentConfig(num_layers=2, recurrent_layers=[2]).validate()
  with pytest.raises(ConfigError, match="recurrent_layers.*twice"):
    BlockRecurrentConfig(num_layers=2, recurrent_layers=[1, -1]).validate()
  with pytest.raises(ConfigError, match="recurrent_layers"):
    BlockRecurrentConfig(recurrent_layers=[]).validate()
  with pytest.raises(ConfigError, match="num_states"):
    BlockRecurrentConfig(num_states=0).validate()
  with pytest.raises(ConfigError, match="model.gate='gru'"):
    BlockRecurrentConfig(gate="gru").validate()
