"""`longctx train`: data -> compiled steps -> logs, evals, checkpoints; resumes automatically.

Everything that can fail on user input (config, tokenizer, data files, mesh)
is checked before anything is written to the run directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import signal
import threading
import time
from typing import Any, Callable

import jax
import numpy as np

from longctx import config as config_lib
from longctx import distributed
from longctx.config import Config
from longctx.errors import CheckpointError, ConfigError, TrainingError
from longctx.sharding import describe
from longctx.training.checkpoint import Checkpointer, load_initial_params
from longctx.training.metrics import MetricsLogger, plot_loss_curve
from longctx.training.trainer import Trainer

# Changing these between a checkpoint and a resume would silently change what is trained.
_RESUME_MUST_MATCH = ("model", "data.batch_size", "data.seg_len", "data.segments_per_step", "data.source",
                      "data.tokenizer", "data.task", "data.seed")


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


def build_pipeline(cfg: Config) -> Pipeline:
  from longctx.data.sources import build_sources
  from longctx.data.tokenizers import check_fits_model, load_tokenizer

  tokenizer = load_tokenizer(cfg.data.tokenizer)
  check_fits_model(tokenizer, cfg.data.tokenizer, cfg.model.vocab_size)
  train_source, eval_source = build_sources(cfg.data, tokenizer)
  return Pipeline(tokenizer, train_source, eval_source)


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
  only process 0 logs, prints and writes metrics, config.json and plots.

  Args:
    stop_at_step: end this run (with a checkpoint) after this global step, as a
      preempted job would; a later call continues to `cfg.train.steps`.
  Returns:
    A summary dict: steps run, final train and eval metrics, paths, and `lanes`,
    the (start, stop) range of lanes this process read.
  """
  cfg.validate()
  if "://" in str(run_dir):  # pathlib would turn gs://b/x into a local directory gs:/b/x on every host
    raise ConfigError(f"run dir {str(run_dir)!r} is a URL, but the run dir is written through the local "
                      "filesystem; mount the bucket (e.g. gcsfuse) on every host and pass the mounted path")
  run_dir = pathlib.Path(run_dir)
  existing = next(p for p in (run_dir, *run_dir.absolute().parents) if p.exists())
  if not existing.is_dir():
    raise ConfigError(f"run dir {str(run_dir)!r} " + ("is a file, not a directory" if existing == run_dir else
                      f"cannot be made: {str(existing)!r} is a file") + "; pass another --run-dir")
  pipeline = build_pipeline(cfg)  # data problems surface here, before anything is written
  trainer = Trainer(cfg, devices=devices)
  lanes = pipeline.train_lanes(trainer)
  is_host0 = jax.process_index() == 0
  if not is_host0:
    log = lambda *_: None  # noqa: E731
  distributed.assert_same(str(run_dir.absolute()), "the run dir")
  distributed.assert_same(json.dumps(config_lib.to_dict(cfg), sort_keys=True), "the config")
  tc = cfg.train

  ckpt = Checkpointer(run_dir / "checkpoints", keep=tc.keep_checkpoints, async_save=tc.async_checkpoint)
  latest = ckpt.newest_intact_step(log)
  if latest is not None:
    extra = ckpt.restore_extra(latest)
    check_resume_compatible(extra.get("config", {}), cfg, run_dir)
    ts, extra = ckpt.restore(latest, trainer.abstract_train_state_sharded())
    lanes.load_state_dict(extra["data"])
    log(f"resumed from {run_dir / 'checkpoints' / str(latest)} (step {latest})"
        + (f"; train.init_from={tc.init_from} is not read again" if tc.init_from else ""))
  else:
    ts = trainer.init_train_state()
    if tc.init_from:
      ts["params"], line = load_initial_params(tc.init_from, model_cfg=cfg.model,
                                               abstract_params=trainer.abstract_train_state_sharded()["params"])
      log(line)
  start = int(jax.device_get(ts["step"]))
  if is_host0:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(config_lib.to_dict(cfg), indent=2) + "\n")
  logger = MetricsLogger(run_dir, enabled=is_host0)
  end = tc.steps if stop_at_step is None else min(tc.steps, stop_at_step)
  if start == 0:
    log(f"model {cfg.model.name}: {trainer.num_params / 1e6:.2f}M params | mesh {describe(trainer.mesh)} | "
        f"{cfg.data.batch_size} lanes x {cfg.data.segments_per_step} segments x {cfg.data.seg_len} tokens per step")
    if trainer.mesh.shape["sequence"] > 1:
      form = trainer.model_class.context_parallel or "none of its own; XLA partitions it (each block gathered)"
      log(f"context parallel over {trainer.mesh.shape['sequence']} devices: {form}")

  def extra_state():  # the data position of every lane, gathered from all processes
    return {"data": distributed.gather_lane_state(lanes.state_dict()), "config": config_lib.to_dict(cfg)}

  losses, last_saved, train_metrics, eval_metrics = [], latest, {}, {}
  bar = _progress(end, start, progress and is_host0)
  window_tokens, window_start = 0.0, time.perf_counter()
  tokens_per_step = cfg.data.batch_size * cfg.data.segments_per_step * cfg.data.seg_len
  last_save_time, skipped_in_a_row, stopped_by = time.monotonic(), 0, None
  signals = StopSignals()
  try:
    for step in range(start + 1, end + 1):
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
      window_tokens += tokens_per_step  # every token read, targets or not
      bar.update(1)
      if step % tc.log_every == 0 or step == end:
        elapsed = time.perf_counter() - window_start
        metrics["tokens_per_s"] = window_tokens / max(elapsed, 1e-9)
        window_tokens, window_start = 0.0, time.perf_counter()
        logger.log(step, "train", metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
      train_metrics = metrics
      if tc.eval_every and step % tc.eval_every == 0 and step != end:
        eval_metrics = evaluate(trainer, pipeline, ts["params"], max_batches=tc.eval_batches)
        logger.log(step, "eval", eval_metrics)
      stopped_by = signals.agreed()
      permanent = step % tc.checkpoint_every == 0 or step == end
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
  if stopped_by:
    logger.close()
    log(f"stopped by {stopped_by} after step {last_saved}; checkpoint saved in {run_dir / 'checkpoints'}. "
        "Rerun the same command to resume")
    return {"start_step": start, "end_step": last_saved, "losses": losses, "train": train_metrics, "eval": {},
            "train_state": ts, "plot": None, "run_dir": str(run_dir), "lanes": trainer.local_lane_range(),
            "stopped_by": stopped_by}
  if end == tc.steps:  # the run is complete: report held-out loss
    eval_metrics = evaluate(trainer, pipeline, ts["params"], max_batches=tc.eval_batches)
    logger.log(end, "eval", eval_metrics)
    log(f"eval @ step {end}: loss {eval_metrics['loss']:.4f} | bits/token {eval_metrics['bits_per_token']:.4f} | "
        f"ppl {eval_metrics['perplexity']:.2f} | {int(eval_metrics['tokens'])} held-out tokens")
  logger.close()
  plot = plot_loss_curve(run_dir) if is_host0 else None
  return {"start_step": start, "end_step": end, "losses": losses, "train": train_metrics, "eval": eval_metrics,
          "train_state": ts, "plot": str(plot) if plot else None, "run_dir": str(run_dir),
          "lanes": trainer.local_lane_range()}


def evaluate(trainer: Trainer, pipeline: Pipeline, params, *, max_batches: int = 0) -> dict:
  """Stream every held-out document through fresh lane states (or `max_batches` batches).

  With several processes, one whose lanes run out first feeds fully masked
  batches until the others are done, so all run the same steps.
  """
  lo, hi = trainer.local_lane_range()

  def pad_batch():  # this process's rows [K, hi - lo, seg_len], padding only (loss mask 0)
    batch = {k: np.zeros((v.shape[0], hi - lo, *v.shape[2:]), v.dtype) for k, v in trainer.abstract_batch().items()}
    batch["tokens"][:] = batch["labels"][:] = pipeline.tokenizer.pad_id
    batch["reset"][:] = True
    return batch

  batches = distributed.synchronized(pipeline.eval_lanes(trainer), pad_batch=pad_batch)
  return trainer.evaluate(params, batches, max_batches=max_batches)
