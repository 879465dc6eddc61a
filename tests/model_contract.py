"""Checks every model must pass (docs/contracts.md section 1), shared by the per-model test files.

Each function takes a model (or its config) and asserts one contract:
  segment_invariance     a stream cut into segments of any allowed length gives the same logits
  reset_isolation        after `reset`, a row does not depend on its previous document; other rows keep theirs
  no_leak_across_documents  a document starting inside a segment never sees the one before it
  memory_carries         with reset off, the next segment does depend on the previous one (memory is used)
  gradients_reach        the loss of a later segment has a gradient w.r.t. named parameters (through the state)
  sharded_matches_one_device  the train step on an 8-device mesh equals 1 device

tests/test_contract.py runs them for every registered model on its tiny config. `BlockwiseTailContract`
adds the tail check of the blockwise memory models (RMT, Block-Recurrent, Memorizing, MELODI), and
`BlockwiseContract` bundles it with the shared checks for a model variant a test module builds itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import rel_err


def randint(seed, shape, high):
  return jnp.asarray(np.random.default_rng(seed).integers(0, high, shape, dtype=np.int32))


def make_step(model):
  """One jitted segment step (compiled once per input shape)."""
  graphdef, params = nnx.split(model)

  @jax.jit
  def run(tokens, state, reset, segment_ids):
    return nnx.merge(graphdef, params)(tokens, state, reset=reset, segment_ids=segment_ids)

  return run


def stream(model, step, tokens, seg, *, segment_ids=None, state=None, reset_first=True):
  """Feed `tokens [batch, n]` in segments of `seg`; returns (logits [batch, n, vocab], state).

  As the lanes do, per-segment ids restart at 0 and `reset` is set where a
  segment's first token starts a document.
  """
  b, n = tokens.shape
  state = model.init_state(b) if state is None else state
  ids = jnp.zeros_like(tokens) if segment_ids is None else segment_ids
  outs = []
  for i in range(0, n, seg):
    reset = ids[:, i] != ids[:, i - 1] if i else jnp.full((b,), reset_first)
    seg_ids = ids[:, i:i + seg] - ids[:, i:i + 1]
    logits, state = step(tokens[:, i:i + seg], state, reset, seg_ids)
    assert np.all(np.isfinite(np.asarray(logits))), f"non-finite logits in the segment at token {i}"
    outs.append(logits)
  return jnp.concatenate(outs, axis=1), state


def assert_states_close(got, want, *, tol, what):
  """Every leaf of two state pytrees alike: integer and bool leaves equal; float leaves within `tol`
  (relative, over the leaf) *and* zero exactly where `want` is zero, so leftover state where the reference
  has none (an unflushed buffer, a slot that should be empty) fails even if the rest of the leaf is large.

  (Mutation, by hand: adding 1e-3 to a zero slot of a cut stream's state passed the old check, which
  skipped any leaf whose reference was all zeros; it fails this one: tests/test_contract_checks.py.)"""
  got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
  assert len(got_leaves) == len(want_leaves), f"{what}: the state pytrees differ in structure"
  for i, (a, b) in enumerate(zip(got_leaves, want_leaves)):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: state leaf {i} is {a.shape} {a.dtype}, not {b.shape}"
    if not jnp.issubdtype(b.dtype, jnp.floating):
      np.testing.assert_array_equal(a, b, err_msg=f"{what}: state leaf {i}")
      continue
    assert np.all(np.isfinite(b)) and np.all(np.isfinite(a)), (
        f"{what}: state leaf {i} {b.shape} is not finite (the model diverged; equal NaNs compare equal)")
    stray = (b == 0) & (a != 0)
    assert not np.any(stray), (f"{what}: state leaf {i} {b.shape} has {int(stray.sum())} nonzero entries where the "
                               f"reference is zero (largest {np.max(np.abs(a[stray])):.2e})")
    if np.any(b):
      assert rel_err(a, b) <= tol, f"{what}: state leaf {i} {b.shape} differs: relative error {rel_err(a, b):.2e}"


def segment_invariance(model, step, *, n, segs, vocab, tol=1e-5, segment_ids=None):
  tokens = randint(n, (2, n), vocab)
  full, full_state = stream(model, step, tokens, n, segment_ids=segment_ids)
  for seg in segs:
    cut, cut_state = stream(model, step, tokens, seg, segment_ids=segment_ids)
    assert rel_err(cut, full) < tol, f"segments of {seg} differ from one pass of {n}"
    assert_states_close(cut_state, full_state, tol=tol, what=f"the state after segments of {seg}")


def _rows(tree, rows):
  return jax.tree.map(lambda x: np.asarray(x)[np.asarray(rows)], tree)


# Reset patterns over four rows: one row, the others, every row, none.
RESET_PATTERNS = ([True, False, False, False], [False, True, True, False], [True, True, True, True],
                  [False, False, False, False])


def reset_isolation(model, step, *, seg, vocab, prev_segments=2):
  """Both directions, per row, for mixed reset patterns over 4 rows that each carry their own history:
  a row that resets gives exactly the logits and next state of a fresh start (whatever came before), and a
  row that does not gives exactly those of its uninterrupted stream.

  (Mutation, by hand: a RetNet whose reset of any row reset every row passed the old check, which looked
  at the reset row only and at a non-reset row against itself; it fails this one, the non-reset rows
  then equal a fresh start instead of their stream.)"""
  rows = 4
  prev = randint(2, (rows, prev_segments * seg), vocab)
  other_prev = randint(3, (rows, prev_segments * seg), vocab)
  nxt = randint(4, (rows, seg), vocab)
  zeros = jnp.zeros((rows, seg), jnp.int32)
  _, state = stream(model, step, prev, seg)
  _, other_state = stream(model, step, other_prev, seg)
  fresh_logits, fresh_state = step(nxt, model.init_state(rows), jnp.ones(rows, bool), zeros)
  cont_logits, cont_state = step(nxt, state, jnp.zeros(rows, bool), zeros)
  # (Titans MAC without its inner-update clip diverged here, its logits NaN on both sides, which
  # assert_array_equal calls equal; the non-finite check is what caught it.)
  assert np.all(np.isfinite(np.asarray(cont_logits))), "non-finite logits after the reference segments"
  for pattern in RESET_PATTERNS:
    reset = np.array(pattern)
    for history in (state, other_state):
      logits, new_state = step(nxt, history, jnp.asarray(reset), zeros)
      if reset.any():  # a reset row: a fresh start, whatever its history
        np.testing.assert_array_equal(np.asarray(logits)[reset], np.asarray(fresh_logits)[reset],
                                      err_msg=f"reset {pattern}: a reset row's logits differ from a fresh start")
        assert_states_close(_rows(new_state, reset), _rows(fresh_state, reset), tol=0.0,
                            what=f"reset {pattern}: a reset row's next state vs a fresh start")
    logits, new_state = step(nxt, state, jnp.asarray(reset), zeros)
    keep = ~reset
    if keep.any():  # a row that does not reset: its own stream, untouched by the other rows' resets
      np.testing.assert_array_equal(np.asarray(logits)[keep], np.asarray(cont_logits)[keep],
                                    err_msg=f"reset {pattern}: a row that did not reset differs from its stream")
      assert_states_close(_rows(new_state, keep), _rows(cont_state, keep), tol=0.0,
                          what=f"reset {pattern}: a row that did not reset vs its stream")


def memory_carries(model, step, *, seg, vocab, horizon, segments=4):
  """The logits more than `horizon` tokens (num_layers x window: the XL cache's reach) after a
  changed token still change: information crossed that distance through the memory."""
  n = segments * seg
  assert n > horizon + 2, "stream too short to look beyond the horizon"
  tokens = randint(9, (2, n), vocab)
  other = tokens.at[:, 1].set((tokens[:, 1] + 1) % vocab)
  a, _ = stream(model, step, tokens, seg)
  b, _ = stream(model, step, other, seg)
  beyond = slice(horizon + 2, None)
  assert not np.allclose(np.asarray(a[:, beyond]), np.asarray(b[:, beyond]), atol=1e-6), \
      "nothing beyond the XL horizon depends on the changed token: the memory carries nothing"


def memory_reaches_the_tail(model, step, *, seg, vocab, horizon, next_start, tail=4, changed=4):
  """A document's last tokens still depend, through the memory, on its first ones, wherever the next
  document starts (`next_start`: at a block boundary, or inside a block), and the next document depends
  on none of them.

  The changed tokens (the document's first `changed`) lie more than `horizon` (what the model sees without
  its memory) before the tail. (Issue 22: a document starting inside a block used to reset the memory for
  the whole block, so the previous document's tail, where every recall task puts its answer, read nothing:
  its logits changed by exactly 0 when the next document started inside a block.)"""
  assert next_start - tail - changed > horizon, "the tail is within the model's reach without memory"
  n = -(-(next_start + 2 * seg) // seg) * seg
  tokens = randint(11, (1, n), vocab)
  other = tokens.at[0, :changed].set((tokens[0, :changed] + 3) % vocab)
  ids = (jnp.arange(n) >= next_start).astype(jnp.int32)[None]
  a, _ = stream(model, step, tokens, seg, segment_ids=ids)
  b, _ = stream(model, step, other, seg, segment_ids=ids)
  a, b = np.asarray(a[0]), np.asarray(b[0])
  moved = np.max(np.abs(a[next_start - tail:next_start] - b[next_start - tail:next_start]))
  assert moved > 1e-4, (f"the tail of a document followed by one starting at {next_start} does not depend on "
                        f"its first tokens (max change {moved:.1e}): the memory did not reach it")
  np.testing.assert_array_equal(a[next_start:], b[next_start:])


def no_leak_across_documents(model, step, *, seg, boundary, vocab, segments=3):
  """A document starts at `boundary` (inside the first segment); tokens after it, in this and later
  segments, do not depend on the tokens before it."""
  n = segments * seg
  tokens = randint(5, (1, n), vocab)
  ids = (jnp.arange(n) >= boundary).astype(jnp.int32)[None]
  other = tokens.at[0, :boundary].set((tokens[0, :boundary] + 7) % vocab)
  a, _ = stream(model, step, tokens, seg, segment_ids=ids)
  b, _ = stream(model, step, other, seg, segment_ids=ids)
  np.testing.assert_array_equal(np.asarray(a[0, boundary:]), np.asarray(b[0, boundary:]))
  assert not np.allclose(np.asarray(a[0, :boundary]), np.asarray(b[0, :boundary]))


def gradients_reach(model, *, seg, vocab, names, segments=3):
  """The loss on the last segment only has nonzero, finite gradients w.r.t. every parameter whose
  path contains one of `names` (so they act through the carried state)."""
  graphdef, params = nnx.split(model)
  tokens = randint(8, (1, segments * seg), vocab)

  def loss(params):
    m = nnx.merge(graphdef, params)
    state = m.init_state(1)
    for i in range(segments):
      logits, state = m(tokens[:, i * seg:(i + 1) * seg], state, reset=jnp.array([i == 0]))
    return jnp.sum(jax.nn.log_softmax(logits)[..., 0])

  grads = nnx.to_pure_dict(jax.jit(jax.grad(loss))(params))
  flat = {jax.tree_util.keystr(path): np.asarray(g) for path, g in jax.tree_util.tree_leaves_with_path(grads)}
  for name in names:
    hits = {p: g for p, g in flat.items() if name in p}
    assert hits, f"no parameter path contains {name!r}: {sorted(flat)}"
    for p, g in hits.items():
      assert np.all(np.isfinite(g)) and np.linalg.norm(g) > 0, f"no gradient reaches {p}"
  assert all(np.all(np.isfinite(g)) for g in flat.values())
  return flat


def sharded_matches_one_device(model_cfg, devices, *, seg_len, steps=3, align=0, tol=1e-5, mesh=None):
  """Three train steps on real lanes: an 8-device mesh (default data 2, fsdp 2, tensor 2) equals 1 device.

  Per step: the loss, the gradient norm and every gradient leaf; after the steps: the parameters and the
  carried model state. The schedule has no warmup, so the first update is a real one (with warmup the
  first step's learning rate is 0 and both sides' first two losses see the initial parameters), and the
  gradients are compared themselves because Adam and global-norm clipping hide a uniform gradient scale
  from the parameters.

  (Mutation, by hand: multiplying the 8-device trainer's gradients by 4 inside `StepFunctions.train_step`
  passed the old check, which compared losses and parameters after 2 steps, the first at learning rate 0;
  it fails this one at step 1's grad_norm.)"""
  from longctx import config as config_lib
  from longctx.config import Config, DataConfig, MeshConfig, TrainConfig
  from longctx.data.lanes import LaneBatcher
  from longctx.training.loop import build_pipeline
  from longctx.training.trainer import Trainer

  cfg = Config(model=model_cfg,
               data=DataConfig(source="synthetic", task="passkey,mqar", task_length=3 * seg_len // 2,
                               task_min_length=seg_len // 2, prompt_loss_weight=1.0, num_docs=64, batch_size=8,
                               seg_len=seg_len, segments_per_step=2, align_documents=align),
               train=TrainConfig(steps=steps, learning_rate=3e-3, warmup_steps=0, async_checkpoint=False),
               mesh=MeshConfig(data=-1))
  pipeline = build_pipeline(cfg)
  d = cfg.data
  lanes = LaneBatcher(pipeline.train_source, num_lanes=d.batch_size, seg_len=d.seg_len, align=align or 1,
                      segments_per_step=d.segments_per_step, pad_id=pipeline.tokenizer.pad_id)
  batches = [next(lanes) for _ in range(steps)]
  results = {}
  for name, mesh, devs in [("1", MeshConfig(data=1), devices[:1]),
                           ("8", mesh or MeshConfig(data=2, fsdp=2, tensor=2), devices)]:
    trainer = Trainer(config_lib.replace(cfg, mesh=mesh), devices=devs)
    ts = trainer.init_train_state()
    metrics, grads = [], []
    for b in batches:
      ts, m, g = trainer.train_step_with_grads(ts, trainer.put_batch(b))
      metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
      grads.append(jax.device_get(g))
    results[name] = ([m["loss"] for m in metrics], jax.device_get(ts["params"]), jax.device_get(ts["model_state"]))
    results[name + "-metrics"], results[name + "-grads"] = metrics, grads
    results[name + "-trainer"] = trainer
  for i, (one, eight) in enumerate(zip(results["1-metrics"], results["8-metrics"])):
    assert one["learning_rate"] > 0, "a step at learning rate 0 compares nothing"
    for key in ("loss", "grad_norm"):
      a, b = one[key], eight[key]
      assert np.isfinite(a) and abs(a - b) / abs(b) < tol, f"step {i + 1} {key}: 1 device {a}, 8 devices {b}"
  for i, (g1, g8) in enumerate(zip(results["1-grads"], results["8-grads"])):
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree.leaves(g8)):
      assert rel_err(b, a) < 10 * tol, f"step {i + 1} gradient {jax.tree_util.keystr(path)}: {rel_err(b, a):.2e}"
  for a, b in zip(jax.tree.leaves(results["1"][1]), jax.tree.leaves(results["8"][1])):
    assert rel_err(b, a) < 10 * tol
  assert_states_close(results["8"][2], results["1"][2], tol=10 * tol, what="the carried state, 8 devices vs 1")
  return results


def runs_context_parallel_form(trainer) -> bool:
  """The lowered train step holds a shard_map with a ppermute/all_gather of its own: XLA's partitioner adds
  its collectives only after lowering, so these come from the model's context-parallel form."""
  text = trainer._train_step.lower(trainer.abstract_train_state_sharded(), trainer.abstract_batch_sharded()).as_text()
  return "manual_computation" in text and ("collective_permute" in text or "all_gather" in text)


_TAIL_MODELS: dict = {}


def _tail_model(model, step, changes: dict, block: int, horizon: int):
  """(model, step, block, horizon) for `BlockwiseContract.TAIL_CONFIG`: the fixture's model if no changes."""
  import dataclasses

  from longctx.models import create_model

  if not changes:
    return model, step, block, horizon
  cfg = dataclasses.replace(model.cfg, **changes)
  cfg.validate()
  key = repr(cfg)
  if key not in _TAIL_MODELS:
    tail = create_model(cfg, seed=0)
    _TAIL_MODELS[key] = (tail, make_step(tail))
  reach = cfg.num_layers * cfg.window + max(getattr(cfg, "embed_conv", 0) - 1, 0)  # the XL cache + token conv
  return (*_TAIL_MODELS[key], cfg.resolved_block_len, reach)


class BlockwiseTailContract:
  """The check every blockwise memory model adds to the shared contract (tests/test_contract.py): a document's
  tail reads its head through the memory wherever the next document starts. Subclass as `TestTail` in the
  model's test module, which provides the `model` and `step` fixtures, and set:

    VOCAB    the model's vocabulary size
    BLOCK    its block length (segments are whole blocks)
    HORIZON  how far back the model reaches without its memory (num_layers x window with an XL cache,
             the block length without one), plus the token-conv history when that is on
  """
  VOCAB: int
  BLOCK: int
  HORIZON: int

  # Config changes for the tail test (below): the tail must sit further into its block than the XL cache
  # reaches, or the previous block's tokens (which read the carried memory) would carry the head to it
  # through the cache alone and the test could not see a memory reset inside the block.
  TAIL_CONFIG: dict = {"window": 2, "block_len": 16}

  @pytest.mark.parametrize("where", ["block_start", "inside_block"])
  def test_memory_reaches_a_documents_tail(self, model, step, where):
    """(Mutation, by hand: the old reset of the memory for a whole block in which a document starts fails
    every "inside_block" case here, with a change of exactly 0.)"""
    model, step, block, horizon = _tail_model(model, step, self.TAIL_CONFIG, self.BLOCK, self.HORIZON)
    # Within 4 blocks of the document's start (a memory of 3 blocks still holds its first block), and
    # inside a block: the tail starts block // 2 - 3 tokens into it, beyond the XL cache's reach.
    start = 4 * block if where == "block_start" else 3 * block + block // 2 + 1
    memory_reaches_the_tail(model, step, seg=2 * block, vocab=self.VOCAB, horizon=horizon, next_start=start)


class BlockwiseContract(BlockwiseTailContract):
  """The whole blockwise contract on a model variant the shared contract's tiny config does not cover (an LSTM
  gate, joint kNN attention, a token conv): the tail check and the shared checks at block granularity."""

  def test_segments_of_whole_blocks_equal_one_pass(self, model, step):
    n = 4 * self.BLOCK  # a memory smaller than 4 blocks wraps around here
    segs = [self.BLOCK, 2 * self.BLOCK]
    segment_invariance(model, step, n=n, segs=segs, vocab=self.VOCAB)
    ids = (jnp.arange(n) >= 2 * self.BLOCK).astype(jnp.int32)[None].repeat(2, 0)  # a document starts at a block
    segment_invariance(model, step, n=n, segs=segs, vocab=self.VOCAB, segment_ids=ids)

  def test_reset_isolation(self, model, step):
    reset_isolation(model, step, seg=self.BLOCK, vocab=self.VOCAB)

  @pytest.mark.parametrize("where", ["block_start", "inside_block"])
  def test_no_leak_across_documents(self, model, step, where):
    boundary = self.BLOCK if where == "block_start" else self.BLOCK + self.BLOCK // 2 + 1
    no_leak_across_documents(model, step, seg=2 * self.BLOCK, boundary=boundary, vocab=self.VOCAB)

  def test_memory_carries_beyond_the_horizon(self, model, step):
    memory_carries(model, step, seg=self.BLOCK, vocab=self.VOCAB, horizon=self.HORIZON)
