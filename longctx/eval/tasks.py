"""The long-context evaluation suite: what a model recalls, and how loss falls with position.

  passkey  accuracy on a depth x length grid (where the key sits x how long the input is)
(each recall task also reports per-token answer accuracy, partial credit per digit / token, beside
exact match, so progress shows before whole answers come out right)
  mqar     accuracy (per query) on a pairs x length grid
  qa1, qa2 accuracy vs length (BABILong-style, one / two supporting facts)
  copy     accuracy vs length
  ppl      loss (bits per token) vs token position on long held-out documents
  reach    forward dependence and gradient over distance (--lengths are the distances; longctx/eval/reach.py)

Every example is streamed through the model state segment by segment
(`streaming.score_rows`); an answer counts only if each of its tokens is the
greedy (argmax) prediction, i.e. exactly what greedy decoding would emit.
Results are plain dicts (JSON) so runs can be compared later.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from longctx.data import synthetic
from longctx.errors import ConfigError
from longctx.eval.streaming import TrainedModel, answer_hits, answer_token_hits, format_length, score_rows

RECALL_TASKS = synthetic.TASKS
EVAL_TASKS = RECALL_TASKS + ("ppl", "reach")
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def parse_eval_tasks(spec: str) -> list[str]:
  tasks = [t.strip() for t in spec.split(",") if t.strip()]
  bad = [t for t in tasks if t not in EVAL_TASKS]
  if not tasks or bad:
    raise ConfigError(f"--task {spec!r}: {bad or 'empty'} not in {EVAL_TASKS}")
  return tasks


def default_lengths(model: TrainedModel) -> list[int]:
  """1x, 4x, 16x and 64x the attention window (or 1k..64k for models without one)."""
  base = model.window or 1024
  return [base * m for m in (1, 4, 16, 64)]


def recall_examples(task: str, *, length: int, cells: Sequence, examples: int, seed: int, tokenizer):
  """`examples` documents per cell (a passkey depth, an mqar pair count, or None), deterministic by seed."""
  docs, metas = [], []
  for ci, cell in enumerate(cells):
    for i in range(examples):
      rng = np.random.default_rng([seed, RECALL_TASKS.index(task), length, ci, i])
      kwargs = {"depth": cell} if task == "passkey" else {"num_pairs": cell} if task == "mqar" else {}
      doc, meta = synthetic.make_example(task, rng=rng, length_tokens=length, tokenizer=tokenizer, **kwargs)
      docs.append(doc["tokens"])
      metas.append(meta)
  return docs, metas


def eval_recall(model: TrainedModel, task: str, *, lengths: Sequence[int], examples: int, seg_len: int,
                seed: int = 0, depths: Sequence[float] | None = None, pairs: Sequence[int] | None = None,
                progress: bool = True) -> dict:
  """Accuracy of `task` per cell (passkey depth / mqar pairs) and per length."""
  if task not in RECALL_TASKS:
    raise ConfigError(f"{task!r} is not a recall task {RECALL_TASKS}")
  if task == "passkey":
    cell_name, cells = "depth", list(depths if depths is not None else DEFAULT_DEPTHS)
  elif task == "mqar" and pairs:
    cell_name, cells = "pairs", list(pairs)
  else:
    cell_name, cells = None, [None]
  hits = np.zeros((len(cells), len(lengths)))
  totals = np.zeros((len(cells), len(lengths)))
  token_hits = np.zeros((len(cells), len(lengths)))  # partial credit: answer tokens predicted right
  token_totals = np.zeros((len(cells), len(lengths)))
  mean_tokens = []
  for li, length in enumerate(lengths):
    docs, metas = recall_examples(task, length=length, cells=cells, examples=examples, seed=seed,
                                  tokenizer=model.tokenizer)
    _, correct = score_rows(model, docs, seg_len=seg_len, progress=progress,
                            desc=f"{task} {format_length(length)}")
    for row, meta in enumerate(metas):
      ok = answer_hits(correct[row], meta["answer_spans"])
      hits[row // examples, li] += sum(ok)
      totals[row // examples, li] += len(ok)
      right, n = answer_token_hits(correct[row], meta["answer_spans"])
      token_hits[row // examples, li] += right
      token_totals[row // examples, li] += n
    mean_tokens.append(float(np.mean([len(d) for d in docs])))
  accuracy = hits / np.maximum(totals, 1)
  out = {"task": task, "lengths": list(lengths), "examples": examples, "seed": seed, "seg_len": seg_len,
         "mean_tokens": mean_tokens, "chance": synthetic.CHANCE[task],
         "by_length": (hits.sum(0) / np.maximum(totals.sum(0), 1)).tolist(), "answers": totals.sum(0).tolist(),
         "token_accuracy": (token_hits.sum(0) / np.maximum(token_totals.sum(0), 1)).tolist()}
  if cell_name:
    out.update({"cells": cell_name, "cell_values": cells, "accuracy": accuracy.tolist(),
                "token_accuracy_cells": (token_hits / np.maximum(token_totals, 1)).tolist()})
  return out


def position_bins(max_len: int, per_octave: int = 4) -> np.ndarray:
  """Log-spaced bin edges over token positions [0, max_len) for loss-vs-position curves."""
  edges = np.unique(np.round(2.0 ** np.arange(0, math.log2(max_len) + 1e-9, 1 / per_octave)).astype(int))
  return np.unique(np.concatenate([[0], edges, [max_len]]))


def long_documents(source, *, count: int, scan: int) -> list[np.ndarray]:
  """The `count` longest of the first `scan` documents of `source` (epoch 0), as token arrays."""
  docs = []
  for i, doc in enumerate(source.documents(0)):
    if i >= scan:
      break
    docs.append(doc)
  if not docs:
    raise ConfigError("the evaluation source has no documents; set data.eval_paths or data.source")
  docs.sort(key=lambda d: -len(d["tokens"]))
  return docs[:count]


def eval_position_loss(model: TrainedModel, source, *, lengths: Sequence[int], examples: int, seg_len: int,
                       scan: int = 256, progress: bool = True) -> dict:
  """Bits per token vs position on the longest held-out documents, truncated to max(lengths).

  Each target token (document's target_mask) at position p is scored given all
  tokens before it in its document (streamed); losses are averaged within
  log-spaced position bins, and within [0, l1), [l1, l2), ... for `lengths`.
  """
  max_len = max(lengths)
  docs = long_documents(source, count=examples, scan=max(scan, examples))
  rows = [d["tokens"][: max_len + 1] for d in docs]
  nll, _ = score_rows(model, rows, seg_len=seg_len, progress=progress, desc=f"ppl {format_length(max_len)}")
  # Entry t scores token t+1; count it if that token exists and is a target.
  weight = np.zeros(nll.shape, np.float64)
  for b, d in enumerate(docs):
    n = len(rows[b]) - 1
    weight[b, :n] = d["target_mask"][1: n + 1]
  per_pos_nll = (nll * weight).sum(0)
  per_pos_count = weight.sum(0)

  scored = np.array([len(r) - 1 for r in rows])  # tokens scored per document

  def binned(edges):
    loss, count, documents = [], [], []
    for a, b in zip(edges[:-1], edges[1:]):
      c = per_pos_count[a:b].sum()
      count.append(float(c))
      loss.append(float(per_pos_nll[a:b].sum() / c) if c else None)
      documents.append(int(np.sum(scored > a)))  # documents that reach into [a, b)
    return loss, count, documents

  fine = position_bins(max(2, nll.shape[1]))
  fine_loss, fine_count, fine_docs = binned(fine)
  coarse = np.unique([0] + [min(l, nll.shape[1]) for l in lengths])
  coarse_loss, coarse_count, _ = binned(coarse)
  to_bits = lambda xs: [None if x is None else x / math.log(2) for x in xs]
  return {"task": "ppl", "lengths": list(lengths), "documents": len(docs),
          "doc_tokens": [len(r) for r in rows], "seg_len": seg_len,
          "bin_edges": fine.tolist(), "bits_per_token": to_bits(fine_loss), "tokens": fine_count,
          "bin_documents": fine_docs,
          "range_edges": coarse.tolist(), "range_bits_per_token": to_bits(coarse_loss), "range_tokens": coarse_count}
