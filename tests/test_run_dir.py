"""The run dir: one training at a time, self-contained (tokenizer copy, absolute paths), one metrics history.

Issue 20: a second `longctx train` on a run dir in use moved the first run's live checkpoint aside and
interleaved metrics.jsonl; a run trained with a sentencepiece tokenizer could not be evaluated from
another directory (`error: tokenizer model 'tok/kjv.model' not found`); after a resume metrics.jsonl and
TensorBoard kept the dead run's rows, so loss.png looped back; model.safetensors was mode 0600.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from longctx import cli
from longctx import config as config_lib
from longctx.data.tokenizers import train_sentencepiece
from longctx.training.loop import run_training
from longctx.training.metrics import SUPERSEDED, read_metrics
from longctx.training.run_dir import HELDOUT, LOCK, TOKENIZER, RunDirBusy, RunDirLock
from longctx import recipe as recipe_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "recipes" / "quickstart.py")
TINY = ["model.d_model=32", "model.num_layers=1", "model.num_heads=2", "model.window=16", "data.seg_len=16",
        "data.segments_per_step=1", "data.batch_size=8", "train.warmup_steps=0", "train.eval_batches=2",
        "train.log_every=2", "train.checkpoint_every=2", "train.async_checkpoint=false"]
WORDS = ("the river mill light wind leaves clock bread road hills cloud town cat, dog; \\begin{x}\n"
         "\tdef f(a):\n\t\treturn a  # 42\n").split(" ")


def _cfg(*extra):
  return config_lib.apply_overrides(recipe_lib.load_recipe(QUICKSTART), [*TINY, *extra])


def _snapshot(root: pathlib.Path) -> dict[str, str]:
  return {str(p.relative_to(root)): ("dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest())
          for p in sorted(root.rglob("*"))}


def _quiet(*_):
  pass


@pytest.fixture(scope="module")
def books(tmp_path_factory):
  """Twelve small text "books" (.txt, .tex, .md) and a lossless sentencepiece tokenizer trained on them."""
  d = tmp_path_factory.mktemp("books")
  rng = np.random.default_rng(0)
  for i in range(12):
    ext = (".txt", ".tex", ".md")[i % 3]
    (d / f"book{i:02d}{ext}").write_text("".join(rng.choice(WORDS, 300 + 40 * i)) + "\n")
  tok = train_sentencepiece([str(d / "*.*")], model_prefix=str(d / "tok" / "books"), vocab_size=300)
  return d, tok


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny quickstart run of 2 steps (each test copies it before changing it)."""
  run = tmp_path_factory.mktemp("trained") / "run"
  run_training(_cfg("train.steps=2"), run, progress=False, log=_quiet)
  return run


# ----------------------------------------------------------------------------- the lock


def test_a_second_training_in_a_run_dir_in_use_is_refused_and_touches_nothing(trained, tmp_path, capfd):
  """Mutation check: with the lock taken out of run_training, this training runs (code 0) and writes."""
  run = tmp_path / "run"
  shutil.copytree(trained, run)
  holder = RunDirLock(run).acquire()  # as a training in progress holds it
  try:
    before = _snapshot(tmp_path)
    capfd.readouterr()
    code = cli.main(["train", QUICKSTART, "--run-dir", str(run), "--no-progress",
                     *[a for s in [*TINY, "train.steps=4"] for a in ("--set", s)]])
    err = capfd.readouterr().err
    assert code == 2
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: run dir") and "is in use by another training" in lines[0]
    assert f"pid {os.getpid()} on host " in lines[0], lines[0]
    assert _snapshot(tmp_path) == before
    # Readers take no lock: eval, export and generate of a run that is training keep working.
    assert cli.main(["eval", str(run), "--max-batches", "1"]) == 0
    assert cli.main(["export", str(run), "--format", "safetensors", "--out", str(tmp_path / "exported")]) == 0
    (tmp_path / "prompt.txt").write_text("def main():")
    assert cli.main(["generate", str(run), "--prompt-file", str(tmp_path / "prompt.txt"), "--max-new-tokens", "3",
                     "--no-progress"]) == 0
  finally:
    holder.release()


def test_a_killed_holder_leaves_no_lock(tmp_path):
  run = tmp_path / "run"
  code = ("import sys, time; from longctx.training.run_dir import RunDirLock; RunDirLock(sys.argv[1]).acquire(); "
          "print('locked', flush=True); time.sleep(600)")
  proc = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
  try:
    assert proc.stdout.readline().strip() == "locked"
    with pytest.raises(RunDirBusy, match=f"pid {proc.pid} on host"):
      RunDirLock(run).acquire()
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  RunDirLock(run).acquire().release()  # the kernel dropped the lock with the process


def test_a_refused_resume_puts_the_lock_file_back(trained, tmp_path):
  """A run that stops on bad input after taking the lock (here: a resume with another model) leaves the run
  dir byte-identical, the lock file included; a new run dir that fails leaves no directory at all."""
  run = tmp_path / "run"
  shutil.copytree(trained, run)
  assert (run / LOCK).is_file()
  before = _snapshot(tmp_path)
  with pytest.raises(Exception, match="trained with another model"):
    run_training(_cfg("train.steps=2", "model.d_model=64"), run, progress=False, log=_quiet)
  assert _snapshot(tmp_path) == before
  with pytest.raises(Exception, match="no such file"):
    run_training(_cfg("train.steps=2", f"train.init_from={tmp_path / 'nowhere'}"), tmp_path / "new" / "run",
                 progress=False, log=_quiet)
  assert not (tmp_path / "new").exists()


# ----------------------------------------------------------------------------- self-contained run dirs


def test_a_moved_run_dir_evaluates_generates_and_exports_from_anywhere(books, tmp_path, monkeypatch, capsys):
  """Train on text files with a sentencepiece tokenizer given by a *relative* path; move the run dir to
  another place, delete the tokenizer, and evaluate / generate / export / fine-tune from another directory.
  Before: `error: tokenizer model 'tok/books.model' not found`."""
  src, tok = books
  work = tmp_path / "work"
  shutil.copytree(src, work / "data")
  monkeypatch.chdir(work)
  sets = [f"data.tokenizer=data/tok/{pathlib.Path(tok).name}", "data.source=files", "data.paths=[data/*.*]",
          "model.vocab_size=300", "data.eval_fraction=0.25", "train.steps=2"]
  lines = []
  run_training(_cfg(*sets), pathlib.Path("runs/books"), progress=False, log=lines.append)
  run = work / "runs" / "books"
  assert (run / TOKENIZER).read_bytes() == pathlib.Path(tok).read_bytes()
  saved = json.loads((run / "config.json").read_text())["data"]
  assert os.path.isabs(saved["tokenizer"]) and all(os.path.isabs(p) for p in saved["paths"])
  # The held-out documents are listed and counted.
  listed = (run / HELDOUT).read_text().splitlines()
  assert listed[0].startswith(f"# {len(listed) - 1} held-out documents (data.eval_fraction=0.25 of 12 documents")
  assert all(pathlib.Path(name).name.startswith("book") for name in listed[1:]) and len(listed) > 1
  assert any(l.startswith(f"{len(listed) - 1} held-out documents") and HELDOUT in l for l in lines), lines

  moved = tmp_path / "elsewhere" / "books"
  shutil.move(str(run), moved)
  shutil.rmtree(work / "data" / "tok")
  monkeypatch.chdir(tmp_path)
  capsys.readouterr()
  assert cli.main(["eval", str(moved), "--max-batches", "1"]) == 0  # held-out files are found by absolute path
  assert "eval @ step 2" in capsys.readouterr().out
  assert cli.main(["eval", str(moved), "--task", "passkey", "--lengths", "64", "--examples", "1", "--no-progress"]) == 0
  (tmp_path / "prompt.txt").write_text("the river\n\tdef f(a):")
  assert cli.main(["generate", str(moved), "--prompt-file", "prompt.txt", "--max-new-tokens", "4",
                   "--no-progress"]) == 0
  assert cli.main(["export", str(moved), "--format", "safetensors", "--out", "exp"]) == 0
  exp = tmp_path / "exp"
  assert json.loads((exp / "config.json").read_text())["tokenizer"] == TOKENIZER
  assert (exp / TOKENIZER).read_bytes() == pathlib.Path(moved / TOKENIZER).read_bytes()
  from longctx.export import export_tokenizer

  assert export_tokenizer(exp) == str((exp / TOKENIZER).absolute())
  # Resuming the moved run from here: the recipe's relative tokenizer path is gone, the run's copy is used.
  lines = []
  run_training(_cfg(*sets[:1], *[s for s in sets[1:] if not s.startswith("data.paths")],
                    f"data.paths=[{work}/data/*.*]", "train.steps=3"), moved, progress=False, log=lines.append)
  assert any("using the run dir's copy" in l for l in lines) and any(l.startswith("resumed from") for l in lines)
  # ... but not with a tokenizer that differs from the copy.
  other = train_sentencepiece([str(src / "book00.txt"), str(src / "book01.tex")], model_prefix=str(tmp_path / "o"),
                              vocab_size=297)
  with pytest.raises(Exception, match="were trained with another tokenizer"):
    run_training(_cfg(*[s for s in sets if not s.startswith(("data.tokenizer", "data.paths"))],
                      f"data.tokenizer={other}", f"data.paths=[{work}/data/*.*]", "train.steps=4"), moved,
                 progress=False, log=_quiet)


def test_export_files_honour_the_umask(trained, tmp_path):
  """safetensors created model.safetensors with mode 0600 while config.json got 0644."""
  old = os.umask(0o022)
  try:
    assert cli.main(["export", str(trained), "--format", "safetensors", "--out", str(tmp_path / "exp")]) == 0
  finally:
    os.umask(old)
  modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "exp").iterdir()}
  assert modes == {"model.safetensors": 0o644, "config.json": 0o644}, modes


# ----------------------------------------------------------------------------- one history of metrics


def test_a_resume_keeps_one_history_in_metrics_and_tensorboard(tmp_path):
  """A run dies at step 7 after its checkpoint at 6 (its rows 7.. were logged); the resume from 6 must not
  leave them twice in metrics.jsonl, loss.png or TensorBoard. Before: steps 7-8 appeared twice. Also: step 1
  is logged, and the README's `tensorboard --logdir runs` works after the README's install and reads it."""
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

  run = tmp_path / "runs" / "run"
  sets = ("train.steps=8", "train.log_every=3", "train.checkpoint_every=6")
  run_training(_cfg(*sets), run, progress=False, stop_at_step=6, log=_quiet)
  rows = read_metrics(run / "metrics.jsonl")
  assert [r["step"] for r in rows] == [1, 3, 6]
  assert rows[0]["loss"] > 5.0 and "tokens_per_s" not in rows[0]  # step 1: near ln(259); its time is compiling
  # What the dead run logged after its last checkpoint: steps 7 and 8 (and a partial line).
  with (run / "metrics.jsonl").open("a") as f:
    for step in (7, 8):
      f.write(json.dumps({"step": step, "split": "train", "loss": 99.0}) + "\n")
    f.write('{"step": 9, "spl')
  resumed = run_training(_cfg(*sets), run, progress=False, log=_quiet)
  assert resumed["start_step"] == 6
  rows = [(r["step"], r["split"]) for r in read_metrics(run / "metrics.jsonl")]
  assert rows == [(1, "train"), (3, "train"), (6, "train"), (7, "train"), (8, "train"), (8, "eval")], rows
  assert 99.0 not in [r["loss"] for r in read_metrics(run / "metrics.jsonl")]
  superseded = read_metrics(run / SUPERSEDED)  # kept aside, not deleted
  assert [(r["step"], r["loss"], r["superseded_at_step"]) for r in superseded] == [(7, 99.0, 6), (8, 99.0, 6)]
  events = EventAccumulator(str(run / "tensorboard"))
  events.Reload()
  assert [e.step for e in events.Scalars("train/loss")] == [1, 3, 6, 7, 8]
  assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
  # A complete run started again logs its final eval once.
  from longctx.training.metrics import MetricsLogger

  logger = MetricsLogger(run, start_step=8)
  logger.log(8, "eval", {"loss": 1.0})
  logger.close()
  assert [(r["step"], r["split"]) for r in read_metrics(run / "metrics.jsonl")] == rows

  tensorboard = shutil.which("tensorboard", path=str(pathlib.Path(sys.executable).parent))
  assert tensorboard, "tensorboard is a dependency: the README's `tensorboard --logdir runs` needs it"
  done = subprocess.run([tensorboard, "--inspect", "--logdir", str(tmp_path / "runs")], capture_output=True,
                        text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  assert "train/loss" in done.stdout and "first_step           1" in done.stdout, done.stdout
