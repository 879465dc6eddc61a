"""Long-context evaluation: streaming scorer, task suite, results and plots.

    model = load_trained("runs/recall/transformer")
    results = run_suite(model, tasks=["passkey", "qa1"], lengths=[128, 512, 2048], examples=16)
"""

from __future__ import annotations

from typing import Sequence

from longctx.eval.streaming import TrainedModel, answer_hits, load_trained, parse_lengths, score_rows
from longctx.eval.tasks import EVAL_TASKS, RECALL_TASKS, default_lengths, eval_position_loss, eval_recall


def run_suite(model: TrainedModel, *, tasks: Sequence[str], lengths: Sequence[int], examples: int,
              seg_len: int | None = None, seed: int = 0, depths: Sequence[float] | None = None,
              pairs: Sequence[int] | None = None, progress: bool = True, label: str = "") -> dict:
  """Evaluate `tasks` at `lengths`; returns the results dict written to results.json."""
  seg_len = seg_len or model.cfg.data.seg_len
  out = {"model": model.name, "step": model.step, "run_dir": str(model.run_dir), "window": model.window,
         "seg_len": seg_len, "label": label, "tasks": {}}
  for task in tasks:
    if task == "ppl":
      from longctx.training.loop import build_pipeline

      source = build_pipeline(model.cfg).eval_source
      out["tasks"][task] = eval_position_loss(model, source, lengths=lengths, examples=examples, seg_len=seg_len,
                                              progress=progress)
      out["tasks"][task]["source"] = model.cfg.data.source
    elif task == "reach":
      from longctx.eval.reach import measure_reach

      out["tasks"][task] = measure_reach(model, distances=lengths, seg_len=seg_len, samples=min(examples, 8),
                                         seed=seed)
    else:
      out["tasks"][task] = eval_recall(model, task, lengths=lengths, examples=examples, seg_len=seg_len,
                                       seed=seed, depths=depths, pairs=pairs, progress=progress)
  return out


__all__ = ["TrainedModel", "load_trained", "score_rows", "answer_hits", "parse_lengths", "run_suite",
           "EVAL_TASKS", "RECALL_TASKS", "default_lengths"]
