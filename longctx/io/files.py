"""Writing a directory atomically and reading its JSON and safetensors files, each problem one line."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
from typing import Iterator

import numpy as np

from longctx.data.tokenizers import TOKENIZER_FILE
from longctx.errors import CheckpointError, ConfigError
from longctx.io.params import Flat

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def check_out(out: pathlib.Path) -> None:
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise ConfigError(f"--out {out} already exists and is not empty; pick a new directory or delete it")


@contextlib.contextmanager
def atomic_dir(out: pathlib.Path) -> Iterator[pathlib.Path]:
  """Yield a temporary sibling of `out` to fill; it becomes `out` only if the block succeeds."""
  check_out(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir()
  try:
    yield tmp
    if out.exists():
      out.rmdir()
    tmp.rename(out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def write_dir(out: pathlib.Path, *, config: dict, tensors: Flat, metadata: dict[str, str],
           tokenizer_file: str | None = None) -> pathlib.Path:
  """config.json + model.safetensors (+ tokenizer.model, a copy of `tokenizer_file`) in `out`, atomically."""
  from safetensors.numpy import save_file

  with atomic_dir(out) as tmp:
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp / WEIGHTS), metadata=metadata)
    _honour_umask(tmp / WEIGHTS)  # safetensors creates its file with mode 0600
    (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if tokenizer_file:
      shutil.copyfile(tokenizer_file, tmp / TOKENIZER_FILE)
  return out


def _honour_umask(path: pathlib.Path) -> None:
  mask = os.umask(0)
  os.umask(mask)
  os.chmod(path, 0o666 & ~mask)


def read_json(path: pathlib.Path) -> dict:
  if not path.is_file():
    raise CheckpointError(f"{path} not found")
  try:
    value = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path} is not valid JSON ({type(e).__name__}: {str(e).splitlines()[0]})") from None
  if not isinstance(value, dict):
    raise CheckpointError(f"{path} holds a JSON {type(value).__name__}, expected an object")
  return value


def read_safetensors(path: pathlib.Path) -> Flat:
  from safetensors.numpy import load_file

  if not path.is_file():
    raise CheckpointError(f"{path} not found")
  try:
    return load_file(str(path))
  except Exception as e:  # the library raises several types for damaged files
    msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    raise CheckpointError(f"{path} is not a readable safetensors file ({msg}); export it again") from None
