"""Document sources: the Python stdlib, local files, HF hub streams, synthetic tasks.

A document is `{"tokens": int32 [n], "target_mask": bool [n]}` with tokens =
[BOS] + body + [EOS]; `target_mask[i]` says whether token i is a prediction
target (predicted from the tokens before it); `target_mask[0]` is False. An
optional `loss_weight` float32 [n] replaces the mask's 0/1 loss weights.

A source is deterministic given its seed: `get(epoch, i)` (random access, where
the source allows) or `documents(epoch)` (sequential) yield the same documents
in the same order every time; each epoch is reshuffled by (seed, epoch).
"""

from __future__ import annotations

import hashlib
import pathlib
import sysconfig
from typing import Callable, Iterator, Sequence

import numpy as np

from longctx.config import DataConfig
from longctx.errors import DataError

Document = dict[str, np.ndarray]


def make_document(body: np.ndarray, tokenizer, *, target_mask: np.ndarray | None = None) -> Document:
  """Wrap token ids `[n]` as [BOS] + body + [EOS]; every token after BOS is a target unless
  `target_mask [n]` (for the body) says otherwise. EOS is a target iff the body's last token is."""
  body = np.asarray(body, np.int32)
  tokens = np.concatenate([[tokenizer.bos_id], body, [tokenizer.eos_id]]).astype(np.int32)
  if target_mask is None:
    mask = np.ones(tokens.shape, bool)
  else:
    tm = np.asarray(target_mask, bool)
    mask = np.concatenate([[False], tm, [tm[-1] if len(tm) else True]])
  mask[0] = False
  return {"tokens": tokens, "target_mask": mask}


class DocumentSource:
  """Base class. Subclasses with random access set `num_docs` and implement `_load(i)`."""

  num_docs: int | None = None

  def __init__(self, *, seed: int = 0, shuffle: bool = True):
    self.seed = seed
    self.shuffle = shuffle
    self._perm_cache: dict[int, np.ndarray] = {}

  @property
  def random_access(self) -> bool:
    return self.num_docs is not None

  def order(self, epoch: int) -> np.ndarray:
    """The document order of `epoch` (a permutation of range(num_docs))."""
    if epoch not in self._perm_cache:
      n = self.num_docs
      perm = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
      self._perm_cache = {epoch: perm}  # keep one epoch's order in memory
    return self._perm_cache[epoch]

  def get(self, epoch: int, i: int) -> Document:
    """The i-th document of `epoch`."""
    return self._load(int(self.order(epoch)[i]))

  def documents(self, epoch: int) -> Iterator[Document]:
    for i in range(self.num_docs):
      yield self.get(epoch, i)

  def _load(self, index: int) -> Document:
    raise NotImplementedError


class TextListSource(DocumentSource):
  """Random-access texts from a loader `text_at(index)`; tokenized on access."""

  def __init__(self, count: int, text_at: Callable[[int], str], tokenizer, *, name: str, seed: int = 0,
               shuffle: bool = True):
    super().__init__(seed=seed, shuffle=shuffle)
    if count == 0:
      raise DataError(f"{name} yields no documents; check the paths / split / eval_fraction")
    self.num_docs = count
    self._text_at = text_at
    self.tokenizer = tokenizer
    self.name = name

  def _load(self, index: int) -> Document:
    return make_document(self.tokenizer.encode(self._text_at(index)), self.tokenizer)


def _stable_fraction(key: str) -> float:
  """A number in [0, 1) fixed by `key` (for reproducible train/eval splits)."""
  return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 2**32


def _split(keys: Sequence[str], eval_fraction: float) -> tuple[list[int], list[int]]:
  train, held = [], []
  for i, key in enumerate(keys):
    (held if _stable_fraction(key) < eval_fraction else train).append(i)
  if not held and eval_fraction > 0 and len(keys) > 1:  # always hold out at least one document
    held.append(train.pop())
  return train, held


# ----------------------------------------------------------------------------- stdlib


def stdlib_files() -> list[pathlib.Path]:
  """The Python standard library's own `.py` files (no tests, no site-packages), sorted."""
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  files = []
  for p in sorted(root.rglob("*.py")):
    rel = p.relative_to(root).parts
    if any(part in ("site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__") for part in rel):
      continue
    files.append(p)
  return files


def _read_text_file(path: pathlib.Path) -> str:
  return path.read_bytes().decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------- files


# Where the paths and the text field came from, for the fix an error names: a training config, or the
# command line of `longctx tokenizer train`.
DATA_FLAGS = {"paths": "data.paths (or data.eval_paths)", "text_field": "set data.text_field"}
TOKENIZER_FLAGS = {"paths": "--input", "text_field": "pass --text-field"}


def _expand(paths: Sequence[str], flags: dict = DATA_FLAGS) -> list[str]:
  """Glob patterns (`books/*.txt`, `**/*.jsonl`) expanded, sorted; plain paths kept as they are."""
  import glob

  out = []
  for p in paths:
    if glob.has_magic(p) and not pathlib.Path(p).exists():
      matches = sorted(m for m in glob.glob(p, recursive=True) if pathlib.Path(m).is_file())
      if not matches:
        raise DataError(f"data path pattern {p!r} matches no file; check {flags['paths']}")
      out.extend(matches)
    else:
      out.append(p)
  return out


def _check_paths(paths: Sequence[str], flags: dict = DATA_FLAGS) -> list[pathlib.Path]:
  out = []
  for p in _expand(paths, flags):
    path = pathlib.Path(p)
    if path.is_dir():
      raise DataError(f"data file {p!r} is a directory; list its files in {flags['paths']}, or a pattern such as "
                      f"{str(path / '*.txt')!r}")
    if not path.is_file():
      raise DataError(f"data file {p!r} not found; check {flags['paths']}")
    if path.suffix not in (".txt", ".jsonl", ".json", ".parquet"):
      raise DataError(f"data file {p!r} has an unsupported type {path.suffix!r}; use .txt, .jsonl or .parquet")
    out.append(path)
  return out


def _datasets():
  """HF `datasets`, quiet: its progress bars would clutter our own output and error lines."""
  import datasets

  datasets.disable_progress_bars()
  # Nor its error logs: what it cannot read it also raises (reported by us in one line), or reads with a fallback.
  datasets.logging.set_verbosity(datasets.logging.CRITICAL)
  return datasets


def load_text_dataset(paths: Sequence[str], *, text_field: str, flags: dict = DATA_FLAGS):
  """Load local files with HF `datasets` as one Dataset of `text_field` rows.

  .txt: one document per file; .jsonl / .parquet: one document per row. `flags` name the settings that
  errors point to (DATA_FLAGS or TOKENIZER_FLAGS).
  """
  datasets = _datasets()

  files = _check_paths(paths, flags)
  parts = []
  for kind, suffixes in (("text", (".txt",)), ("json", (".jsonl", ".json")), ("parquet", (".parquet",))):
    group = [str(f) for f in files if f.suffix in suffixes]
    if not group:
      continue
    kwargs = {"sample_by": "document"} if kind == "text" else {}
    try:
      ds = datasets.load_dataset(kind, data_files=group, split="train", **kwargs)
    except Exception as e:
      raise DataError(f"could not read {group[0] if len(group) == 1 else group!r} ({_root_cause(e)}); "
                      f"{_READABLE[kind]}") from None
    field = "text" if kind == "text" else text_field
    if field not in ds.column_names:
      raise DataError(f"field {field!r} not in {group[0]!r}; its fields are {ds.column_names}; "
                      f"{flags['text_field']}")
    ds = ds.select_columns([field])
    if field != "text":
      ds = ds.rename_column(field, "text")
    parts.append(ds.cast_column("text", datasets.Value("string")))  # parquet may say large_string
  return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


_READABLE = {"text": ".txt files must be UTF-8 text", "json": ".jsonl files need one JSON object per line",
             "parquet": "is it a parquet file?"}


def _root_cause(e: BaseException) -> str:
  """`Type: message` (first line) of the innermost exception behind `e`: HF datasets wraps the real problem
  (a UnicodeDecodeError, a JSON parse error) in a DatasetGenerationError that says only that one occurred."""
  seen = {id(e)}
  while (inner := e.__cause__ or e.__context__) is not None and id(inner) not in seen:
    seen.add(id(inner))
    e = inner
  lines = str(e).strip().splitlines()
  return f"{type(e).__name__}: {lines[0][:150]}" if lines else type(e).__name__


def read_texts(paths: Sequence[str], *, text_field: str = "text", flags: dict = DATA_FLAGS) -> Iterator[str]:
  ds = load_text_dataset(paths, text_field=text_field, flags=flags)
  for row in ds:
    if row["text"]:
      yield row["text"]


def _non_empty_indices(ds) -> list[int]:
  return [i for i, t in enumerate(ds["text"]) if t and t.strip()]


# ----------------------------------------------------------------------------- hub


class HubSource(DocumentSource):
  """A Hugging Face hub dataset streamed by name (e.g. `deepmind/pg19`, field `text`).

  Sequential only (no random access): each epoch streams the split, shuffled
  through a buffer seeded by (seed, epoch). A local directory of data files is
  accepted as `name` too, which runs the same streaming code offline.
  """

  def __init__(self, name: str, *, config: str = "", split: str, text_field: str, tokenizer, seed: int = 0,
               max_docs: int = 0, shuffle_buffer: int = 1000):
    super().__init__(seed=seed, shuffle=shuffle_buffer > 0)
    self.name, self.config, self.split, self.text_field = name, config or None, split, text_field
    self.tokenizer, self.max_docs, self.shuffle_buffer = tokenizer, max_docs, shuffle_buffer
    self._stream(0)  # fail early (one line) if the dataset cannot be opened

  def _stream(self, epoch: int):
    datasets = _datasets()

    try:
      ds = datasets.load_dataset(self.name, self.config, split=self.split, streaming=True)
    except Exception as e:
      raise DataError(f"could not open hub dataset {self.name!r} split {self.split!r} "
                      f"({type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''}); check the name, "
                      "split and network, or use local files with data.source=files") from None
    if self.shuffle:
      ds = ds.shuffle(seed=self.seed * 1000 + epoch, buffer_size=self.shuffle_buffer)
    return ds

  def documents(self, epoch: int) -> Iterator[Document]:
    n = 0
    for row in self._stream(epoch):
      if self.text_field not in row:
        raise DataError(f"field {self.text_field!r} not in hub dataset {self.name!r}; its fields are "
                        f"{sorted(row)}; set data.text_field")
      text = row[self.text_field]
      if not text:
        continue
      yield make_document(self.tokenizer.encode(text), self.tokenizer)
      n += 1
      if self.max_docs and n >= self.max_docs:
        return
    if n == 0:
      raise DataError(f"hub dataset {self.name!r} split {self.split!r} yields no documents")


# ----------------------------------------------------------------------------- synthetic


class SyntheticSource(DocumentSource):
  """Generated long-context task documents (see `synthetic.py`); random access, endless variety.

  `task` is one task or a comma-separated mixture (each document draws one of
  the listed names uniformly, so a task listed twice is drawn twice as often);
  lengths are `length` tokens, or log-uniform in [min_length, length].
  """

  def __init__(self, task: str, *, tokenizer, length: int, num_docs: int, seed: int, min_length: int = 0,
               prompt_loss_weight: float = 0.0):
    from longctx.data import synthetic

    super().__init__(seed=seed, shuffle=False)
    self.tasks = synthetic.parse_tasks(task)
    self.tokenizer, self.length, self.min_length, self.num_docs = tokenizer, length, min_length, num_docs
    self.prompt_loss_weight = prompt_loss_weight

  def get(self, epoch: int, i: int) -> Document:
    from longctx.data import synthetic

    rng = np.random.default_rng([self.seed, epoch, i])
    task = self.tasks[rng.integers(len(self.tasks))] if len(self.tasks) > 1 else self.tasks[0]
    length = self.length
    if self.min_length:
      length = int(np.exp(rng.uniform(np.log(self.min_length), np.log(self.length))))
    doc, _ = synthetic.make_example(task, rng=rng, length_tokens=length, tokenizer=self.tokenizer,
                                    prompt_loss_weight=self.prompt_loss_weight)
    return doc


# ----------------------------------------------------------------------------- factory


def build_sources(cfg: DataConfig, tokenizer) -> tuple[DocumentSource, DocumentSource]:
  """(train, eval) sources for a data config. Raises DataError naming the problem."""
  cap = lambda idx: idx[: cfg.num_docs] if cfg.num_docs else idx
  if cfg.source == "synthetic":
    n = cfg.num_docs or 10_000
    make = lambda count, seed: SyntheticSource(
        cfg.task, tokenizer=tokenizer, length=cfg.task_length, num_docs=count, seed=seed,
        min_length=cfg.task_min_length, prompt_loss_weight=cfg.prompt_loss_weight)
    return make(n, cfg.seed), make(max(64, n // 50), cfg.seed + 1_000_003)
  if cfg.source == "stdlib":
    files = stdlib_files()
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    train, held = _split([str(f.relative_to(root)) for f in files], cfg.eval_fraction)
    make = lambda idx, name: TextListSource(len(idx), lambda i: _read_text_file(files[idx[i]]), tokenizer,
                                            name=name, seed=cfg.seed)
    return make(cap(train), "stdlib train split"), make(held, "stdlib held-out split")
  if cfg.source == "files":
    ds = load_text_dataset(cfg.paths, text_field=cfg.text_field)
    keep = _non_empty_indices(ds)
    if not keep:
      raise DataError(f"data files {cfg.paths} contain no non-empty documents")
    texts = lambda d, idx: (lambda i: d[int(idx[i])]["text"])
    if cfg.eval_paths:
      eds = load_text_dataset(cfg.eval_paths, text_field=cfg.text_field)
      ekeep = _non_empty_indices(eds)
      train_idx, eval_ds, eval_idx = cap(keep), eds, ekeep
    else:
      tr, he = _split([f"{i}:{ds[i]['text'][:200]}" for i in keep], cfg.eval_fraction)
      if not tr or not he:  # one document, or eval_fraction 0: nothing to hold out (or nothing left to train on)
        raise DataError(
            f"data files {cfg.paths} hold {len(keep)} non-empty document(s) and data.eval_fraction="
            f"{cfg.eval_fraction}: too few to split into training and held-out documents; add documents (a .txt "
            "file is one document, a .jsonl line one) or set data.eval_paths")
      train_idx, eval_ds, eval_idx = cap([keep[i] for i in tr]), ds, [keep[i] for i in he]
    return (TextListSource(len(train_idx), texts(ds, train_idx), tokenizer, name=f"files {cfg.paths}",
                           seed=cfg.seed),
            TextListSource(len(eval_idx), texts(eval_ds, eval_idx), tokenizer,
                           name=f"held-out files {cfg.eval_paths or cfg.paths}", seed=cfg.seed))
  if cfg.source == "hub":
    common = dict(config=cfg.hub_config, text_field=cfg.text_field, tokenizer=tokenizer, seed=cfg.seed)
    return (HubSource(cfg.hub_name, split=cfg.split, max_docs=cfg.num_docs, **common),
            HubSource(cfg.hub_name, split=cfg.eval_split, shuffle_buffer=0, **common))
  raise DataError(f"unknown data.source {cfg.source!r}")


__all__ = ["Document", "DocumentSource", "TextListSource", "HubSource", "SyntheticSource", "build_sources",
           "make_document", "stdlib_files", "load_text_dataset", "read_texts"]
