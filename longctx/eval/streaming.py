"""Streaming scoring: token rows of any length -> per-token loss and argmax hits, segment by segment.

A trained model is evaluated the way it is meant to run on long inputs: each
row is fed `seg_len` tokens at a time through the model's state, so memory is
that of one segment whatever the length (attention is never materialised over
the whole input). Several segments go into one compiled call (a `lax.scan`),
and the next call is dispatched before the previous call's scores are read, so
the host never stalls the device.

    model = load_trained(run_dir)
    nll, correct = score_rows(model, rows, seg_len=512)

`nll[b, t]` is -log p(token t+1 | tokens <= t) of row b (nats) and
`correct[b, t]` says whether token t+1 was the argmax prediction.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import re
from typing import Any, Sequence

import jax
import numpy as np

from longctx import config as config_lib
from longctx import recipe as recipe_lib
from longctx.config import Config
from longctx.errors import CheckpointError, ConfigError
from longctx.io.runs import read_saved_config, resolve_checkpoint

# Tokens per compiled call: enough to amortise dispatch, small enough to keep memory flat.
TOKENS_PER_CALL = 4096


def parse_length(text: str) -> int:
  """'512' -> 512, '4k' -> 4096, '1M' -> 1048576 (binary multiples)."""
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*", text)
  if not m:
    raise ConfigError(f"length {text!r} is not a number like 512, 4k or 1M")
  value = float(m.group(1)) * {"": 1, "k": 1024, "m": 1024**2}[m.group(2).lower()]
  if value < 1:
    raise ConfigError(f"length {text!r} must be >= 1")
  return int(value)


def parse_lengths(spec: str) -> list[int]:
  return [parse_length(x) for x in spec.split(",") if x.strip()]


def format_length(n: int) -> str:
  for unit, size in (("M", 1024**2), ("k", 1024)):
    if n >= size and n % size == 0:
      return f"{n // size}{unit}"
  return str(n)


@dataclasses.dataclass
class TrainedModel:
  """A restored checkpoint: its config, parameters (sharded on `mesh`) and tokenizer."""

  cfg: Config
  params: Any
  step: int
  run_dir: pathlib.Path
  tokenizer: Any
  devices: Sequence[Any] | None = None  # None: every device (the mesh config must fit them)
  _trainers: dict = dataclasses.field(default_factory=dict, repr=False)

  @property
  def name(self) -> str:
    return self.cfg.model.name

  @property
  def window(self) -> int | None:
    return getattr(self.cfg.model, "window", None)

  def trainer(self, *, lanes: int, seg_len: int, segments: int):
    """A Trainer whose steps take `segments x lanes x seg_len` batches (compiled once per shape)."""
    from longctx.training.trainer import Trainer

    key = (lanes, seg_len, segments)
    if key not in self._trainers:
      data = dataclasses.replace(self.cfg.data, batch_size=lanes, seg_len=seg_len, segments_per_step=segments)
      cfg = config_lib.replace(self.cfg, data=data)
      self._trainers[key] = Trainer(cfg, devices=self.devices)
    return self._trainers[key]


def load_trained(path: str | pathlib.Path, *, overrides: Sequence[str] = ()) -> TrainedModel:
  """Restore the latest (or the named) checkpoint of a run written by `longctx train`.

  `overrides` are `--set` strings applied to the saved config (e.g. a data
  source to evaluate on, or a mesh that fits this machine).
  """
  from longctx.data.tokenizers import check_fits_model, load_tokenizer, tokenizer_in
  from longctx.training.checkpoint import Checkpointer
  from longctx.training.trainer import Trainer

  run_dir, step = resolve_checkpoint(path)
  cfg_path = run_dir / "config.json"
  if not cfg_path.is_file():
    raise CheckpointError(f"{cfg_path} not found; pass a run directory written by `longctx train` "
                          "(or one of its checkpoints/STEP directories)")
  saved = read_saved_config(cfg_path)
  if not any(o.startswith("data.tokenizer=") for o in overrides):  # the run's own copy of its tokenizer
    saved["data"]["tokenizer"] = tokenizer_in(run_dir, saved["data"].get("tokenizer", "byte"))
  cfg = recipe_lib.validate(config_lib.apply_overrides(recipe_lib.from_dict(saved), list(overrides)))
  # Restore with the saved model (its state, e.g. a kNN memory, has the saved size); model overrides
  # may resize state such as `model.memory_size` but must not change the weights.
  restore_cfg = recipe_lib.validate(config_lib.apply_overrides(recipe_lib.from_dict(saved),
                                                           [o for o in overrides if not o.startswith("model.")]))
  tokenizer = load_tokenizer(cfg.data.tokenizer)
  check_fits_model(tokenizer, cfg.data.tokenizer, cfg.model.vocab_size)
  ckpt = Checkpointer(run_dir / "checkpoints", create=False)
  try:
    step = ckpt.checked_step(step)
    train_trainer = Trainer(restore_cfg)  # the layout the checkpoint was written with
    ts, _ = ckpt.restore(step, train_trainer.abstract_train_state_sharded())
  finally:
    ckpt.close()
  if cfg.model != restore_cfg.model:
    want = jax.tree.map(lambda x: x.shape, Trainer(cfg).abstract_train_state["params"])
    if want != jax.tree.map(lambda x: x.shape, ts["params"]):
      changed = [o for o in overrides if o.startswith("model.")]
      raise CheckpointError(f"--set {' '.join(changed)} changes the shapes of the trained weights; only model "
                            "fields that size the state (e.g. model.memory_size) may be overridden at eval time")
  return TrainedModel(cfg=cfg, params=ts["params"], step=int(step), run_dir=run_dir, tokenizer=tokenizer)


def _to_host(x: jax.Array) -> np.ndarray:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def score_rows(model: TrainedModel, rows: Sequence[np.ndarray], *, seg_len: int, progress: bool = True,
               desc: str = "stream") -> tuple[np.ndarray, np.ndarray]:
  """Stream every row through fresh model state, `seg_len` tokens at a time.

  Args:
    rows: token id arrays `[n_b]` (each a document, BOS first); lengths may differ
      (shorter rows are padded at the end, which cannot affect earlier tokens).
  Returns:
    nll `[rows, T]` float32 and correct `[rows, T]` bool, T = longest row; entry
    t scores token t+1 given tokens <= t (entries past a row's end are padding).
  """
  if not rows:
    raise ConfigError("nothing to score: no rows")
  from longctx.sharding import make_mesh, num_batch_shards

  n_rows, longest = len(rows), max(len(r) for r in rows)
  n_segments = math.ceil(longest / seg_len)
  per_call = max(1, min(n_segments, TOKENS_PER_CALL // seg_len))
  n_calls = math.ceil(n_segments / per_call)
  shards = num_batch_shards(make_mesh(model.cfg.mesh, model.devices))
  lanes = math.ceil(n_rows / shards) * shards
  trainer = model.trainer(lanes=lanes, seg_len=seg_len, segments=per_call)
  chunk = per_call * seg_len
  pad = model.tokenizer.pad_id
  tokens = np.full((lanes, n_calls * chunk + 1), pad, np.int32)
  for b, r in enumerate(rows):
    tokens[b, : len(r)] = r
  nll_out = np.zeros((lanes, n_calls * chunk), np.float32)
  correct_out = np.zeros((lanes, n_calls * chunk), bool)
  lo, hi = trainer.local_lane_range()
  ones = np.ones((per_call, hi - lo, seg_len), np.float32)
  zeros = np.zeros((per_call, hi - lo, seg_len), np.int32)

  def to_segments(x):  # [lanes, chunk] -> [K, lanes, seg_len]
    return x.reshape(x.shape[0], per_call, seg_len).transpose(1, 0, 2)

  from tqdm.auto import tqdm

  bar = tqdm(total=n_rows * longest, disable=not (progress and jax.process_index() == 0), unit="tok",
             unit_scale=True, desc=desc, dynamic_ncols=True, mininterval=1.0)

  def store(c, nll, correct):
    sl = slice(c * chunk, (c + 1) * chunk)
    nll_out[:, sl] = _to_host(nll).transpose(1, 0, 2).reshape(lanes, chunk)
    correct_out[:, sl] = _to_host(correct).transpose(1, 0, 2).reshape(lanes, chunk)
    bar.update(n_rows * min(chunk, longest - c * chunk))

  state = trainer.init_model_state()
  pending = None
  with bar:
    for c in range(n_calls):
      window = tokens[lo:hi, c * chunk: (c + 1) * chunk + 1]
      reset = np.zeros((per_call, hi - lo), bool)
      reset[0] = c == 0
      batch = trainer.put_batch({"tokens": to_segments(window[:, :-1]), "labels": to_segments(window[:, 1:]),
                                 "loss_mask": ones, "segment_ids": zeros, "reset": reset})
      state, nll, correct = trainer.score_step(model.params, state, batch)
      if pending is not None:  # read the previous call's scores while this one runs
        store(*pending)
      pending = (c, nll, correct)
    store(*pending)
  return nll_out[:n_rows, :longest], correct_out[:n_rows, :longest]


def answer_hits(correct: np.ndarray, spans: Sequence[tuple[int, int]]) -> list[bool]:
  """Exact match per answer: every token of span `[start, end)` was the argmax prediction.

  `correct [T]` is one row of `score_rows` (entry t scores token t+1), so the
  span's tokens are scored at entries start-1 .. end-2.
  """
  return [bool(np.all(correct[s - 1: e - 1])) for s, e in spans]


def answer_token_hits(correct: np.ndarray, spans: Sequence[tuple[int, int]]) -> tuple[int, int]:
  """(answer tokens that were the argmax prediction, answer tokens): partial credit, e.g. per passkey digit."""
  return (int(sum(np.sum(correct[s - 1: e - 1]) for s, e in spans)), int(sum(e - s for s, e in spans)))
