"""Metrics: JSONL log, TensorBoard event files and a loss-curve PNG in the run dir."""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any


class MetricsLogger:
  """Appends one JSON object per line to `run_dir/metrics.jsonl` and mirrors
  scalars to TensorBoard event files in `run_dir/tensorboard/`."""

  def __init__(self, run_dir: str | pathlib.Path, *, enabled: bool = True):
    self.run_dir = pathlib.Path(run_dir)
    self.enabled = enabled
    self._tb = None
    if enabled:
      self.run_dir.mkdir(parents=True, exist_ok=True)
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(logdir=str(self.run_dir / "tensorboard"), flush_secs=30)
    self.path = self.run_dir / "metrics.jsonl"
    if enabled and self.path.exists() and self.path.stat().st_size:
      with self.path.open("rb+") as f:  # a process killed mid-write leaves a partial line: end it
        f.seek(-1, 2)
        if f.read(1) != b"\n":
          f.write(b"\n")

  def log(self, step: int, split: str, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "split": split, **{k: _plain(v) for k, v in metrics.items()}}
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")
    for k, v in record.items():
      if k not in ("step", "split") and isinstance(v, (int, float)) and math.isfinite(v):
        self._tb.add_scalar(f"{split}/{k}", v, global_step=int(step))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.flush()
      self._tb.close()
      self._tb = None


def _plain(v: Any) -> Any:
  try:
    return float(v) if not isinstance(v, (int, str, bool)) else v
  except (TypeError, ValueError):
    return str(v)


def read_metrics(path: str | pathlib.Path) -> list[dict]:
  path = pathlib.Path(path)
  if not path.exists():
    return []
  records = []
  for line in path.read_text(errors="replace").splitlines():
    try:
      record = json.loads(line)
    except ValueError:  # the partial last line of a killed process
      continue
    if isinstance(record, dict):
      records.append(record)
  return records


def plot_loss_curve(run_dir: str | pathlib.Path) -> pathlib.Path | None:
  """Write `run_dir/loss.png` (train and eval loss vs step) from metrics.jsonl."""
  run_dir = pathlib.Path(run_dir)
  records = read_metrics(run_dir / "metrics.jsonl")
  train = [(r["step"], r["loss"]) for r in records if r.get("split") == "train" and "loss" in r]
  evals = [(r["step"], r["loss"]) for r in records if r.get("split") == "eval" and "loss" in r]
  if not train:
    return None
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4))
  ax.plot(*zip(*train), label="train", lw=1.2)
  if evals:
    ax.plot(*zip(*evals), "o-", label="eval (held-out documents)")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats / token)")
  ax.set_title(run_dir.name)
  ax.grid(alpha=0.3)
  ax.legend()
  out = run_dir / "loss.png"
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  plt.close(fig)
  return out
