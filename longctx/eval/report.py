"""Eval results on disk, as tables and as plots.

`RUN_DIR/eval/results.json` holds one entry per task (merged across calls, so
tasks can be evaluated one at a time); `--compare` reads several of them.

Plots (PNG, next to results.json):
  passkey_heatmap.png      accuracy on the depth x length grid
  accuracy_vs_length.png   one panel per recall task, one line per model, chance dashed,
                           the attention window marked
  loss_vs_position.png     bits per token vs token position (log scale), the attention window and the
                           segment length marked, how many documents each point averages (shaded where
                           fewer than MIN_DOCUMENTS remain)

Runs are named by their label (`longctx eval --label`) or else their run dir's name; a step is added
where two of the compared results would otherwise share a name.
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Sequence

from longctx.errors import CheckpointError
from longctx.eval.streaming import format_length
from longctx.plotting import pyplot

RESULTS = "results.json"


def eval_dir(run_dir: str | pathlib.Path) -> pathlib.Path:
  return pathlib.Path(run_dir) / "eval"


def load_results(path: str | pathlib.Path) -> dict:
  """Results of a run dir, its eval dir, or a results.json file."""
  path = pathlib.Path(path)
  for candidate in (path, path / RESULTS, eval_dir(path) / RESULTS):
    if candidate.is_file():
      try:
        return json.loads(candidate.read_text())
      except json.JSONDecodeError as e:
        raise CheckpointError(f"{candidate} is not valid JSON ({e}); rerun `longctx eval` to rewrite it") from None
  raise CheckpointError(f"no {RESULTS} under {path}; run `longctx eval {path} --task ...` first")


def save_results(out_dir: pathlib.Path, results: dict) -> pathlib.Path:
  """Merge `results["tasks"]` into out_dir/results.json (atomic rename)."""
  out_dir.mkdir(parents=True, exist_ok=True)
  path = out_dir / RESULTS
  merged = results
  if path.is_file():
    try:
      old = json.loads(path.read_text())
    except json.JSONDecodeError:
      old = {}
    if old.get("step") == results.get("step") and old.get("model") == results.get("model"):
      merged = {**old, **results, "tasks": {**old.get("tasks", {}), **results["tasks"]}}
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(json.dumps(merged, indent=2) + "\n")
  tmp.replace(path)
  return path


MIN_DOCUMENTS = 5  # loss-vs-position points averaging fewer documents are shaded as unreliable


def label_of(results: dict) -> str:
  """The name of a run in tables and legends: its --label, else its run dir's name."""
  if results.get("label"):
    return results["label"]
  name = pathlib.Path(results.get("run_dir") or "").name
  return name or f"{results.get('model', '?')}@{results.get('step', '?')}"


def _named(runs: Sequence[dict]) -> list[dict]:
  """`runs` with a "label" each, unique: "NAME @ step N" where two would share NAME."""
  names = [label_of(r) for r in runs]
  return [{**r, "label": f"{n} @ step {r.get('step', '?')}" if names.count(n) > 1 else n} for r, n in zip(runs, names)]


def _recall_tasks(runs: Sequence[dict]) -> list[str]:
  from longctx.data.synthetic import TASKS

  present = {t for r in runs for t in r["tasks"]}
  return [t for t in TASKS if t in present]


def format_tables(runs: Sequence[dict]) -> str:
  """Accuracy per task and length (and the passkey / mqar grids, loss per position range) for runs."""
  runs = _named(runs)
  lines = []
  recall = _recall_tasks(runs)
  for task in recall:
    entries = [(label_of(r), r["tasks"][task]) for r in runs if task in r["tasks"]]
    lengths = sorted({l for _, e in entries for l in e["lengths"]})
    chance = entries[0][1]["chance"]
    head = f"{task + ' accuracy':<24}" + "".join(f"{format_length(l):>8}" for l in lengths)
    lines += ["", f"{head}   (chance {100 * chance:.1f}%)", "-" * len(head)]
    for label, e in entries:
      by_len = dict(zip(e["lengths"], e["by_length"]))
      lines.append(f"{label:<24}" + "".join(f"{100 * by_len[l]:>7.1f}%" if l in by_len else f"{'-':>8}"
                                           for l in lengths))
    if any("token_accuracy" in e for _, e in entries):  # partial credit: answer tokens right
      lines.append(f"{'  answer tokens right:':<24}")
      for label, e in entries:
        if "token_accuracy" in e:
          by_len = dict(zip(e["lengths"], e["token_accuracy"]))
          lines.append(f"{'  ' + label:<24}" + "".join(f"{100 * by_len[l]:>7.1f}%" if l in by_len else f"{'-':>8}"
                                                       for l in lengths))
    for label, e in entries:
      if "cells" in e:
        lines += ["", f"{label}: {task} accuracy by {e['cells']} (rows) x length (columns)",
                  f"{e['cells']:>10}" + "".join(f"{format_length(l):>8}" for l in e["lengths"])]
        for value, row in zip(e["cell_values"], e["accuracy"]):
          lines.append(f"{value:>10}" + "".join(f"{100 * a:>7.1f}%" for a in row))
  ppl = [(label_of(r), r["tasks"]["ppl"]) for r in runs if "ppl" in r["tasks"]]
  if ppl:
    edges = ppl[0][1]["range_edges"]
    head = f"{'bits/token by position':<24}" + "".join(
        f"{format_length(a) + '-' + format_length(b):>14}" for a, b in zip(edges[:-1], edges[1:]))
    lines += ["", head, "-" * len(head)]
    for label, e in ppl:
      lines.append(f"{label:<24}" + "".join(f"{'-':>14}" if x is None else f"{x:>14.4f}"
                                           for x in e["range_bits_per_token"]))
  reach = [(label_of(r), r["tasks"]["reach"]) for r in runs if "reach" in r["tasks"]]
  if reach:
    from longctx.eval.reach import format_reach

    lines += format_reach(reach)
  return "\n".join(lines).lstrip("\n")


def plot_passkey_heatmap(results: dict, path: pathlib.Path) -> pathlib.Path | None:
  e = results["tasks"].get("passkey")
  if not e or "cells" not in e:
    return None
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(max(5.0, 2.0 + 0.9 * len(e["lengths"])),
                                  max(3.5, 1.5 + 0.5 * len(e["cell_values"]))))
  im = ax.imshow(e["accuracy"], vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
  ax.set_xticks(range(len(e["lengths"])), [format_length(l) for l in e["lengths"]])
  ax.set_yticks(range(len(e["cell_values"])), [f"{d:.2f}" for d in e["cell_values"]])
  for i, row in enumerate(e["accuracy"]):
    for j, a in enumerate(row):
      ax.text(j, i, f"{100 * a:.0f}", ha="center", va="center", fontsize=8)
  ax.set_xlabel("context length (tokens)")
  ax.set_ylabel("depth of the key (0 = start)")
  ax.set_title(f"passkey accuracy (%): {label_of(results)}", fontsize=10)
  fig.colorbar(im, ax=ax, label="accuracy")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def plot_accuracy_vs_length(runs: Sequence[dict], path: pathlib.Path) -> pathlib.Path | None:
  tasks = _recall_tasks(runs)
  if not tasks:
    return None
  plt = pyplot()
  fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.4), squeeze=False)
  for ax, task in zip(axes[0], tasks):
    chance = None
    for r in runs:
      e = r["tasks"].get(task)
      if not e:
        continue
      chance = e["chance"]
      (line,) = ax.plot(e["lengths"], [100 * a for a in e["by_length"]], marker="o", label=label_of(r))
      if r.get("window"):
        ax.axvline(r["window"], color=line.get_color(), ls=":", lw=1)
    if chance is not None:
      ax.axhline(100 * chance, color="gray", ls="--", lw=1, label="chance")
    ax.set_xscale("log", base=2)
    ax.set_ylim(-3, 103)
    ax.set_title(task)
    ax.set_xlabel("context length (tokens; dotted: window)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def plot_loss_vs_position(runs: Sequence[dict], path: pathlib.Path) -> pathlib.Path | None:
  fig = loss_vs_position_figure(runs)
  if fig is None:
    return None
  fig.savefig(path, dpi=120)
  pyplot().close(fig)
  return path


def loss_vs_position_figure(runs: Sequence[dict]):
  """The matplotlib figure of `loss_vs_position.png` (None without ppl results)."""
  entries = [(label_of(r), r, r["tasks"]["ppl"]) for r in runs if "ppl" in r["tasks"]]
  if not entries:
    return None
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.2))
  docs_ax = ax.twinx()
  few_from = None  # the first position where some run's points average fewer than MIN_DOCUMENTS documents
  for label, r, e in entries:
    edges, docs = e["bin_edges"], e.get("bin_documents")
    pts = [((a + b) / 2, y, None if docs is None else docs[i])
           for i, (a, b, y) in enumerate(zip(edges[:-1], edges[1:], e["bits_per_token"])) if y is not None]
    xs = [max(p[0], 1) for p in pts]
    (line,) = ax.plot(xs, [p[1] for p in pts], marker=".", label=label)
    color = line.get_color()
    if docs is not None:
      docs_ax.step(xs, [p[2] for p in pts], where="mid", color=color, alpha=0.35, lw=1)
      few = [x for x, p in zip(xs, pts) if p[2] < MIN_DOCUMENTS]
      if few:
        few_from = min(few) if few_from is None else min(few_from, min(few))
    if r.get("window"):
      ax.axvline(r["window"], color=color, ls=":", lw=1.2, label=f"{label}: attention window {r['window']}")
    seg_len = e.get("seg_len") or r.get("seg_len")
    if seg_len:
      ax.axvline(seg_len, color=color, ls="-.", lw=1, label=f"{label}: segment length {seg_len}")
  if few_from is not None:
    ax.axvspan(few_from, ax.get_xlim()[1], color="gray", alpha=0.12,
               label=f"fewer than {MIN_DOCUMENTS} documents per point")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("token position in the document")
  ax.set_ylabel("bits per token")
  docs_ax.set_ylabel("documents per point (faint steps)", color="gray")
  docs_ax.tick_params(axis="y", colors="gray")
  docs_ax.set_ylim(bottom=0)
  ax.set_title("bits per token vs position in the document (held-out documents)", fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


def write_plots(runs: Sequence[dict], out_dir: pathlib.Path) -> list[pathlib.Path]:
  out_dir.mkdir(parents=True, exist_ok=True)
  runs = _named(runs)
  made = [plot_accuracy_vs_length(runs, out_dir / "accuracy_vs_length.png"),
          plot_loss_vs_position(runs, out_dir / "loss_vs_position.png")]
  reach = [(label_of(r), r["tasks"]["reach"]) for r in runs if "reach" in r["tasks"]]
  if reach:
    from longctx.eval.reach import plot_reach

    made.append(plot_reach(reach, out_dir / "reach.png"))
  if len(runs) == 1:
    made.append(plot_passkey_heatmap(runs[0], out_dir / "passkey_heatmap.png"))
  else:
    for r in runs:
      name = re.sub(r"[^A-Za-z0-9._-]+", "_", label_of(r)).strip("_")
      made.append(plot_passkey_heatmap(r, out_dir / f"passkey_heatmap_{name}.png"))
  return [p for p in made if p]
