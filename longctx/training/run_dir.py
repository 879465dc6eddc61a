"""The run directory: one training at a time in it, and the files that make it self-contained.

    RUN/
      config.json              the resolved config (data paths made absolute)
      tokenizer.model          a copy of the run's sentencepiece model (none for data.tokenizer=byte);
                               eval, generate, export and --init-from load this one
      heldout_documents.txt    which documents were held out for evaluation, one per line
      metrics.jsonl            one history: rows after the step a run resumed from are dropped on resume
      tensorboard/             event files, rewritten from metrics.jsonl on resume
      loss.png, checkpoints/, checkpoints_damaged/, eval/
      .lock                    held (fcntl.flock) by the training process; names its host and pid

A second `longctx train` on a run dir in use stops with one line naming the holder and touches
nothing. The lock is the kernel's: a process killed by SIGKILL leaves no lock behind (the file
stays, unlocked). Readers (eval, export, generate) take no lock.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import pathlib
import shutil
import socket
from typing import Sequence

from longctx.data.tokenizers import TOKENIZER_FILE as TOKENIZER, tokenizer_in  # noqa: F401 (re-exported)
from longctx.errors import ConfigError

LOCK = ".lock"
HELDOUT = "heldout_documents.txt"


class RunDirBusy(ConfigError):
  """Another process is training in this run dir."""


class RunDirLock:
  """An exclusive, non-blocking `flock` on RUN/.lock for the life of a training run.

  `acquire` makes the run dir if needed and writes the holder (host, pid, start time) into the lock
  file. `release(undo=True)`, for a run that stopped on bad input before it trained, puts back what
  `acquire` changed (the lock file's previous bytes, or removes the file and the directories it made),
  so a refused command leaves the run dir byte-identical.
  """

  def __init__(self, run_dir: str | pathlib.Path):
    self.run_dir = pathlib.Path(run_dir)
    self.path = self.run_dir / LOCK
    self._fd: int | None = None
    self._made_dirs: list[pathlib.Path] = []
    self._previous: bytes | None = None  # the lock file's bytes before acquire (None: it did not exist)

  def acquire(self) -> "RunDirLock":
    missing = [p for p in (self.run_dir, *self.run_dir.absolute().parents) if not p.exists()]
    for d in reversed(missing):
      d.mkdir()
    self._made_dirs = missing  # innermost first
    existed = self.path.exists()
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      holder = _describe(os.read(fd, 4096))
      os.close(fd)
      raise RunDirBusy(f"run dir {self.run_dir} is in use by another training ({holder}); wait for it to finish or "
                       "stop it (it saves a checkpoint on SIGTERM), or pass another --run-dir") from None
    self._fd = fd
    self._previous = _read_all(fd) if existed else None
    info = {"host": socket.gethostname(), "pid": os.getpid(),
            "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    os.lseek(fd, 0, os.SEEK_SET)
    os.ftruncate(fd, 0)
    os.write(fd, (json.dumps(info) + "\n").encode())
    return self

  def release(self, *, undo: bool = False) -> None:
    if self._fd is None:
      return
    if undo:
      if self._previous is None:
        self.path.unlink(missing_ok=True)
      else:
        os.lseek(self._fd, 0, os.SEEK_SET)
        os.ftruncate(self._fd, 0)
        os.write(self._fd, self._previous)
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None
    if undo:
      for d in self._made_dirs:  # innermost first; only while empty
        try:
          d.rmdir()
        except OSError:
          break
    self._made_dirs = []


def _read_all(fd: int) -> bytes:
  os.lseek(fd, 0, os.SEEK_SET)
  chunks = []
  while chunk := os.read(fd, 1 << 16):
    chunks.append(chunk)
  return b"".join(chunks)


def _describe(raw: bytes) -> str:
  try:
    info = json.loads(raw.decode())
    return f"pid {info['pid']} on host {info['host']}, since {info['since']}"
  except (ValueError, KeyError, TypeError, UnicodeDecodeError):
    return "a process that has not written its name yet"


# ----------------------------------------------------------------------------- self-contained files


def copy_tokenizer(run_dir: pathlib.Path, spec: str) -> None:
  """Copy a sentencepiece model into RUN/tokenizer.model (atomically; nothing for "byte")."""
  if spec == "byte":
    return
  dest = run_dir / TOKENIZER
  if dest.is_file() and same_file_contents(dest, pathlib.Path(spec)):
    return
  tmp = run_dir / (TOKENIZER + ".tmp")
  shutil.copyfile(spec, tmp)
  os.replace(tmp, dest)


def same_file_contents(a: pathlib.Path, b: pathlib.Path) -> bool:
  import filecmp

  return filecmp.cmp(a, b, shallow=False)


def write_heldout(run_dir: pathlib.Path, names: Sequence[str], *, how: str) -> pathlib.Path:
  """RUN/heldout_documents.txt: a header line saying how they were chosen, then one document per line."""
  path = run_dir / HELDOUT
  tmp = path.with_suffix(".txt.tmp")
  tmp.write_text(f"# {len(names)} held-out documents ({how})\n" + "".join(f"{n}\n" for n in names), encoding="utf-8")
  os.replace(tmp, path)
  return path
