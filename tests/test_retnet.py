"""RetNet: parallel == recurrent == chunked (xla, pallas), positions, gradients (the shared contract: test_contract.py)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model_contract as contract
from conftest import rel_err
from longctx.errors import ConfigError
from longctx.kernels.linear_recurrence import linear_recurrence_reference
from longctx.models import RetNetConfig, create_model, list_models
from longctx.layers.context import positions_in_document
from longctx.models.retnet import retention_log_decay, retention_parallel

VOCAB = 50
CFG = RetNetConfig(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4, chunk_size=8, embed_conv=4)


@pytest.fixture(scope="module")
def model():
  CFG.validate()
  return create_model(CFG, seed=0)


@pytest.fixture(scope="module")
def step(model):
  return contract.make_step(model)


def test_registered():
  assert "retnet" in list_models()


def test_decay_per_head_follows_the_paper():
  gamma = np.exp(np.asarray(retention_log_decay(4)))
  np.testing.assert_allclose(gamma, [1 - 2.0**-5, 1 - 2.0**-6, 1 - 2.0**-7, 1 - 2.0**-8], rtol=1e-7)


def test_parallel_form_equals_the_recurrence():
  rng = np.random.default_rng(0)
  b, t, h, dk, dv = 2, 23, 3, 4, 6
  q, k = (jnp.asarray(rng.standard_normal((b, t, h, dk)), jnp.float32) for _ in range(2))
  v = jnp.asarray(rng.standard_normal((b, t, h, dv)), jnp.float32)
  seg = jnp.asarray(np.cumsum(rng.random((b, t)) < 0.1, axis=1), jnp.int32)
  s0 = jnp.asarray(rng.standard_normal((b, h, dk, dv)), jnp.float32)
  log_decay = retention_log_decay(h) * 20  # strong decays too
  y, s = retention_parallel(q, k, v, log_decay=log_decay, segment_ids=seg, initial_state=s0)
  ref_y, ref_s = linear_recurrence_reference(q, k, v, log_decay=jnp.broadcast_to(log_decay, (b, t, h)),
                                             segment_ids=seg, initial_state=s0)
  assert rel_err(y, ref_y) < 1e-5 and rel_err(s, ref_s) < 1e-5


def test_positions_restart_at_document_starts():
  q_doc = jnp.array([[0, 0, 0, 1, 1, 2], [0, 0, 0, 0, 0, 0]])
  pos = positions_in_document(q_doc, jnp.array([5, 0]))
  np.testing.assert_array_equal(pos, [[5, 6, 7, 0, 1, 0], [0, 1, 2, 3, 4, 5]])


@pytest.mark.parametrize("form", [dict(retention="parallel"), dict(kernel="reference"), dict(kernel="pallas")],
                         ids=["parallel", "recurrent", "pallas"])
def test_every_form_gives_the_same_logits(model, step, form):
  """Same weights, another retention form (the parallel form; the chunked one as the token-by-token recurrence
  or the Pallas kernel): the logits and state of a stream with documents agree."""
  other = create_model(dataclasses.replace(CFG, **form), seed=0)
  tokens = contract.randint(1, (2, 40), VOCAB)
  ids = jnp.asarray(np.cumsum(np.random.default_rng(2).random((2, 40)) < 0.08, axis=1), jnp.int32)
  ref, ref_state = contract.stream(model, step, tokens, 16, segment_ids=ids)
  out, state = contract.stream(other, contract.make_step(other), tokens, 16, segment_ids=ids)
  assert rel_err(out, ref) < 1e-5
  for a, b in zip(jax.tree.leaves(state["blocks"]), jax.tree.leaves(ref_state["blocks"])):
    assert rel_err(a, b) < 1e-5


def test_gradients_flow_through_the_state(model):
  contract.gradients_reach(model, seg=8, vocab=VOCAB, names=["wk", "wv", "wq"])


@pytest.mark.parametrize("change,match", [
    (dict(retention="flash"), "model.retention='flash'"), (dict(kernel="cuda"), "model.kernel"),
    (dict(value_factor=0), "value_factor"),
    (dict(chunk_size=0), "chunk_size"), (dict(head_dim=7), "even"),
])
def test_config_errors(change, match):
  with pytest.raises(ConfigError, match=match):
    dataclasses.replace(CFG, **change).validate()
