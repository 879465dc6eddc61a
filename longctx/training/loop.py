"""`longctx train`: data -> compiled steps -> logs, evals, checkpoints; resumes automatically.

Everything that can fail on user input (config, tokenizer, data files, mesh, a
refused resume) is checked before anything is written to the run directory,
and a run dir another training holds is refused (`run_dir.RunDirLock`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import signal
import threading
import time
from typing import Any, Callable

import jax
import numpy as np

from longctx import config as config_lib
from longctx import recipe as recipe_lib
from longctx import distributed
from longctx.config import Config
from longctx.errors import CheckpointError, ConfigError, TrainingError
from longctx.sharding import describe
from longctx.data import curriculum as curriculum_lib
from longctx.training import run_dir as run_dir_lib
from longctx.training.checkpoint import Checkpointer, load_initial_params
from longctx.training.metrics import MetricsLogger, plot_loss_curve
from longctx.training.trainer import Trainer

# Changing these between a checkpoint and a resume would silently change what is trained. (The tokenizer
# too: it is compared by its contents, against the run dir's copy; see `resolve_tokenizer`.)
_RESUME_MUST_MATCH = ("model", "data.batch_size", "data.seg_len", "data.segments_per_step", "data.source",
                      "data.task", "data.seed", "train.curriculum")


@dataclasses.dataclass
class Pipeline:
  """What a run needs besides the compiled steps: tokenizer, sources and lane iterators."""

  tokenizer: Any
  train_source: Any
  eval_source: Any

  def train_lanes(self, trainer: Trainer):
    from longctx.data.lanes import LaneBatcher

    d = trainer.cfg.data
    return LaneBatcher(self.train_source, num_lanes=d.batch_size, seg_len=d.seg_len,
                       segments_per_step=d.segments_per_step, lane_range=trainer.local_lane_range(),
                       repeat=True, pad_id=self.tokenizer.pad_id, align=d.align_documents or 1)

  def eval_lanes(self, trainer: Trainer):
    from longctx.data.lanes import LaneBatcher

    d = trainer.cfg.data
    return LaneBatcher(self.eval_source, num_lanes=d.batch_size, seg_len=d.seg_len,
                       segments_per_step=d.segments_per_step, lane_range=trainer.local_lane_range(),
                       repeat=False, pad_id=self.tokenizer.pad_id, align=d.align_documents or 1)


def build_pipeline(cfg: Config, *, tokenizer_spec: str | None = None, log: Callable[[str], None] = print) -> Pipeline:
  """Tokenizer (`tokenizer_spec`, default `cfg.data.tokenizer`) and the train / held-out sources."""
  from longctx.data.sources import build_sources
  from longctx.data.tokenizers import check_fits_model, load_tokenizer

  spec = tokenizer_spec or cfg.data.tokenizer
  tokenizer = load_tokenizer(spec)
  check_fits_model(tokenizer, spec, cfg.model.vocab_size)
  train_source, eval_source = build_sources(cfg.data, tokenizer, warn=log)
  return Pipeline(tokenizer, train_source, eval_source)


def resolve_tokenizer(cfg: Config, run_dir: pathlib.Path, log: Callable[[str], None]) -> str:
  """The tokenizer file to train with: the recipe's `data.tokenizer`, checked against the run dir's copy
  (`RUN/tokenizer.model`) when resuming; the copy itself if the recipe's path is not found here (a run dir
  moved to another machine, or a command started from another directory)."""
  spec = cfg.data.tokenizer
  copy = run_dir / run_dir_lib.TOKENIZER
  if spec == "byte" or not copy.is_file():
    return spec
  if not pathlib.Path(spec).is_file():
    log(f"data.tokenizer={spec} is not found from here; using the run dir's copy {copy}")
    return str(copy)
  if not run_dir_lib.same_file_contents(copy, pathlib.Path(spec)):
    raise CheckpointError(f"the checkpoints in {run_dir} were trained with another tokenizer: data.tokenizer={spec} "
                          f"differs from the run's copy {copy}; use that tokenizer (or the recipe that made the run), "
                          "or a new --run-dir")
  return spec


def run_config_dict(cfg: Config) -> dict:
  """The config as config.json records it: local paths made absolute, so the run dir's readers (eval,
  generate, export, --init-from) work from any working directory."""
  d = config_lib.to_dict(cfg)
  data = d["data"]
  data["paths"] = [os.path.abspath(p) for p in data["paths"]]
  data["eval_paths"] = [os.path.abspath(p) for p in data["eval_paths"]]
  if data["tokenizer"] != "byte":
    data["tokenizer"] = os.path.abspath(data["tokenizer"])
  if data["hub_name"] and os.path.isdir(data["hub_name"]):  # a local directory streamed as a hub dataset
    data["hub_name"] = os.path.abspath(data["hub_name"])
  if d["train"]["init_from"]:
    d["train"]["init_from"] = os.path.abspath(d["train"]["init_from"])
  return d


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flat(v, key + "."))
    out[key] = v
  return out


def check_resume_compatible(saved: dict, cfg: Config, where: pathlib.Path) -> None:
  saved_flat, now_flat = _flat(saved), _flat(config_lib.to_dict(cfg))
  old_tok, new_tok = saved_flat.get("data.tokenizer"), now_flat.get("data.tokenizer")
  if not _same_tokenizer(old_tok, new_tok, copied=(where / run_dir_lib.TOKENIZER).is_file()):
    raise CheckpointError(f"the checkpoint in {where} was trained with data.tokenizer={_short(old_tok)}, this "
                          f"recipe has data.tokenizer={_short(new_tok)}; use a new --run-dir (or the recipe that "
                          "made it)")
  for key in _RESUME_MUST_MATCH:
    old, new = saved_flat.get(key), now_flat.get(key)
    if old != new and isinstance(old, dict) and isinstance(new, dict):  # name the fields that differ
      keys = sorted(old.keys() | new.keys(), key=lambda k: (k != "name", k))
      diff = [f"{key}.{k} {_short(old.get(k))} -> {_short(new.get(k))}" for k in keys if old.get(k) != new.get(k)]
      raise CheckpointError(
          f"the checkpoint in {where} was trained with another {key} than this recipe's ({', '.join(diff[:4])}"
          f"{', ...' if len(diff) > 4 else ''}); use a new --run-dir (or the recipe that made it)")
    if old != new:
      raise CheckpointError(
          f"the checkpoint in {where} was trained with {key}={_short(saved_flat.get(key))}, this recipe has "
          f"{key}={_short(now_flat.get(key))}; use a new --run-dir (or the recipe that made it)")


def _same_tokenizer(old: str | None, new: str, *, copied: bool) -> bool:
  if old is None:
    return True
  if copied:  # the run dir has its copy: `resolve_tokenizer` compares the contents
    return new != "byte"
  if "byte" in (old, new):
    return old == new
  if os.path.abspath(old) == os.path.abspath(new):
    return True
  return (pathlib.Path(old).is_file() and pathlib.Path(new).is_file()
          and run_dir_lib.same_file_contents(pathlib.Path(old), pathlib.Path(new)))


def _short(v: Any) -> str:
  s = json.dumps(v) if isinstance(v, dict) else repr(v)
  return s if len(s) < 80 else s[:77] + "..."


def _progress(total: int, initial: int, enabled: bool):
  from tqdm.auto import tqdm

  return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True,
              desc="train", mininterval=1.0)


class StopSignals:
  """SIGTERM / SIGINT during training: finish the step, save, exit (`agreed`); a second signal acts at once.

  Handlers are installed only in the main thread (elsewhere `signal` cannot), and the previous ones are
  restored by `restore`. With several processes all must stop at the same step, so every step they agree
  (an all-gather of one flag) whenever any of them was signalled.
  """

  def __init__(self):
    self.received: str | None = None
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    self.received = signal.Signals(signum).name
    signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))  # a second one is not deferred

  def agreed(self) -> str | None:
    if jax.process_count() == 1:
      return self.received
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.int32(self.received is not None))
    return (self.received or "a signal to another process") if np.any(flags) else None

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}


def run_training(cfg: Config, run_dir: str | pathlib.Path, *, stop_at_step: int | None = None,
                 progress: bool = True, devices=None, log: Callable[[str], None] = print) -> dict:
  """Train `cfg` in `run_dir`, resuming from its latest checkpoint if there is one.

  In a multi-process run (`longctx.distributed.initialize`) every process calls
  this with the same config and run dir (on a filesystem all hosts share): each
  reads only its own lanes, all save and restore the checkpoints together, and
  only process 0 logs, prints, holds the run dir's lock and writes metrics,
  config.json and plots.

  Args:
    stop_at_step: end this run (with a checkpoint) after this global step, as a
      preempted job would; a later call continues to `cfg.train.steps`.
  Returns:
    A summary dict: steps run, final train and eval metrics, paths, and `lanes`,
    the (start, stop) range of lanes this process read.
  """
  recipe_lib.validate(cfg)
  if "://" in str(run_dir):  # pathlib would turn gs://b/x into a local directory gs:/b/x on every host
    raise ConfigError(f"run dir {str(run_dir)!r} is a URL, but the run dir is written through the local "
                      "filesystem; mount the bucket (e.g. gcsfuse) on every host and pass the mounted path")
  run_dir = pathlib.Path(run_dir)
  existing = next(p for p in (run_dir, *run_dir.absolute().parents) if p.exists())
  if not existing.is_dir():
    raise ConfigError(f"run dir {str(run_dir)!r} " + ("is a file, not a directory" if existing == run_dir else
                      f"cannot be made: {str(existing)!r} is a file") + "; pass another --run-dir")
  is_host0 = jax.process_index() == 0
  if not is_host0:
    log = lambda *_: None  # noqa: E731
  tokenizer_spec = resolve_tokenizer(cfg, run_dir, log)
  stages = curriculum_lib.parse_stages(cfg)
  setups = _StageSetups(cfg, stages, tokenizer_spec=tokenizer_spec, devices=devices, log=log)
  pipeline, trainer, lanes = setups.get(0)  # data problems surface here
  distributed.assert_same(str(run_dir.absolute()), "the run dir")
  distributed.assert_same(json.dumps(config_lib.to_dict(cfg), sort_keys=True), "the config")
  tc = cfg.train

  lock, error = run_dir_lib.RunDirLock(run_dir), None
  if is_host0:
    try:
      lock.acquire()
    except run_dir_lib.RunDirBusy as e:
      error = e
  distributed.raise_if_any_failed(error, "lock the run dir")
  started, ckpt = False, None  # until the run dir is written, a refused run puts back what the lock changed
  try:
    ckpt = Checkpointer(run_dir / "checkpoints", keep=tc.keep_checkpoints, async_save=tc.async_checkpoint)
    resumed = _resume(ckpt, trainer, cfg, run_dir, log)
    position = StagePosition()
    if resumed is not None:
      latest, ts, extra = resumed
      position = StagePosition.from_dict(extra.get("curriculum"))
      if position.stage:
        pipeline, trainer, lanes = setups.get(position.stage)
      if not position.done:
        lanes.load_state_dict(extra["data"])
      log(f"resumed from {run_dir / 'checkpoints' / str(latest)} (step {latest}"
          + (f", {stages[position.stage].describe()}" if len(stages) > 1 and not position.done else "") + ")"
          + (f"; train.init_from={tc.init_from} is not read again" if tc.init_from else ""))
    else:
      latest = None
      ts = trainer.init_train_state()
      if tc.init_from:
        ts["params"], line = load_initial_params(tc.init_from, model_cfg=cfg.model,
                                                 abstract_params=trainer.abstract_train_state_sharded()["params"])
        log(line)
    start = int(jax.device_get(ts["step"]))
    heldout = None
    if is_host0:
      run_dir.mkdir(parents=True, exist_ok=True)
      (run_dir / "config.json").write_text(json.dumps(run_config_dict(cfg), indent=2) + "\n")
      run_dir_lib.copy_tokenizer(run_dir, tokenizer_spec)
      heldout = _write_heldout(run_dir, cfg, pipeline)
    started = True
    return _train_loop(cfg, setups, position, (pipeline, trainer, lanes), ckpt, ts, start=start, latest=latest,
                       run_dir=run_dir, stop_at_step=stop_at_step, progress=progress and is_host0, log=log,
                       heldout=heldout)
  finally:
    if ckpt is not None:
      ckpt.close()
    lock.release(undo=not started)


def _resume(ckpt: Checkpointer, trainer: Trainer, cfg: Config, run_dir: pathlib.Path, log) -> tuple | None:
  """(step, train state, extra) of the newest checkpoint that restores, or None.

  A step orbax committed but whose manifest was never written (the process died in between) is restored
  and then given its manifest; if it does not restore, it is moved aside and the one before is tried. A
  verified step that does not restore (another model, say) is an error, as is a refused resume.
  """
  while (step := ckpt.newest_intact_step(log)) is not None:
    verified = ckpt.is_verified(step)
    try:
      extra = ckpt.restore_extra(step)
    except CheckpointError as e:
      if verified:
        raise
      ckpt.quarantine(step, f"no manifest, and {e}", log)
      continue
    check_resume_compatible(extra.get("config", {}), cfg, run_dir)
    try:
      ts, extra = ckpt.restore(step, trainer.abstract_train_state_sharded())
    except CheckpointError:
      if verified:
        raise
      ckpt.quarantine(step, "no manifest, and its arrays could not be restored", log)
      continue
    if not verified:
      ckpt.adopt(step)
      log(f"checkpoint step {step} had no manifest yet (the process stopped after orbax committed it): "
          "it restored, and its manifest is written now")
    return step, ts, extra
  return None


def _write_heldout(run_dir: pathlib.Path, cfg: Config, pipeline: Pipeline) -> str:
  """RUN/heldout_documents.txt, and the line that says how many documents were held out and where."""
  d, source = cfg.data, pipeline.eval_source
  names = getattr(source, "names", None)
  if names is not None:
    total = len(names) + (pipeline.train_source.num_docs or 0)
    how = (f"data.eval_paths={d.eval_paths}" if d.eval_paths else
           f"data.eval_fraction={d.eval_fraction} of {total} documents, a stable hash split")
  elif d.source == "synthetic":
    names, how = [f"synthetic {d.task} document {i} (seed {source.seed})" for i in range(source.num_docs)], \
        f"generated: data.task={d.task}"
  else:  # a hub split: streamed, not listed
    names, how = [], f"hub dataset {d.hub_name} split {d.eval_split!r}, all of it (streamed, not listed)"
  path = run_dir_lib.write_heldout(run_dir, names, how=how)
  count = f"{len(names)} held-out documents" if names else "held-out documents"
  return f"{count} ({how}): listed in {path}" if names else f"{count}: {how}"


@dataclasses.dataclass
class StagePosition:
  """Where a run is in its curriculum (in every checkpoint's extra as "curriculum")."""

  stage: int = 0  # the stage being trained
  start: int = 0  # the global step after which it began
  done: bool = False  # the last stage has ended (a run that is complete)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict | None) -> "StagePosition":
    return cls(**d) if d else cls()


class _StageSetups:
  """Per stage: its pipeline (tokenizer, sources), a Trainer for its batch shape, and its lanes; built when
  first needed (a Trainer is shared by stages with the same segment length and segments per step)."""

  def __init__(self, cfg: Config, stages, *, tokenizer_spec: str, devices, log):
    self.cfg, self.stages, self.tokenizer_spec, self.devices, self.log = cfg, stages, tokenizer_spec, devices, log
    self._trainers: dict[tuple, Trainer] = {}
    self.scorers: dict[int, Any] = {}  # stage -> TrainedModel for its `until` checks (its compiled steps kept)

  def config(self, i: int) -> Config:
    return curriculum_lib.stage_config(self.cfg, self.stages[i])

  def get(self, i: int):
    """(pipeline, trainer, lanes at the start of stage i's documents)."""
    cfg = self.config(i)
    pipeline = build_pipeline(cfg, tokenizer_spec=self.tokenizer_spec, log=self.log)
    key = (cfg.data.seg_len, cfg.data.segments_per_step)
    if key not in self._trainers:
      self._trainers[key] = Trainer(cfg, devices=self.devices)
    trainer = self._trainers[key]
    return pipeline, trainer, pipeline.train_lanes(trainer)


def _train_loop(cfg: Config, setups: _StageSetups, position: StagePosition, current, ckpt: Checkpointer, ts, *,
                start: int, latest: int | None, run_dir: pathlib.Path, stop_at_step: int | None, progress: bool,
                log, heldout: str | None) -> dict:
  """Steps start+1 ..: train the stages in turn, log, evaluate, checkpoint; the summary `run_training` returns.

  `current`: (pipeline, trainer, lanes) of the stage `position` is in, the lanes where the run left them."""
  tc, is_host0, stages = cfg.train, jax.process_index() == 0, setups.stages
  pipeline, trainer, lanes = current
  logger = MetricsLogger(run_dir, enabled=is_host0, start_step=start)
  end = start if position.done else tc.steps if stop_at_step is None else min(tc.steps, stop_at_step)
  if start == 0:
    d = stages[0].data
    log(f"model {cfg.model.name}: {trainer.num_params / 1e6:.2f}M params | mesh {describe(trainer.mesh)} | "
        f"{d.batch_size} lanes x {d.segments_per_step} segments x {d.seg_len} tokens per step")
    if heldout:
      log(heldout)
    if trainer.mesh.shape["sequence"] > 1:
      form = trainer.model_class.context_parallel or "none of its own; XLA partitions it (each block gathered)"
      log(f"context parallel over {trainer.mesh.shape['sequence']} devices: {form}")
    if len(stages) > 1:
      logger.log(0, "stage", {"stage": 1})
      log(f"curriculum of {len(stages)} stages; {stages[0].describe()}")

  def extra_state():  # the data position of every lane, gathered from all processes, and the stage
    return {"data": distributed.gather_lane_state(lanes.state_dict()), "config": config_lib.to_dict(cfg),
            "curriculum": position.to_dict()}

  losses, last_saved, train_metrics, eval_metrics = [], latest, {}, {}
  bar = _progress(tc.steps, start, progress)
  window_tokens, window_start = 0.0, time.perf_counter()
  last_save_time, skipped_in_a_row, stopped_by = time.monotonic(), 0, None
  signals = StopSignals()
  step = start
  try:
    while step < end:
      step += 1
      d = stages[position.stage].data
      batch = trainer.put_batch(next(lanes))
      ts, metrics = trainer.train_step(ts, batch)
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      bad = next((k for k in ("loss", "grad_norm") if not math.isfinite(metrics[k])), None)
      if bad is not None and tc.nan_policy == "stop":
        raise TrainingError(
            f"non-finite {bad} ({metrics[bad]}) at step {step}; last good checkpoint: step {last_saved}. "
            "Lower train.learning_rate or enable train.grad_clip (or set train.nan_policy=skip), then rerun to resume")
      skipped_in_a_row = skipped_in_a_row + 1 if bad is not None else 0
      if bad is not None:
        log(f"warning: non-finite {bad} ({metrics[bad]}) at step {step}: step skipped (parameters, optimizer and "
            f"lane states unchanged; {skipped_in_a_row} in a row)")
        if skipped_in_a_row >= tc.max_skipped_steps:
          raise TrainingError(
              f"{skipped_in_a_row} steps in a row had a non-finite loss or gradient (the last: {bad} at step {step}); "
              f"last good checkpoint: step {last_saved}. Lower train.learning_rate, then rerun to resume")
      losses.append(metrics["loss"])
      window_tokens += d.batch_size * d.segments_per_step * d.seg_len  # every token read, targets or not
      bar.update(1)
      if len(stages) > 1:
        metrics["stage"] = position.stage + 1
      stage, in_stage = stages[position.stage], step - position.start
      stage_over = in_stage >= stage.steps
      if stage.until and not stage_over and in_stage % stage.check_every == 0:
        reached = _until_accuracy(setups, stage, trainer, pipeline, ts["params"], step)
        logger.log(step, "curriculum", reached)
        stage_over = reached[f"{stage.until[0]}_accuracy"] >= stage.until[1]
        log(f"step {step}: {stage.until[0]} accuracy {reached[stage.until[0] + '_accuracy']:.3f} on held-out "
            f"examples of {stage.data.task_length} tokens" + (f"; {stage.describe()} done" if stage_over else ""))
      last_step = step == end or (stage_over and position.stage == len(stages) - 1)
      if step == start + 1:  # the first step of a process includes compiling: no throughput from it
        logger.log(step, "train", metrics)
        window_tokens, window_start = 0.0, time.perf_counter()
      elif step % tc.log_every == 0 or last_step or stage_over:
        elapsed = time.perf_counter() - window_start
        metrics["tokens_per_s"] = window_tokens / max(elapsed, 1e-9)
        window_tokens, window_start = 0.0, time.perf_counter()
        logger.log(step, "train", metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
      train_metrics = metrics
      if tc.eval_every and step % tc.eval_every == 0 and not last_step:
        eval_metrics = evaluate(trainer, pipeline, ts["params"], max_batches=tc.eval_batches)
        logger.log(step, "eval", eval_metrics)
      if stage_over:  # the next stage starts on fresh lanes of its own documents, or the run is complete
        if position.stage == len(stages) - 1:
          position = StagePosition(position.stage, position.start, done=True)
          end = step
        else:
          position = StagePosition(position.stage + 1, step)
          pipeline, trainer, lanes = setups.get(position.stage)
          ts["model_state"] = trainer.init_model_state()
          logger.log(step, "stage", {"stage": position.stage + 1})
          log(f"step {step}: {stages[position.stage].describe()}")
      stopped_by = signals.agreed()
      permanent = step % tc.checkpoint_every == 0 or step == end or stage_over
      timed = tc.checkpoint_minutes and time.monotonic() - last_save_time >= 60 * tc.checkpoint_minutes
      if permanent or timed or stopped_by:
        ckpt.save(step, ts, extra_state(), permanent=permanent)
        last_saved, last_save_time = step, time.monotonic()
      if stopped_by:
        break
  finally:
    signals.restore()
    bar.close()
    ckpt.close()
  summary = {"start_step": start, "end_step": step, "losses": losses, "train": train_metrics, "eval": {},
             "train_state": ts, "plot": None, "run_dir": str(run_dir), "lanes": trainer.local_lane_range(),
             "stage": position.stage}
  if stopped_by:
    logger.close()
    log(f"stopped by {stopped_by} after step {last_saved}; checkpoint saved in {run_dir / 'checkpoints'}. "
        "Rerun the same command to resume")
    return {**summary, "end_step": last_saved, "stopped_by": stopped_by}
  if position.done or step == tc.steps:  # the run is complete: report held-out loss
    eval_metrics = evaluate(trainer, pipeline, ts["params"], max_batches=tc.eval_batches)
    logger.log(step, "eval", eval_metrics)
    log(eval_line(step, eval_metrics, run_dir=run_dir))
  logger.close()
  plot = plot_loss_curve(run_dir) if is_host0 else None
  return {**summary, "eval": eval_metrics, "plot": str(plot) if plot else None, "complete": True}


def _until_accuracy(setups: _StageSetups, stage, trainer: Trainer, pipeline: Pipeline, params, step: int,
                    examples: int = 8) -> dict:
  """Held-out exact-match and per-token answer accuracy of a stage's `until` task, at its documents' length
  (passkey: at three depths across the stage's depth range); the examples are drawn with their own seed,
  apart from the training documents."""
  from longctx.eval.streaming import TrainedModel
  from longctx.eval.tasks import eval_recall

  cfg, task = setups.config(stage.index), stage.until[0]
  lo, hi = cfg.data.passkey_depth or (0.0, 1.0)
  if stage.index not in setups.scorers:
    setups.scorers[stage.index] = TrainedModel(cfg=cfg, params=params, step=step, run_dir=pathlib.Path("."),
                                               tokenizer=pipeline.tokenizer, devices=list(trainer.mesh.devices.flat))
  model = setups.scorers[stage.index]
  model.params, model.step = params, step
  result = eval_recall(model, task, lengths=[cfg.data.task_length], examples=examples, seg_len=cfg.data.seg_len,
                       seed=1, depths=[lo, (lo + hi) / 2, hi], progress=False)
  return {f"{task}_accuracy": result["by_length"][0], f"{task}_token_accuracy": result["token_accuracy"][0],
          "stage": stage.index + 1}


def eval_line(step: int, m: dict, *, limit: str = "train.eval_batches", run_dir=None) -> str:
  """`eval @ step N: loss ... | bits/token ... | ppl ... | over WHAT`, saying what the average is over.

  `limit` names the setting that capped the batches; `run_dir` (in training) adds how to evaluate all."""
  total, docs = int(m.get("documents_total", 0)), int(m.get("documents", 0))
  tokens = f"{int(m['tokens'])} target tokens"
  if m.get("complete", 1.0):
    over = f"all {docs} held-out documents, {tokens}" if docs else f"every held-out document, {tokens}"
  else:
    of = f" of the {total}" if total else ""
    rest = f"; `longctx eval {run_dir}` reads them all" if run_dir is not None else ""
    over = f"the first {int(m['batches'])} batches ({limit}): {tokens} from {docs}{of} held-out documents{rest}"
  return (f"eval @ step {step}: loss {m['loss']:.4f} | bits/token {m['bits_per_token']:.4f} | "
          f"ppl {m['perplexity']:.2f} | over {over}")


def evaluate(trainer: Trainer, pipeline: Pipeline, params, *, max_batches: int = 0) -> dict:
  """Stream every held-out document through fresh lane states (or `max_batches` batches).

  Returns the trainer's metrics (loss, bits_per_token, perplexity, tokens, batches) and what they
  average over: `documents` read (whole or in part), `documents_total` (0 if the source cannot count
  them) and `complete` (1.0 if every held-out document was read to its end).

  With several processes, one whose lanes run out first feeds fully masked
  batches until the others are done, so all run the same steps.
  """
  lo, hi = trainer.local_lane_range()

  def pad_batch():  # this process's rows [K, hi - lo, seg_len], padding only (loss mask 0)
    batch = {k: np.zeros((v.shape[0], hi - lo, *v.shape[2:]), v.dtype) for k, v in trainer.abstract_batch().items()}
    batch["tokens"][:] = batch["labels"][:] = pipeline.tokenizer.pad_id
    batch["reset"][:] = True
    return batch

  lanes = pipeline.eval_lanes(trainer)
  metrics = trainer.evaluate(params, distributed.synchronized(lanes, pad_batch=pad_batch), max_batches=max_batches)
  incomplete = distributed.sum_over_processes(int(not lanes.exhausted()))
  return {**metrics, "documents": float(distributed.sum_over_processes(lanes.documents_read())),
          "documents_total": float(pipeline.eval_source.num_docs or 0), "complete": float(incomplete == 0)}
