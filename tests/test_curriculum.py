"""Curricula (`train.curriculum`): stages parsed with clear errors, trained in order with their own data,
resumed exactly inside a stage, ended early by `until`, logged and marked on loss.png; the recall data
knobs they use (`data.passkey_depth`, documents aligned to a train step) and per-token answer accuracy."""

import dataclasses
import pathlib

import jax
import numpy as np
import pytest

from longctx.config import Config, DataConfig, MeshConfig, TrainConfig
from longctx.errors import CheckpointError, ConfigError
from longctx.models import TransformerConfig
from longctx.data import curriculum
from longctx.training import loop as loop_lib
from longctx.training.loop import run_training
from longctx.training.metrics import read_metrics
from longctx import recipe as recipe_lib

ONE = jax.devices()[:1]
STAGES = ["steps=2 data.task_length=48", "steps=3 data.task_length=96 data.passkey_depth=[0,0.5]"]


def _cfg(stages=STAGES, steps=None, **data) -> Config:
  return Config(
      model=TransformerConfig(vocab_size=259, d_model=32, num_layers=1, num_heads=2, window=8),
      data=DataConfig(**{"source": "synthetic", "task": "passkey", "task_length": 64, "num_docs": 64,
                         "batch_size": 4, "seg_len": 16, "segments_per_step": 2, "prompt_loss_weight": 0.5, **data}),
      train=TrainConfig(steps=steps or 5, learning_rate=3e-3, warmup_steps=1, log_every=1, checkpoint_every=2,
                        eval_batches=1, async_checkpoint=False, curriculum=list(stages)),
      mesh=MeshConfig(data=-1))


def _quiet(*_):
  pass


@pytest.mark.parametrize("stages, steps, message", [
    (["data.task_length=48"], 5, "has no steps=N"),
    (["steps=0"], 5, "steps='0' must be a positive integer"),
    (["steps=5 task_length=3"], 5, "unknown key 'task_length'"),
    (["steps=5 nonsense"], 5, "'nonsense' is not key=value"),
    (["steps=5 until=copy:1.5"], 5, "until='copy:1.5' must be TASK:ACCURACY"),
    (["steps=5 until=books:0.9"], 5, "until='books:0.9' must be TASK:ACCURACY"),
    (["steps=5 data.batch_size=2"], 5, "data.batch_size cannot change between stages"),
    (["steps=5 data.seg_len=0"], 5, "train.curriculum[0]: data.seg_len"),
    (["steps=5 data.passkey_depth=[0.8,0.2]"], 5, "data.passkey_depth=[0.8, 0.2] must be"),
    (["steps=2", "steps=2"], 5, "add up to 4 steps; set train.steps=4"),
    ([""], 5, "train.curriculum[0] is empty"),
])
def test_bad_stages_are_named(stages, steps, message):
  with pytest.raises(ConfigError) as err:
    recipe_lib.validate(_cfg(stages, steps))
  assert message in str(err.value), str(err.value)


def test_stages_take_their_data():
  stages = curriculum.parse_stages(_cfg())
  assert [s.steps for s in stages] == [2, 3]
  assert [s.data.task_length for s in stages] == [48, 96]
  assert stages[1].data.passkey_depth == [0.0, 0.5] and stages[0].data.passkey_depth == []
  # A run without a curriculum is one stage of its data.
  plain = curriculum.parse_stages(dataclasses.replace(_cfg(), train=dataclasses.replace(_cfg().train,
                                                                                      curriculum=[])))
  assert len(plain) == 1 and plain[0].steps == 5 and plain[0].data.task_length == 64


def test_a_curriculum_trains_its_stages_and_resumes_inside_one(tmp_path):
  """5 steps in 2 stages straight, against stopped at step 3 (inside stage 2) and resumed: bitwise equal
  losses and final state; metrics carry the stage, 'stage' rows mark both starts, loss.png is drawn."""
  straight = run_training(_cfg(), tmp_path / "straight", progress=False, log=_quiet, devices=ONE)
  assert straight["end_step"] == 5 and straight["stage"] == 1 and straight.get("complete")
  first = run_training(_cfg(), tmp_path / "resumed", stop_at_step=3, progress=False, log=_quiet, devices=ONE)
  assert first["end_step"] == 3
  messages = []
  second = run_training(_cfg(), tmp_path / "resumed", progress=False, log=messages.append, devices=ONE)
  assert any("resumed from" in m and "stage 2" in m for m in messages), messages
  assert straight["losses"] == first["losses"] + second["losses"]
  for a, b in zip(jax.tree.leaves(jax.device_get(straight["train_state"])),
                  jax.tree.leaves(jax.device_get(second["train_state"]))):
    np.testing.assert_array_equal(a, b)
  records = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
  train = [r for r in records if r["split"] == "train"]
  assert [(r["step"], r["stage"]) for r in train] == [(1, 1), (2, 1), (3, 2), (4, 2), (5, 2)]
  assert [(r["step"], r["stage"]) for r in records if r["split"] == "stage"] == [(0, 1), (2, 2)]
  assert (tmp_path / "resumed" / "loss.png").stat().st_size > 1000
  # Stage 2's documents are longer: its steps read different data from stage 1's continuation.
  assert len(set(straight["losses"])) == 5
  # A complete run resumed again trains nothing.
  again = run_training(_cfg(), tmp_path / "resumed", progress=False, log=_quiet, devices=ONE)
  assert again["losses"] == []


def test_until_ends_a_stage_early(tmp_path, monkeypatch):
  """`until` is checked every check_every steps of its stage; once reached, the next stage begins (and the
  run is shorter than train.steps). The accuracy itself is faked here: its real measurement is eval_recall,
  tested in test_eval; this checks what the loop does with it."""
  seen = []

  def fake(setups, stage, trainer, pipeline, params, step, examples=8):
    seen.append(step)
    return {"passkey_accuracy": 1.0 if step >= 2 else 0.0, "passkey_token_accuracy": 1.0, "stage": stage.index + 1}

  monkeypatch.setattr(loop_lib, "_until_accuracy", fake)
  stages = ["steps=4 until=passkey:0.9 check_every=1 data.task_length=48", "steps=2"]
  out = run_training(_cfg(stages, steps=6), tmp_path / "run", progress=False, log=_quiet, devices=ONE)
  assert seen == [1, 2] and out["end_step"] == 4 and out.get("complete")
  records = read_metrics(tmp_path / "run" / "metrics.jsonl")
  assert [(r["step"], r["stage"]) for r in records if r["split"] == "stage"] == [(0, 1), (2, 2)]
  assert [r["passkey_accuracy"] for r in records if r["split"] == "curriculum"] == [0.0, 1.0]


def test_until_measures_held_out_accuracy(tmp_path):
  """The real `until` check on an untrained model: an accuracy in [0, 1] from held-out examples, logged."""
  stages = ["steps=3 until=passkey:0.99 check_every=2 data.task_length=48"]
  run_training(_cfg(stages, steps=3), tmp_path / "run", progress=False, log=_quiet, devices=ONE)
  rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["split"] == "curriculum"]
  assert len(rows) == 1 and 0.0 <= rows[0]["passkey_accuracy"] <= rows[0]["passkey_token_accuracy"] <= 1.0


def test_resume_refuses_a_changed_curriculum(tmp_path):
  run_training(_cfg(), tmp_path / "run", stop_at_step=2, progress=False, log=_quiet, devices=ONE)
  changed = _cfg(["steps=2 data.task_length=48", "steps=3 data.task_length=128"])
  with pytest.raises(CheckpointError, match="train.curriculum"):
    run_training(changed, tmp_path / "run", progress=False, log=_quiet, devices=ONE)


def test_passkey_depth_places_the_key():
  from longctx.data import synthetic
  from longctx.data.tokenizers import load_tokenizer

  tok = load_tokenizer("byte")
  for lo, hi in [(0.0, 0.2), (0.8, 1.0)]:
    depths = []
    for seed in range(12):
      _, meta = synthetic.make_example("passkey", rng=np.random.default_rng(seed), length_tokens=400,
                                       tokenizer=tok, depth_range=(lo, hi))
      depths.append(meta["depth"])
    assert all(lo <= d <= hi for d in depths), depths


def test_documents_aligned_to_a_train_step():
  """align_documents = segments_per_step x seg_len: every document starts at a train step's first token."""
  from longctx.data.lanes import LaneBatcher
  from longctx.training.loop import build_pipeline

  cfg = recipe_lib.validate(_cfg([], steps=5, align_documents=32, task_length=40))
  pipeline = build_pipeline(cfg)
  lanes = LaneBatcher(pipeline.train_source, num_lanes=4, seg_len=16, segments_per_step=2, align=32,
                      pad_id=pipeline.tokenizer.pad_id)
  for _ in range(4):
    batch = next(lanes)
    assert batch["reset"].shape == (2, 4) and not batch["reset"][1].any(), "a document started at a step's 2nd segment"
    assert np.all(batch["segment_ids"] == 0), "a document started inside a segment"
  with pytest.raises(ConfigError, match="align_documents=24 must be 0, divide"):
    recipe_lib.validate(_cfg([], align_documents=24))


def test_answer_token_hits_gives_partial_credit():
  from longctx.eval.streaming import answer_hits, answer_token_hits

  correct = np.array([1, 1, 0, 1, 1, 1, 1, 0], bool)
  spans = [(2, 5), (6, 9)]  # tokens 2..4 scored at 1..3, tokens 6..8 at 5..7
  assert answer_hits(correct, spans) == [False, False]
  assert answer_token_hits(correct, spans) == (4, 6)


def test_every_recall_recipe_is_a_valid_curriculum():
  """The recall recipes (recipes/synthetic/*_recall.py) load, validate, and grow their documents stage by stage
  (or, with position-free retrieval, keep to short ones), each aligned to one train step."""
  root = pathlib.Path(__file__).resolve().parents[1] / "recipes" / "synthetic"
  recipes = sorted(p for p in root.glob("*_recall.py") if not p.name.startswith("_"))
  assert len(recipes) >= 10
  for path in recipes:
    cfg = recipe_lib.validate(recipe_lib.load_recipe(path))
    stages = curriculum.parse_stages(cfg)
    assert stages and sum(s.steps for s in stages) == cfg.train.steps, path.name
    lengths = [s.data.task_length for s in stages]
    assert lengths == sorted(lengths), path.name
    short = {"memorizing_recall.py", "transformer_short_recall.py"}  # the short-document schedule
    assert (len(stages) == 1) == (path.name in short), path.name
    for s in stages:
      assert s.data.align_documents == s.data.segments_per_step * s.data.seg_len, path.name
