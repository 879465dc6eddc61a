"""Document sources: the Python stdlib, local files, HF hub streams, synthetic tasks.

Every source yields `Document`s (`longctx/data/document.py`).

A source is deterministic given its seed: `get(epoch, i)` (random access, where
the source allows) or `documents(epoch)` (sequential) yield the same documents
in the same order every time; each epoch is reshuffled by (seed, epoch).
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import sysconfig
from typing import Callable, Iterator, Sequence

import numpy as np

from longctx.config import DataConfig
from longctx.data.document import Document, make_document
from longctx.errors import DataError

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
  """Random-access texts from a loader `text_at(index)`; tokenized on access. `names[i]` says where
  document i comes from (a file, or a file's row), for the list of held-out documents."""

  def __init__(self, count: int, text_at: Callable[[int], str], tokenizer, *, name: str, seed: int = 0,
               shuffle: bool = True, names: Sequence[str] | None = None):
    super().__init__(seed=seed, shuffle=shuffle)
    if count == 0:
      raise DataError(f"{name} yields no documents; check the paths / split / eval_fraction")
    self.num_docs = count
    self._text_at = text_at
    self.tokenizer = tokenizer
    self.name = name
    self.names = list(names) if names is not None else None

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
DATA_FLAGS = {"paths": "data.paths (or data.eval_paths)", "text_field": "set data.text_field",
              "skip": "set data.skip_unreadable=true to skip such files"}
TOKENIZER_FLAGS = {"paths": "--input", "text_field": "pass --text-field", "skip": "leave it out of --input"}

# How a data file is read, by its name once a compression suffix is taken off: rows of a table, or (any
# other name: .txt, .tex, .md, .py, .rst, none, ...) one UTF-8 text document per file.
ROW_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")  # read by `datasets` (zstandard for .zst)


def _strip_compression(name: str) -> str:
  for suffix in COMPRESSIONS:
    if name.endswith(suffix):
      return name[: -len(suffix)]
  return name


def file_kind(path: str | pathlib.Path) -> str:
  """"text", "json" or "parquet": how `load_text_dataset` reads this file."""
  return ROW_FORMATS.get(pathlib.PurePath(_strip_compression(pathlib.Path(path).name.lower())).suffix, "text")


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
    out.append(path)
  return out


def _datasets():
  """HF `datasets`, quiet: its progress bars would clutter our own output and error lines."""
  import datasets

  datasets.disable_progress_bars()
  # Nor its error logs: what it cannot read it also raises (reported by us in one line), or reads with a fallback.
  datasets.logging.set_verbosity(datasets.logging.CRITICAL)
  return datasets


def _open_decompressed(path: pathlib.Path):
  """A binary file object of `path`'s contents, decompressed by its suffix."""
  import bz2
  import gzip
  import lzma

  name = path.name.lower()
  if name.endswith(".gz"):
    return gzip.open(path, "rb")
  if name.endswith(".bz2"):
    return bz2.open(path, "rb")
  if name.endswith(".xz"):
    return lzma.open(path, "rb")
  if name.endswith(".zst"):
    import zstandard

    return zstandard.open(path, "rb")
  return path.open("rb")


def unreadable_reason(path: pathlib.Path, kind: str) -> str | None:
  """Why `path` cannot be read as `kind` (a few words: "is not UTF-8 text (byte 1234 is 0xe9)"), or None.

  Only called once `datasets` has failed, to name the file (it names none)."""
  import codecs

  try:
    if kind == "parquet":
      import pyarrow.parquet as pq

      pq.read_metadata(path)
      return None
    decoder, offset, line = codecs.getincrementaldecoder("utf-8")(), 0, 1
    rows = kind == "json" and _strip_compression(path.name.lower()).endswith(".jsonl")  # JSON lines: check each
    with _open_decompressed(path) as f:
      text_tail = ""
      while chunk := f.read(1 << 20):
        try:
          text = decoder.decode(chunk)
        except UnicodeDecodeError as e:
          return f"is not UTF-8 text (byte {offset + e.start} is 0x{chunk[e.start]:02x})"
        offset += len(chunk)
        if rows:
          text_tail += text
          *complete, text_tail = text_tail.split("\n")
          for row in complete:
            if (problem := _json_row_problem(row, line)) is not None:
              return problem
            line += 1
      decoder.decode(b"", final=True)
      if rows and (problem := _json_row_problem(text_tail, line)) is not None:
        return problem
  except UnicodeDecodeError as e:  # truncated at the very end
    return f"is not UTF-8 text (it ends inside a character: {e.reason})"
  except Exception as e:  # noqa: BLE001 - a damaged archive, an unreadable parquet footer, permissions
    lines = str(e).strip().splitlines()
    return f"cannot be read ({type(e).__name__}{': ' + lines[0][:120] if lines else ''})"
  return None


def _json_row_problem(row: str, line: int) -> str | None:
  import json

  if not row.strip():
    return None
  try:
    value = json.loads(row)
  except ValueError as e:
    return f"line {line} is not JSON ({str(e)[:80]}); .jsonl files need one JSON object per line"
  if not isinstance(value, dict):
    return f"line {line} is a JSON {type(value).__name__}, not an object; .jsonl files need one object per line"
  return None


def load_text_dataset(paths: Sequence[str], *, text_field: str, flags: dict = DATA_FLAGS,
                      skip_unreadable: bool = False, warn=None):
  """Load local files with HF `datasets` as one Dataset of `text_field` rows, and a name for every row.

  .jsonl / .json / .parquet: one document per row; any other file (.txt, .tex, .md, .py, ...): one UTF-8
  text document; each also compressed (.gz, .bz2, .xz, .zst). A file that cannot be read is named in the
  error (or, with `skip_unreadable`, skipped, and counted in one `warn` line). `flags` name the settings
  that errors point to (DATA_FLAGS or TOKENIZER_FLAGS).

  Returns (dataset with one column "text", names: one string per row, e.g. "books/a.txt" or
  "data.jsonl row 17").
  """
  datasets = _datasets()

  files = _check_paths(paths, flags)
  parts, names, skipped = [], [], []
  for kind in ("text", "json", "parquet"):
    group = [f for f in files if file_kind(f) == kind]
    if not group:
      continue
    kwargs = {"sample_by": "document"} if kind == "text" else {}
    while True:
      try:
        ds = datasets.load_dataset(kind, data_files=[str(f) for f in group], split="train", **kwargs)
        break
      except Exception as e:
        bad = [(f, r) for f in group if (r := unreadable_reason(f, kind)) is not None]
        if not bad:
          first = group[0] if len(group) == 1 else f"one of {len(group)} {kind} files ({group[0]}, ...)"
          raise DataError(f"could not read {first} ({_root_cause(e)}); {_READABLE[kind]}") from None
        if not skip_unreadable:
          (f, reason), more = bad[0], (f" ({len(bad) - 1} more such files)" if len(bad) > 1 else "")
          fix = "convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8)" if "UTF-8" in reason else "fix or remove it"
          raise DataError(f"data file {str(f)!r} {reason}{more}; {fix}, or {flags['skip']}") from None
        skipped += bad
        group = [f for f in group if f not in {b for b, _ in bad}]
        if not group:
          break
    if not group:
      continue
    field = "text" if kind == "text" else text_field
    if field not in ds.column_names:
      raise DataError(f"field {field!r} not in {str(group[0])!r}; its fields are {ds.column_names}; "
                      f"{flags['text_field']}")
    ds = ds.select_columns([field])
    if field != "text":
      ds = ds.rename_column(field, "text")
    parts.append(ds.cast_column("text", datasets.Value("string")))  # parquet may say large_string
    names += _row_names(group, kind, len(ds))
  if skipped:
    (f, reason) = skipped[0]
    (warn or print)(f"warning: skipped {len(skipped)} unreadable data file(s) (data.skip_unreadable=true); the "
                    f"first: {str(f)!r} {reason}")
  if not parts:
    raise DataError(f"every data file in {list(paths)} was unreadable and skipped; check {flags['paths']}")
  return (parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)), names


def _row_names(files: Sequence[pathlib.Path], kind: str, rows: int) -> list[str]:
  """One name per row: the file (text), or "FILE row N" where the rows of each file can be counted."""
  if kind == "text":  # sample_by="document": one row per file, in order
    return [str(f) for f in files] if len(files) == rows else [f"text file row {i}" for i in range(rows)]
  counts = []
  try:
    for f in files:
      if kind == "parquet":
        import pyarrow.parquet as pq

        counts.append(pq.read_metadata(f).num_rows)
      elif _strip_compression(f.name.lower()).endswith(".jsonl"):
        with _open_decompressed(f) as fh:
          counts.append(sum(1 for line in fh if line.strip()))
      else:
        raise ValueError("rows not countable")
  except (ValueError, OSError):
    counts = []
  if sum(counts) != rows or len(counts) != len(files):
    return [f"{kind} row {i} of {', '.join(map(str, files))}"[:200] for i in range(rows)]
  return [f"{f} row {r}" for f, n in zip(files, counts) for r in range(n)]


_READABLE = {"text": "text files must be UTF-8", "json": ".jsonl files need one JSON object per line",
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
  ds, _ = load_text_dataset(paths, text_field=text_field, flags=flags)
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
    if not pathlib.Path(name).is_dir():
      probe_hub_dataset(name)  # offline or unreachable: one line in a second, not minutes of retries
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


HUB_PROBE_TIMEOUT_S = 5.0
_OFFLINE_FIX = "download it and use data.source=files (or a local directory as data.hub_name)"


def probe_hub_dataset(name: str) -> None:
  """Ask the hub about dataset `name` once, with a short timeout and no retries; one DataError line if the
  hub is switched off (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE), unreachable, or has no such dataset."""
  for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
    if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
      raise DataError(f"{var} is set, so hub dataset {name!r} cannot be streamed; unset {var}, or {_OFFLINE_FIX}")
  import logging

  from huggingface_hub import HfApi, errors

  endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
  hub_logger = logging.getLogger("huggingface_hub")
  level, hub_logger.level = hub_logger.level, logging.ERROR
  try:
    HfApi(endpoint=endpoint).dataset_info(name, timeout=HUB_PROBE_TIMEOUT_S)
  except errors.GatedRepoError:
    raise DataError(f"hub dataset {name!r} is gated: accept its terms on {endpoint}/datasets/{name} and log in "
                    "(hf auth login)") from None
  except errors.RepositoryNotFoundError:
    raise DataError(f"the hub ({endpoint}) has no dataset {name!r} (or it is private: log in with hf auth login); "
                    "check data.hub_name") from None
  except errors.HfHubHTTPError as e:
    status = getattr(getattr(e, "response", None), "status_code", "?")
    raise DataError(f"the hub ({endpoint}) answered HTTP {status} about dataset {name!r}; try again later, or "
                    f"{_OFFLINE_FIX}") from None
  except Exception as e:  # noqa: BLE001 - DNS, refused, timeout, TLS: the hub cannot be reached
    lines = str(e).strip().splitlines()
    raise DataError(f"cannot reach the Hugging Face hub at {endpoint} to stream dataset {name!r} "
                    f"({type(e).__name__}{': ' + lines[0][:100] if lines else ''}); check the network (or "
                    f"HF_ENDPOINT), or {_OFFLINE_FIX}") from None
  finally:
    hub_logger.setLevel(level)


# ----------------------------------------------------------------------------- synthetic


class SyntheticSource(DocumentSource):
  """Generated long-context task documents (see `synthetic.py`); random access, endless variety.

  `task` is one task or a comma-separated mixture (each document draws one of
  the listed names uniformly, so a task listed twice is drawn twice as often);
  lengths are `length` tokens, or log-uniform in [min_length, length].
  """

  def __init__(self, task: str, *, tokenizer, length: int, num_docs: int, seed: int, min_length: int = 0,
               prompt_loss_weight: float = 0.0, passkey_depth: Sequence[float] = ()):
    from longctx.data import synthetic

    super().__init__(seed=seed, shuffle=False)
    self.tasks = synthetic.parse_tasks(task)
    self.tokenizer, self.length, self.min_length, self.num_docs = tokenizer, length, min_length, num_docs
    self.prompt_loss_weight = prompt_loss_weight
    self.passkey_depth = tuple(passkey_depth) or None

  def get(self, epoch: int, i: int) -> Document:
    from longctx.data import synthetic

    rng = np.random.default_rng([self.seed, epoch, i])
    task = self.tasks[rng.integers(len(self.tasks))] if len(self.tasks) > 1 else self.tasks[0]
    length = self.length
    if self.min_length:
      length = int(np.exp(rng.uniform(np.log(self.min_length), np.log(self.length))))
    doc, _ = synthetic.make_example(task, rng=rng, length_tokens=length, tokenizer=self.tokenizer,
                                    prompt_loss_weight=self.prompt_loss_weight, depth_range=self.passkey_depth)
    return doc


# ----------------------------------------------------------------------------- factory


def build_sources(cfg: DataConfig, tokenizer, *, warn=None) -> tuple[DocumentSource, DocumentSource]:
  """(train, eval) sources for a data config. Raises DataError naming the problem; `warn` gets the one
  warning line of skipped unreadable files (data.skip_unreadable)."""
  cap = lambda idx: idx[: cfg.num_docs] if cfg.num_docs else idx
  if cfg.source == "synthetic":
    n = cfg.num_docs or 10_000
    make = lambda count, seed: SyntheticSource(
        cfg.task, tokenizer=tokenizer, length=cfg.task_length, num_docs=count, seed=seed,
        min_length=cfg.task_min_length, prompt_loss_weight=cfg.prompt_loss_weight, passkey_depth=cfg.passkey_depth)
    return make(n, cfg.seed), make(max(64, n // 50), cfg.seed + 1_000_003)
  if cfg.source == "stdlib":
    files = stdlib_files()
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    rel = [str(f.relative_to(root)) for f in files]
    train, held = _split(rel, cfg.eval_fraction)
    make = lambda idx, name: TextListSource(len(idx), lambda i: _read_text_file(files[idx[i]]), tokenizer,
                                            name=name, seed=cfg.seed, names=[rel[i] for i in idx])
    return make(cap(train), "stdlib train split"), make(held, "stdlib held-out split")
  if cfg.source == "files":
    load = lambda paths: load_text_dataset(paths, text_field=cfg.text_field, skip_unreadable=cfg.skip_unreadable,
                                           warn=warn)
    ds, names = load(cfg.paths)
    keep = _non_empty_indices(ds)
    if not keep:
      raise DataError(f"data files {cfg.paths} contain no non-empty documents")
    texts = lambda d, idx: (lambda i: d[int(idx[i])]["text"])
    if cfg.eval_paths:
      eds, enames = load(cfg.eval_paths)
      ekeep = _non_empty_indices(eds)
      train_idx, eval_ds, eval_idx, eval_names = cap(keep), eds, ekeep, enames
    else:
      tr, he = _split([f"{i}:{ds[i]['text'][:200]}" for i in keep], cfg.eval_fraction)
      if not tr or not he:  # one document, or eval_fraction 0: nothing to hold out (or nothing left to train on)
        raise DataError(
            f"data files {cfg.paths} hold {len(keep)} non-empty document(s) and data.eval_fraction="
            f"{cfg.eval_fraction}: too few to split into training and held-out documents; add documents (a text "
            "file is one document, a .jsonl line one) or set data.eval_paths")
      train_idx, eval_ds, eval_idx, eval_names = cap([keep[i] for i in tr]), ds, [keep[i] for i in he], names
    return (TextListSource(len(train_idx), texts(ds, train_idx), tokenizer, name=f"files {cfg.paths}",
                           seed=cfg.seed, names=[names[i] for i in train_idx]),
            TextListSource(len(eval_idx), texts(eval_ds, eval_idx), tokenizer,
                           name=f"held-out files {cfg.eval_paths or cfg.paths}", seed=cfg.seed,
                           names=[eval_names[i] for i in eval_idx]))
  if cfg.source == "hub":
    common = dict(config=cfg.hub_config, text_field=cfg.text_field, tokenizer=tokenizer, seed=cfg.seed)
    return (HubSource(cfg.hub_name, split=cfg.split, max_docs=cfg.num_docs, **common),
            HubSource(cfg.hub_name, split=cfg.eval_split, shuffle_buffer=0, **common))
  raise DataError(f"unknown data.source {cfg.source!r}")


__all__ = ["Document", "DocumentSource", "TextListSource", "HubSource", "SyntheticSource", "build_sources",
           "make_document", "stdlib_files", "load_text_dataset", "read_texts"]
