"""Train every synthetic recall recipe, evaluate each, and write the comparison table and plots.

    python scripts/recall_table.py                       # all recipes, runs/recall/<model>
    python scripts/recall_table.py --models transformer,rmt --cores 0 --tasks passkey,mqar
    python scripts/recall_table.py --eval-only           # re-evaluate finished runs

Each model trains `recipes/synthetic/<model>_recall.py` (a run dir resumes, so rerunning continues), pinned
to `--cores` with taskset where it exists, and is timed (wall-clock minutes of training, compile included).
Then `longctx eval --task ...` at 1x, 4x, 16x and 64x the recipe's window and `longctx eval --compare` over
all of them: OUT/table.md (the README's recall table: exact match per length, answer tokens right, training
minutes), OUT/accuracy_vs_length.png and OUT/reach.png (forward dependence and gradient over distance).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes" / "synthetic"
MEMORY_MODELS = ("rmt", "block_recurrent", "memorizing", "melodi", "infini_attention", "titans", "mamba2", "mamba",
                 "retnet")


def _longctx(*args: str, cores: str) -> list[str]:
  cmd = [sys.executable, "-m", "longctx.cli", *args]
  if cores and shutil.which("taskset"):
    cmd = ["taskset", "-c", cores, *cmd]
  return cmd


def _window() -> int:
  sys.path.insert(0, str(RECIPES))
  import _recall  # noqa: PLC0415

  return _recall.WINDOW


def _state_sizes(name: str, longest: int) -> list[str]:
  """`--set` overrides that size a recipe's state for the longest evaluation: a kNN memory holds all of it."""
  sys.path.insert(0, str(ROOT))
  from longctx import recipe as recipe_lib  # noqa: PLC0415

  model = recipe_lib.load_recipe(RECIPES / f"{name}_recall.py").model
  size = getattr(model, "memory_size", None)  # the Memorizing Transformer's kNN memory (entries per head)
  return ["--set", f"model.memory_size={longest}"] if size is not None and size < longest else []


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
  p.add_argument("--models", default=",".join(("transformer", "transformer_short") + MEMORY_MODELS),
                 help="comma-separated recipe names (recipes/synthetic/<name>_recall.py); default: all, control first")
  p.add_argument("--out", default="runs/recall", help="parent of the run dirs; the table and plots go to OUT/compare")
  p.add_argument("--tasks", default="passkey,mqar,qa1", help="recall tasks to evaluate (default passkey,mqar,qa1)")
  p.add_argument("--examples", type=int, default=16, help="examples per cell (default 16)")
  p.add_argument("--cores", default="0", help="CPU cores to pin training and eval to (taskset -c; '' = no pinning)")
  p.add_argument("--eval-only", action="store_true", help="skip training; evaluate the existing run dirs")
  p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                 help="a config override passed to every `longctx train` (repeatable)")
  args = p.parse_args(argv)
  models = [m for m in args.models.split(",") if m]
  missing = [m for m in models if not (RECIPES / f"{m}_recall.py").is_file()]
  if missing:
    print(f"error: no recipe recipes/synthetic/<name>_recall.py for {missing}", file=sys.stderr)
    return 2
  out = pathlib.Path(args.out)
  w = _window()
  lengths = ",".join(str(w * m) for m in (1, 4, 16, 64))
  minutes = {}
  timing = out / "train_minutes.json"
  if timing.is_file():
    minutes = json.loads(timing.read_text())
  for m in models:
    run = out / m
    if not args.eval_only:
      t0 = time.perf_counter()
      cmd = _longctx("train", str(RECIPES / f"{m}_recall.py"), "--run-dir", str(run), "--no-progress",
                     *[x for o in args.overrides for x in ("--set", o)], cores=args.cores)
      print("+", " ".join(cmd), flush=True)
      subprocess.run(cmd, check=True, cwd=ROOT)
      minutes[m] = minutes.get(m, 0.0) + (time.perf_counter() - t0) / 60
      out.mkdir(parents=True, exist_ok=True)
      timing.write_text(json.dumps(minutes, indent=1))
    cmd = _longctx("eval", str(run), "--task", args.tasks, "--lengths", lengths, "--examples", str(args.examples),
                   "--no-progress", *_state_sizes(m, 64 * w), cores=args.cores)
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    cmd = _longctx("eval", str(run), "--task", "reach", "--lengths", ",".join(str(w * m) for m in (1, 2, 4, 8, 16)),
                   "--examples", "4", "--no-progress", cores=args.cores)
    subprocess.run(cmd, check=True, cwd=ROOT)
  compare = out / "compare"
  cmd = _longctx("eval", "--compare", *[str(out / m) for m in models], "--out", str(compare), cores=args.cores)
  print("+", " ".join(cmd), flush=True)
  subprocess.run(cmd, check=True, cwd=ROOT)
  table = markdown_table([out / m for m in models], minutes, args.tasks.split(","))
  compare.mkdir(parents=True, exist_ok=True)
  (compare / "table.md").write_text(table)
  print(table)
  print(f"table: {compare / 'table.md'}")
  return 0


def markdown_table(runs, minutes: dict, tasks) -> str:
  """Exact match (answer tokens right) per task and length, one row per model, its training minutes."""
  sys.path.insert(0, str(ROOT))
  from longctx.eval import report

  head = "| model | train min | " + " | ".join(f"{t} 1x / 4x / 16x / 64x" for t in tasks) + " |"
  lines = [head, "|" + "---|" * (2 + len(tasks))]
  for run in runs:
    r = report.load_results(run)
    cells = []
    for t in tasks:
      e = r["tasks"].get(t)
      if not e:
        cells.append("-")
        continue
      exact = " / ".join(f"{100 * a:.0f}" for a in e["by_length"])
      partial = " / ".join(f"{100 * a:.0f}" for a in e.get("token_accuracy", []))
      cells.append(exact + (f" ({partial})" if partial else ""))
    name = run.name + (" (control)" if run.name.startswith("transformer") else "")
    lines.append(f"| {name} | {minutes.get(run.name, float('nan')):.1f} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n\n(exact match %, greedy; in brackets: answer tokens right %)\n"


if __name__ == "__main__":
  sys.exit(main())
