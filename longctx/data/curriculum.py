"""Curricula: a run trained in stages, each with its own data (`train.curriculum`).

A stage is one string of space-separated `key=value` items:

    "steps=300 data.task_length=256 data.passkey_depth=[0.5,1]"
    "steps=2000 until=passkey:0.9 check_every=100 data.task_length=1024 data.seg_len=256"

  steps=N         the stage's length in train steps (at most: see until)
  until=TASK:ACC  end the stage early once the greedy exact-match accuracy of TASK (a recall task)
                  on held-out examples of the stage's data (`data.task_length` tokens) reaches ACC
  check_every=N   how often `until` is checked (default: train.eval_every, else 100 steps)
  data.FIELD=V    the stage's data config: the run's `data` with these overrides (any field but
                  data.batch_size and data.source, which the lanes' state and the sources keep)

Stages run in order; `train.steps` must equal the sum of their steps (the run's longest length; a stage
ended early by `until` shortens it). At a stage's start every lane starts afresh on the stage's
documents (model state reset). The stage and its data position are in every checkpoint, so a run
resumes inside a stage; metrics rows carry their stage and `loss.png` marks where each began.
A run without a curriculum is one stage of `data` for `train.steps`.
"""

from __future__ import annotations

import copy
import dataclasses

from longctx import config as config_lib
from longctx.config import TASKS as RECALL_TASKS
from longctx.errors import ConfigError

FIXED_DATA_FIELDS = ("batch_size", "source")  # the same in every stage: lanes and sources depend on them


@dataclasses.dataclass(frozen=True)
class Stage:
  index: int
  steps: int
  data: object  # DataConfig
  until: tuple[str, float] | None = None  # (recall task, accuracy)
  check_every: int = 100
  spec: str = ""

  def describe(self) -> str:
    until = f", until {self.until[0]} accuracy >= {self.until[1]:g}" if self.until else ""
    return f"stage {self.index + 1}: {self.steps} steps{until}" + (f" ({self.spec})" if self.spec else "")


def parse_stages(cfg) -> list[Stage]:
  """The stages of a Config (its `train.curriculum`, or one stage of `data`); ConfigError naming the stage."""
  tc = cfg.train
  if not tc.curriculum:
    return [Stage(0, tc.steps, cfg.data)]
  stages = []
  for i, spec in enumerate(tc.curriculum):
    where = f"train.curriculum[{i}]"
    if not isinstance(spec, str) or not spec.strip():
      raise ConfigError(f"{where} is empty; a stage is e.g. \"steps=300 data.task_length=512\"")
    steps, until, check_every, overrides = None, None, tc.eval_every or 100, []
    for item in spec.split():
      if "=" not in item:
        raise ConfigError(f"{where}: {item!r} is not key=value (e.g. steps=300, data.task_length=512)")
      key, value = item.split("=", 1)
      if key == "steps" or key == "check_every":
        if not value.isdigit() or int(value) < 1:
          raise ConfigError(f"{where}: {key}={value!r} must be a positive integer")
        steps, check_every = (int(value), check_every) if key == "steps" else (steps, int(value))
      elif key == "until":
        task, _, acc = value.partition(":")
        try:
          accuracy = float(acc)
        except ValueError:
          accuracy = -1.0
        if task not in RECALL_TASKS or not 0.0 < accuracy <= 1.0:
          raise ConfigError(f"{where}: until={value!r} must be TASK:ACCURACY with TASK one of {RECALL_TASKS} and "
                            "ACCURACY in (0, 1], e.g. until=passkey:0.9")
        until = (task, accuracy)
      elif key.startswith("data."):
        if key[5:] in FIXED_DATA_FIELDS:
          raise ConfigError(f"{where}: {key} cannot change between stages (the lanes and sources keep it)")
        overrides.append(item)
      else:
        raise ConfigError(f"{where}: unknown key {key!r}; a stage takes steps=, until=, check_every= and data.*=")
    if steps is None:
      raise ConfigError(f"{where} has no steps=N")
    data = copy.deepcopy(cfg.data)
    holder = config_lib.Config(model=cfg.model, data=data, train=cfg.train, mesh=cfg.mesh)
    try:
      config_lib.apply_overrides(holder, overrides)
      holder.data.validate()
    except ConfigError as e:
      raise ConfigError(f"{where}: {e}") from None
    if until and holder.data.source != "synthetic":
      raise ConfigError(f"{where}: until= needs synthetic data (data.source=synthetic) to draw held-out examples")
    stages.append(Stage(i, steps, holder.data, until, check_every, spec.strip()))
  total = sum(s.steps for s in stages)
  if total != tc.steps:
    raise ConfigError(f"train.steps={tc.steps} but the curriculum's stages add up to {total} steps; set "
                      f"train.steps={total}")
  return stages


def stage_config(cfg, stage: Stage):
  """The run's config with the stage's data."""
  return dataclasses.replace(cfg, data=stage.data)
