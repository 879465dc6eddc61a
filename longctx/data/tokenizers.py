"""Tokenizers: a byte-level tokenizer needing no file, and sentencepiece (train or load)."""

from __future__ import annotations

import pathlib
import re
import shutil
import tempfile
from typing import Iterable, Protocol, Sequence

import numpy as np

from longctx.errors import DataError


class Tokenizer(Protocol):
  vocab_size: int
  bos_id: int
  eos_id: int
  pad_id: int

  def encode(self, text: str) -> np.ndarray:
    """Token ids `[n]` int32 of `text`, without BOS/EOS."""

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`, special ids skipped."""


class ByteTokenizer:
  """UTF-8 bytes 0..255, then BOS=256, EOS=257, PAD=258 (vocab 259)."""

  vocab_size = 259
  bos_id = 256
  eos_id = 257
  pad_id = 258
  name = "byte"

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

  def decode(self, ids: Sequence[int]) -> str:
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class SentencePieceTokenizer:
  """A trained sentencepiece `.model` (see `train_sentencepiece`)."""

  def __init__(self, path: str | pathlib.Path):
    import sentencepiece as spm

    path = pathlib.Path(path)
    if not path.is_file():
      raise DataError(f"tokenizer model {str(path)!r} not found; train one with `longctx tokenizer train` "
                      "or use data.tokenizer=byte")
    try:
      self._sp = spm.SentencePieceProcessor(model_file=str(path))
    except Exception as e:
      raise DataError(f"tokenizer model {str(path)!r} could not be loaded ({type(e).__name__}); "
                      "is it a sentencepiece .model file?") from None
    self.name = str(path)
    self.vocab_size = int(self._sp.get_piece_size())
    self.bos_id, self.eos_id, self.pad_id = self._sp.bos_id(), self._sp.eos_id(), self._sp.pad_id()
    if min(self.bos_id, self.eos_id, self.pad_id) < 0:
      raise DataError(f"tokenizer model {str(path)!r} lacks a BOS, EOS or PAD id; retrain it with "
                      "`longctx tokenizer train` (which defines all three)")

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text), dtype=np.int32)

  def decode(self, ids: Sequence[int]) -> str:
    special = {self.bos_id, self.eos_id, self.pad_id}
    return self._sp.decode([int(i) for i in ids if int(i) not in special])


def load_tokenizer(spec: str) -> Tokenizer:
  """`"byte"` or a path to a sentencepiece `.model`."""
  if spec == "byte":
    return ByteTokenizer()
  return SentencePieceTokenizer(spec)


def check_fits_model(tokenizer: Tokenizer, spec: str, vocab_size: int) -> None:
  """Every id of `tokenizer` (loaded from `spec`) must have a row in a model of `vocab_size` ids."""
  from longctx.errors import ConfigError

  if tokenizer.vocab_size > vocab_size:
    raise ConfigError(f"tokenizer {spec!r} has {tokenizer.vocab_size} ids but model.vocab_size={vocab_size}; "
                      f"set --set model.vocab_size={tokenizer.vocab_size}")


def train_sentencepiece(inputs: Sequence[str], *, model_prefix: str, vocab_size: int,
                        model_type: str = "unigram", text_field: str = "text",
                        character_coverage: float = 1.0, max_documents: int = 0) -> str:
  """Train a sentencepiece model from .txt/.jsonl/.parquet files; returns the `.model` path.

  Ids: PAD=0, UNK=1, BOS=2, EOS=3.
  """
  import sentencepiece as spm

  from longctx.data.sources import TOKENIZER_FLAGS, read_texts

  if vocab_size < 8:
    raise DataError(f"--vocab-size={vocab_size} is too small; use at least a few hundred")
  prefix = pathlib.Path(model_prefix)
  if prefix.is_dir() or not prefix.name or prefix.name in (".", ".."):
    raise DataError(f"--out {str(model_prefix)!r} is a directory, but it is the prefix of the files to write "
                    f"(PREFIX.model, PREFIX.vocab); pass e.g. --out {prefix / 'tok'}")
  blocked = next((p for p in prefix.absolute().parents if p.exists() and not p.is_dir()), None)
  if blocked is not None:
    raise DataError(f"--out {str(model_prefix)!r}: {str(blocked)!r} is a file, not a directory")
  texts = read_texts(list(inputs), text_field=text_field, flags=TOKENIZER_FLAGS)
  with tempfile.TemporaryDirectory() as tmp:
    corpus = pathlib.Path(tmp) / "corpus.txt"
    n = _write_lines(corpus, texts, max_documents)
    if n == 0:
      raise DataError(f"no text found in {list(inputs)}; the tokenizer needs non-empty training text")
    try:
      spm.SentencePieceTrainer.train(
          input=str(corpus), model_prefix=str(pathlib.Path(tmp) / "tok"), vocab_size=vocab_size,
          model_type=model_type, character_coverage=character_coverage, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
          max_sentence_length=1 << 16, train_extremely_large_corpus=False, minloglevel=2,
          hard_vocab_limit=True)
    except RuntimeError as e:
      text = str(e).strip().splitlines()[-1]
      too_high = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", text)
      if too_high:
        raise DataError(f"--vocab-size={too_high.group(1)} is too large for this text (sentencepiece allows at most "
                        f"{too_high.group(2)}); use a smaller --vocab-size or more text") from None
      raise DataError(f"sentencepiece training failed: {text[:200]}; try a smaller --vocab-size or more "
                      "text") from None
    # Written only once training succeeded: a failed run leaves no files or directories behind.
    prefix.parent.mkdir(parents=True, exist_ok=True)
    for suffix in (".vocab", ".model"):  # .model last: its presence means both are complete
      shutil.move(str(pathlib.Path(tmp) / f"tok{suffix}"), str(prefix) + suffix)
  return str(prefix) + ".model"


def _write_lines(path: pathlib.Path, texts: Iterable[str], max_documents: int) -> int:
  n = 0
  with path.open("w", encoding="utf-8") as f:
    for text in texts:
      for line in text.splitlines():
        line = line.strip()
        if line:
          f.write(line[:60000] + "\n")
          n += 1
      if max_documents and n >= max_documents:
        break
  return n
