"""The contract's checks can fail: each one against a toy model (or state) carrying the bug it must catch.

The model contract (tests/model_contract.py) is what proves every model streams, resets and shards
correctly, so its own checks are tested here on purpose-built wrong inputs: a check that passes on these
would pass on the same bug in a real model.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model_contract as contract

VOCAB, DIM = 11, 6


class ToyRecurrence:
  """A decayed sum of token embeddings per row: state `h [batch, DIM]`, logits `h @ W` per token.

  `reset_all_rows=True` is the bug: any row's reset resets every row.
  """

  def __init__(self, *, reset_all_rows: bool = False):
    rng = np.random.default_rng(0)
    self.emb = jnp.asarray(rng.standard_normal((VOCAB, DIM)), jnp.float32)
    self.out = jnp.asarray(rng.standard_normal((DIM, VOCAB)), jnp.float32)
    self.reset_all_rows = reset_all_rows

  def init_state(self, batch):
    return {"h": jnp.zeros((batch, DIM), jnp.float32), "seen": jnp.zeros((batch,), jnp.int32)}

  def step(self, tokens, state, reset, segment_ids):
    del segment_ids
    if self.reset_all_rows:
      reset = jnp.broadcast_to(jnp.any(reset), reset.shape)
    h = jnp.where(reset[:, None], 0.0, state["h"])
    seen = jnp.where(reset, 0, state["seen"])
    logits = []
    for t in range(tokens.shape[1]):
      h = 0.5 * h + self.emb[tokens[:, t]]
      logits.append(h @ self.out)
    return jnp.stack(logits, axis=1), {"h": h, "seen": seen + tokens.shape[1]}


def test_reset_isolation_passes_a_correct_model():
  model = ToyRecurrence()
  contract.reset_isolation(model, jax.jit(model.step), seg=4, vocab=VOCAB)


def test_reset_isolation_catches_a_reset_that_reaches_other_rows():
  """The bug of issue 21: the old check looked only at the reset row and compared a non-reset row with
  itself, so a reset of every row passed."""
  model = ToyRecurrence(reset_all_rows=True)
  with pytest.raises(AssertionError, match="a row that did not reset differs from its stream"):
    contract.reset_isolation(model, jax.jit(model.step), seg=4, vocab=VOCAB)


def test_state_comparison_catches_leftover_state_where_the_reference_has_none():
  """The old comparison skipped a float leaf whose reference was all zeros (`or not np.any(b)`)."""
  want = {"buffer": np.zeros((2, 4), np.float32), "h": np.ones((2, 3), np.float32), "n": np.arange(2)}
  contract.assert_states_close(want, want, tol=0.0, what="same")
  leftover = {**want, "buffer": want["buffer"].copy()}
  leftover["buffer"][1, 2] = 1e-3
  with pytest.raises(AssertionError, match="nonzero entries where the reference is zero"):
    contract.assert_states_close(leftover, want, tol=1e-5, what="leftover")
  big = {**want, "h": np.concatenate([np.full((2, 2), 1e3, np.float32), np.zeros((2, 1), np.float32)], axis=1)}
  stray = {**big, "h": big["h"].copy()}
  stray["h"][0, 2] = 1e-4  # tiny against the leaf's norm, but where the reference is exactly zero
  with pytest.raises(AssertionError, match="nonzero entries where the reference is zero"):
    contract.assert_states_close(stray, big, tol=1e-5, what="stray")
  with pytest.raises(AssertionError):
    contract.assert_states_close({**want, "n": np.arange(2) + 1}, want, tol=1e-5, what="ints")
