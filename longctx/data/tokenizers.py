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


# A run dir or an export dir keeps its sentencepiece model under this name (as Hugging Face model dirs do).
TOKENIZER_FILE = "tokenizer.model"


def tokenizer_in(directory: str | pathlib.Path, spec: str) -> str:
  """The tokenizer a run or export dir should be read with: its own copy of the sentencepiece model if it
  has one, else `spec` as saved ("byte", or the path a run of an older longctx recorded)."""
  copy = pathlib.Path(directory) / TOKENIZER_FILE
  if spec != "byte" and copy.is_file():
    return str(copy.absolute())
  return spec


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


# How long-document LMs train their sentencepiece models (Llama, Gemma): nothing the text holds is lost.
# Identity normalisation (no NFKC), whitespace runs and indentation kept (whitespace-only pieces such as
# four spaces may be learned), no dummy prefix, digits split, newline and tab as pieces of their own, and
# byte fallback, so a character never seen in training is its UTF-8 bytes instead of UNK: decode(encode(x)) == x.
LOSSLESS = dict(byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
                add_dummy_prefix=False, split_digits=True, allow_whitespace_only_pieces=True,
                user_defined_symbols=["\n", "\t"])


def train_sentencepiece(inputs: Sequence[str], *, model_prefix: str, vocab_size: int,
                        model_type: str = "unigram", text_field: str = "text",
                        character_coverage: float = 1.0, max_documents: int = 0, lossless: bool = True) -> str:
  """Train a sentencepiece model from text files (see `sources.load_text_dataset`); returns the `.model` path.

  Ids: PAD=0, UNK=1, BOS=2, EOS=3. `lossless` (the default) trains as Llama / Gemma do (`LOSSLESS`), so
  every UTF-8 text round-trips exactly; `lossless=False` keeps sentencepiece's own defaults (NFKC,
  whitespace runs and newlines collapsed, unseen characters become UNK).
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
    n = _write_lines(corpus, texts, max_documents, keep_whitespace=lossless)
    if n == 0:
      raise DataError(f"no text found in {list(inputs)}; the tokenizer needs non-empty training text")
    try:
      spm.SentencePieceTrainer.train(
          input=str(corpus), model_prefix=str(pathlib.Path(tmp) / "tok"), vocab_size=vocab_size,
          model_type=model_type, character_coverage=character_coverage, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
          max_sentence_length=1 << 16, train_extremely_large_corpus=False, minloglevel=2,
          hard_vocab_limit=True, **(LOSSLESS if lossless else {}))
    except RuntimeError as e:
      text = str(e).strip().splitlines()[-1]
      too_high = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", text)
      if too_high:
        raise DataError(f"--vocab-size={too_high.group(1)} is too large for this text (sentencepiece allows at most "
                        f"{too_high.group(2)}); use a smaller --vocab-size or more text") from None
      too_low = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", text)
      if too_low:
        pieces = "its characters, the 256 byte-fallback pieces and the special ids" if lossless else \
            "its characters and the special ids"
        raise DataError(f"--vocab-size={too_low.group(1)} is too small for this text: {pieces} need "
                        f"{too_low.group(2)}; use --vocab-size >= {too_low.group(2)}") from None
      raise DataError(f"sentencepiece training failed: {text[:200]}; try a smaller --vocab-size or more "
                      "text") from None
    # Written only once training succeeded: a failed run leaves no files or directories behind.
    prefix.parent.mkdir(parents=True, exist_ok=True)
    for suffix in (".vocab", ".model"):  # .model last: its presence means both are complete
      shutil.move(str(pathlib.Path(tmp) / f"tok{suffix}"), str(prefix) + suffix)
  return str(prefix) + ".model"


_MAX_LINE_BYTES = 60000  # under sentencepiece's max_sentence_length (65536 bytes), which skips longer lines


def _write_lines(path: pathlib.Path, texts: Iterable[str], max_documents: int, *, keep_whitespace: bool) -> int:
  """The training text, one sentencepiece "sentence" per line (blank lines dropped; with `keep_whitespace`
  indentation and trailing spaces are kept, as the tokenizer must learn them). Returns the line count."""
  n = docs = 0
  with path.open("w", encoding="utf-8") as f:
    for text in texts:
      for line in text.splitlines():
        if not keep_whitespace:
          line = line.strip()
        if line.strip():
          f.write(_cut_bytes(line, _MAX_LINE_BYTES) + "\n")
          n += 1
      docs += 1
      if max_documents and docs >= max_documents:
        break
  return n


def _cut_bytes(line: str, limit: int) -> str:
  data = line.encode("utf-8")
  return line if len(data) <= limit else data[:limit].decode("utf-8", errors="ignore")
