"""Metrics: JSONL log, TensorBoard event files and a loss-curve PNG in the run dir."""

from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Any

from longctx.plotting import pyplot


SUPERSEDED = "metrics_superseded.jsonl"


class MetricsLogger:
  """Appends one JSON object per line to `run_dir/metrics.jsonl` and mirrors
  scalars to TensorBoard event files in `run_dir/tensorboard/`.

  `start_step`: the step training (re)starts from. The log keeps one history: rows of later steps (written
  by a run that died after its last checkpoint, whose steps are now trained again) move to
  `metrics_superseded.jsonl`, and the TensorBoard event files are rewritten from the rows kept, so
  neither a plot nor TensorBoard draws a step twice. A (step, split) already logged is not logged again
  (the final eval of a run that is complete and is started again).
  """

  def __init__(self, run_dir: str | pathlib.Path, *, enabled: bool = True, start_step: int = 0):
    self.run_dir = pathlib.Path(run_dir)
    self.enabled = enabled
    self._tb = None
    self.path = self.run_dir / "metrics.jsonl"
    self._logged: set[tuple[int, str]] = set()
    if not enabled:
      return
    self.run_dir.mkdir(parents=True, exist_ok=True)
    kept = self._keep_history_until(start_step)
    self._logged = {(r.get("step"), r.get("split")) for r in kept}
    tb_dir = self.run_dir / "tensorboard"
    stale = sorted(tb_dir.glob("events.out.tfevents.*")) if tb_dir.is_dir() else []
    from tensorboardX import SummaryWriter

    self._tb = SummaryWriter(logdir=str(tb_dir), flush_secs=30)
    if stale:  # the dead run's events may reach past start_step: write the kept history anew
      for f in stale:
        f.unlink()
      for record in kept:
        self._mirror(record)
      self._tb.flush()

  def _keep_history_until(self, start_step: int) -> list[dict]:
    """Rows of steps <= start_step stay in metrics.jsonl; later ones are moved to SUPERSEDED."""
    kept, dropped = [], []
    for r in read_metrics(self.path):
      (kept if isinstance(r.get("step"), int) and r["step"] <= start_step else dropped).append(r)
    if dropped or not _ends_with_newline(self.path):  # or a killed process's partial last line
      if dropped:
        with (self.run_dir / SUPERSEDED).open("a") as f:
          f.writelines(json.dumps({**r, "superseded_at_step": start_step}) + "\n" for r in dropped)
      tmp = self.path.with_suffix(".jsonl.tmp")
      tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
      os.replace(tmp, self.path)
    return kept

  def log(self, step: int, split: str, metrics: dict[str, Any]) -> None:
    if not self.enabled or (int(step), split) in self._logged:
      return
    record = {"step": int(step), "split": split, **{k: _plain(v) for k, v in metrics.items()}}
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")
    self._logged.add((int(step), split))
    self._mirror(record)

  def _mirror(self, record: dict) -> None:
    for k, v in record.items():
      if k not in ("step", "split") and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        self._tb.add_scalar(f"{record['split']}/{k}", v, global_step=int(record["step"]))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.flush()
      self._tb.close()
      self._tb = None


def _ends_with_newline(path: pathlib.Path) -> bool:
  if not path.exists() or path.stat().st_size == 0:
    return True
  with path.open("rb") as f:
    f.seek(-1, os.SEEK_END)
    return f.read(1) == b"\n"


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
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(7, 4))
  ax.plot(*zip(*train), label="train", lw=1.2)
  if evals:
    ax.plot(*zip(*evals), "o-", label="eval (held-out documents)")
  starts = [(r["step"], int(r["stage"])) for r in records if r.get("split") == "stage" and "stage" in r]
  for i, (s, n) in enumerate(starts):  # a curriculum: where each stage began
    ax.axvline(s, color="gray", ls=":", lw=1, label="curriculum stage starts" if i == 0 else None)
    ax.annotate(f"stage {n}", (s, 1.0), xycoords=("data", "axes fraction"), fontsize=7, color="gray",
                xytext=(2, -10), textcoords="offset points")
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
