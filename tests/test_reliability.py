"""Reliability: SIGKILL and SIGTERM mid-training, damaged checkpoints, non-finite losses, checkpoint retention.

The kill tests run `longctx train` in subprocesses (one CPU device each) and compare with an uninterrupted
subprocess run: after any number of kills and resumes the losses of every step and the final parameters
are bitwise identical.
"""

import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from longctx import config as config_lib
from longctx.errors import TrainingError
from longctx.training.checkpoint import Checkpointer, load_initial_params, verify_step
from longctx.training.loop import run_training
from longctx.training.metrics import read_metrics
from longctx.training.trainer import Trainer
from longctx import recipe as recipe_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "recipes" / "quickstart.py")
STEPS = 40
SETS = ["model.d_model=32", "model.num_layers=2", "model.num_heads=4", "model.window=16", "data.seg_len=32",
        "data.batch_size=4", "data.num_docs=64", f"train.steps={STEPS}", "train.warmup_steps=2", "train.log_every=1",
        "train.checkpoint_every=1", "train.keep_checkpoints=2", "train.async_checkpoint=false",
        "train.eval_batches=1", "mesh.data=1"]


def _train_cmd(run_dir, sets=SETS):
  args = ["train", QUICKSTART, "--run-dir", str(run_dir), "--no-progress"]
  for s in sets:
    args += ["--set", s]
  return [sys.executable, "-c", "import sys; from longctx.cli import main; sys.exit(main(sys.argv[1:]))", *args]


def _env():
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _losses(run_dir) -> dict[int, float]:
  """The loss of every step, the last record winning (steps after a kill are run again on resume)."""
  return {r["step"]: r["loss"] for r in read_metrics(pathlib.Path(run_dir) / "metrics.jsonl") if r["split"] == "train"}


def _steps_done(run_dir) -> int:
  return max(_losses(run_dir), default=0)


def _interrupt(run_dir, sig, at_step) -> subprocess.CompletedProcess:
  """Start training, send `sig` once step `at_step` is logged, wait for the process."""
  proc = subprocess.Popen(_train_cmd(run_dir), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 300
  while _steps_done(run_dir) < at_step and proc.poll() is None and time.monotonic() < deadline:
    time.sleep(0.01)
  proc.send_signal(sig)
  out, err = proc.communicate(timeout=300)
  return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _final_params(run_dir):
  cfg = config_lib.apply_overrides(recipe_lib.load_recipe(QUICKSTART), SETS)
  trainer = Trainer(cfg, devices=jax.devices()[:1])
  params, _ = load_initial_params(run_dir, model_cfg=cfg.model,
                                  abstract_params=trainer.abstract_train_state_sharded()["params"])
  return jax.device_get(params)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  run = tmp_path_factory.mktemp("reference")
  done = subprocess.run(_train_cmd(run), env=_env(), capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr
  return run


def test_sigkill_and_sigterm_then_resume_match_an_uninterrupted_run(reference, tmp_path):
  """Three SIGKILLs at random steps (seeds 0-2: anywhere in a step or a checkpoint save), one SIGTERM, resumes."""
  run = tmp_path / "killed"
  for seed in range(3):
    at = random.Random(seed).randint(_steps_done(run) + 2, _steps_done(run) + 8)
    killed = _interrupt(run, signal.SIGKILL, at)
    assert killed.returncode == -signal.SIGKILL, f"the run ended before the kill at step {at}: {killed.stderr}"
  # SIGTERM: the step finishes, a checkpoint is written, a message says how to resume, exit 0.
  termed = _interrupt(run, signal.SIGTERM, _steps_done(run) + 3)
  assert termed.returncode == 0, termed.stderr
  line = next(l for l in termed.stdout.splitlines() if l.startswith("stopped by SIGTERM"))
  assert "Rerun the same command to resume" in line
  saved = int(line.split("after step ")[1].split(";")[0])
  assert verify_step(run / "checkpoints" / str(saved)) is None
  done = subprocess.run(_train_cmd(run), env=_env(), capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr
  assert "resumed from" in done.stdout
  ref, got = _losses(reference), _losses(run)
  assert sorted(got) == list(range(1, STEPS + 1))
  assert [got[s] for s in sorted(got)] == [ref[s] for s in sorted(ref)]  # bitwise: the JSON floats are exact
  for a, b in zip(jax.tree.leaves(_final_params(reference)), jax.tree.leaves(_final_params(run))):
    np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- damaged checkpoints (in process)


def _cfg(steps, **train):
  cfg = config_lib.apply_overrides(recipe_lib.load_recipe(QUICKSTART), SETS + [f"train.steps={steps}"])
  return config_lib.replace(cfg, train=config_lib.dataclasses.replace(cfg.train, **train)) if train else cfg


def _truncate(step_dir):
  big = max((p for p in step_dir.rglob("*") if p.is_file() and p.name != "longctx_manifest.json"),
            key=lambda p: p.stat().st_size)
  big.write_bytes(big.read_bytes()[: big.stat().st_size // 2])


def _flip(step_dir):
  big = max((p for p in step_dir.rglob("*") if p.is_file() and p.name != "longctx_manifest.json"),
            key=lambda p: p.stat().st_size)
  data = bytearray(big.read_bytes())
  data[len(data) // 2] ^= 0xFF
  big.write_bytes(bytes(data))


def _drop_item(step_dir):
  shutil.rmtree(step_dir / "extra")


def _no_manifest(step_dir):  # committed by orbax, killed before its manifest
  (step_dir / "longctx_manifest.json").unlink()


def _no_manifest_and_truncated(step_dir):
  _no_manifest(step_dir)
  _truncate(step_dir)


def _no_manifest_and_no_commit_record(step_dir):
  _no_manifest(step_dir)
  (step_dir / "_CHECKPOINT_METADATA").unlink()


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory):
  """(losses of an uninterrupted 6-step run, a run dir stopped after step 4 with checkpoints 3 and 4)."""
  base = tmp_path_factory.mktemp("six")
  full = run_training(_cfg(6), base / "full", progress=False, devices=jax.devices()[:1], log=lambda *_: None)
  run_training(_cfg(6), base / "run", progress=False, devices=jax.devices()[:1], stop_at_step=4, log=lambda *_: None)
  assert Checkpointer(base / "run" / "checkpoints").all_steps() == [3, 4]  # keep_checkpoints=2
  return full["losses"], base / "run"


@pytest.mark.parametrize("damage", [_truncate, _flip, _drop_item, _no_manifest_and_truncated,
                                    _no_manifest_and_no_commit_record],
                         ids=["truncated", "flipped-bytes", "missing-item", "no-manifest-truncated",
                              "no-manifest-no-orbax-commit"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous(damage, six_steps, tmp_path):
  full, stopped = six_steps
  run = tmp_path / "run"
  shutil.copytree(stopped, run)
  damage(run / "checkpoints" / "4")
  lines = []
  resumed = run_training(_cfg(6), run, progress=False, devices=jax.devices()[:1], log=lines.append)
  warning = next(l for l in lines if l.startswith("warning: checkpoint"))
  assert "checkpoints/4 is damaged" in warning and "\n" not in warning
  assert (run / "checkpoints_damaged" / "4").is_dir()  # kept aside, not deleted
  assert any(l.startswith(f"resumed from {run / 'checkpoints' / '3'}") for l in lines), lines
  assert resumed["losses"] == full[3:]  # steps 4..6 again, bitwise


def test_a_committed_step_without_its_manifest_is_used_not_discarded(six_steps, tmp_path):
  """Orbax committed step 4, the process died before its manifest: step 4 is restored (it is intact),
  gets its manifest, and training goes on from it. Before: it was called damaged and moved aside, and
  the run went back to step 3 (with checkpoint_every=50 a kill at 120 went back to 50, not 100)."""
  full, stopped = six_steps
  run = tmp_path / "run"
  shutil.copytree(stopped, run)
  _no_manifest(run / "checkpoints" / "4")
  lines = []
  resumed = run_training(_cfg(6, keep_checkpoints=3), run, progress=False, devices=jax.devices()[:1],
                         log=lines.append)
  assert not any(l.startswith("warning") for l in lines) and not (run / "checkpoints_damaged").exists(), lines
  assert any("checkpoint step 4 had no manifest yet" in l for l in lines), lines
  assert any(l.startswith(f"resumed from {run / 'checkpoints' / '4'}") for l in lines), lines
  assert verify_step(run / "checkpoints" / "4") is None  # adopted: verified from now on
  assert resumed["losses"] == full[4:]  # steps 5..6, bitwise


def test_sigkill_after_an_async_save_committed_resumes_from_it(tmp_path):
  """kill -9 after orbax committed step 10 (async saves, the default) and before the next save (20): the
  resume starts from step 10. Before: its manifest was written only when the next save began, so the
  resume called 10 damaged, moved it aside and went back to step 5."""
  run = tmp_path / "run"
  # The quickstart's own model (steps of ~0.3 s on 2 cores, so the kill lands well before the save at 20).
  sets = ["mesh.data=1", "data.num_docs=64", "train.steps=20", "train.warmup_steps=2", "train.log_every=1",
          "train.eval_batches=1", "train.checkpoint_every=10", "train.keep_checkpoints=3"]
  first = subprocess.run(_train_cmd(run, sets) + ["--stop-at-step", "5"], env=_env(), capture_output=True,
                         text=True, timeout=300)
  assert first.returncode == 0, first.stderr
  proc = subprocess.Popen(_train_cmd(run, sets), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 300
  committed = run / "checkpoints" / "10" / "commit_success.txt"
  while not committed.exists() and proc.poll() is None and time.monotonic() < deadline:
    time.sleep(0.005)
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  assert committed.exists() and _steps_done(run) < 20, "the kill did not land between the saves at 10 and 20"
  done = subprocess.run(_train_cmd(run, sets), env=_env(), capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  assert f"resumed from {run / 'checkpoints' / '10'} (step 10)" in done.stdout, done.stdout + done.stderr
  assert "damaged" not in done.stdout + done.stderr and not (run / "checkpoints_damaged").exists()
  assert sorted(_losses(run)) == list(range(1, 21))


# ----------------------------------------------------------------------------- non-finite losses


def test_nan_stop_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
  cfg = _cfg(8, learning_rate=1e30, grad_clip=0.0, warmup_steps=0)
  with pytest.raises(TrainingError) as info:
    run_training(cfg, tmp_path / "run", progress=False, devices=jax.devices()[:1], log=lambda *_: None)
  msg = str(info.value)
  assert msg.startswith("non-finite ") and " at step " in msg and "last good checkpoint: step " in msg, msg
  bad_step = int(msg.split(" at step ")[1].split(";")[0])
  last_good = int(msg.split("last good checkpoint: step ")[1].split(".")[0])
  assert last_good == bad_step - 1
  assert Checkpointer(tmp_path / "run" / "checkpoints").all_steps()[-1] == last_good
  assert verify_step(tmp_path / "run" / "checkpoints" / str(last_good)) is None


def test_nan_skip_leaves_params_and_optimizer_unchanged(tmp_path):
  """nan_policy=skip: a step whose loss is NaN (poisoned weights) changes nothing and reports skipped=1."""
  cfg = _cfg(8, nan_policy="skip")
  trainer = Trainer(cfg, devices=jax.devices()[:1])
  from test_training import real_batches

  batch = trainer.put_batch(real_batches(cfg, 1)[0])
  ts = trainer.init_train_state()
  table = ts["params"]["embedding"]["table"]
  ts["params"]["embedding"]["table"] = table.at[:].set(np.nan)
  before = jax.device_get({"params": ts["params"], "opt_state": ts["opt_state"], "model_state": ts["model_state"]})
  ts, metrics = trainer.train_step(ts, batch)
  assert float(metrics["skipped"]) == 1.0 and not np.isfinite(float(metrics["loss"]))
  after = jax.device_get({"params": ts["params"], "opt_state": ts["opt_state"], "model_state": ts["model_state"]})
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(a, b)
  assert int(ts["step"]) == 1


def test_nan_skip_stops_after_too_many_in_a_row(tmp_path):
  cfg = _cfg(12, learning_rate=1e30, grad_clip=0.0, warmup_steps=0, nan_policy="skip", max_skipped_steps=3)
  lines = []
  with pytest.raises(TrainingError, match="3 steps in a row had a non-finite"):
    run_training(cfg, tmp_path / "run", progress=False, devices=jax.devices()[:1], log=lines.append)
  assert sum("step skipped" in l for l in lines) == 3


# ----------------------------------------------------------------------------- retention


def test_permanent_and_temporary_checkpoints(tmp_path):
  """Permanent: the newest keep=2; temporary: only the newest, and only while newer than the newest permanent."""
  ckpt = Checkpointer(tmp_path / "ckpt", keep=2, async_save=False)
  state = {"x": np.arange(3.0)}
  for step, permanent in [(1, True), (2, False), (3, True), (4, False), (5, True), (6, False), (7, False)]:
    ckpt.save(step, state, {"step": step}, permanent=permanent)
  assert ckpt.all_steps() == [3, 5, 7]
  ckpt.save(8, state, {"step": 8}, permanent=True)
  assert ckpt.all_steps() == [5, 8]
  ckpt.close()


def test_time_based_checkpoints_in_the_loop(tmp_path):
  cfg = _cfg(5, checkpoint_every=100, checkpoint_minutes=1e-9)  # a temporary checkpoint after every step
  run_training(cfg, tmp_path / "run", progress=False, devices=jax.devices()[:1], log=lambda *_: None)
  steps = Checkpointer(tmp_path / "run" / "checkpoints").all_steps()
  assert steps == [5]  # the last step is permanent; older temporaries are gone
  manifest = json.loads((tmp_path / "run" / "checkpoints" / "5" / "longctx_manifest.json").read_text())
  assert manifest["permanent"] is True


def test_reading_a_damaged_checkpoint_is_refused(tmp_path):
  """eval / generate (load_trained), export and --init-from check the manifest too: flipped bytes are one line."""
  from longctx.errors import CheckpointError
  from longctx.eval.streaming import load_trained
  from longctx.export import export_run

  cfg = _cfg(2)
  run_training(cfg, tmp_path / "run", progress=False, devices=jax.devices()[:1], log=lambda *_: None)
  _flip(tmp_path / "run" / "checkpoints" / "2")
  trainer = Trainer(cfg, devices=jax.devices()[:1])
  readers = [lambda: load_trained(tmp_path / "run", overrides=["mesh.data=-1"]),
             lambda: export_run(tmp_path / "run", fmt="safetensors", out=tmp_path / "exported"),
             lambda: load_initial_params(tmp_path / "run", model_cfg=cfg.model,
                                         abstract_params=trainer.abstract_train_state_sharded()["params"])]
  for read in readers:
    with pytest.raises(CheckpointError, match=r"checkpoints/2 could not be restored: it is damaged \(.*checksum\)"):
      read()
  assert not (tmp_path / "exported").exists()
