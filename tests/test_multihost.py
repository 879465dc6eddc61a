"""Multi-host training: 2 processes x 4 CPU devices on loopback == 1 process x 8 devices.

The two workers (tests/multihost_worker.py) start through `longctx train` with
the coordinator flags (process 0) or the LONGCTX_* env vars (process 1), train
to step 3, checkpoint from both processes, resume from that checkpoint and
finish with a full held-out evaluation. A third process trains the same recipe
straight through on 8 devices; losses, eval and parameters must agree to 1e-6.
"""

import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from longctx import distributed
from longctx.errors import DataError, DistributedError
from longctx.training.metrics import read_metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "multihost_worker.py"
# The runs may take as long as they keep making progress (a process writes output or a file in its run
# dir), so a loaded CI machine running tests in parallel does not fail them; a run that writes nothing for
# STALL_S seconds is stuck (a deadlock between the processes, say), and no run may exceed LIMIT_S.
STALL_S = 240
LIMIT_S = 1800
TOL = 1e-6


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def worker_env(devices: int = 4, **extra) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith(("LONGCTX_", "JAX_", "XLA_"))}
  # XLA's CPU backend at optimisation level 0 compiles these tiny programs ~2x faster; every run here uses it.
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0",
             JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest", TF_CPP_MIN_LOG_LEVEL="2",
             PYTHONUNBUFFERED="1", **extra)
  return env


def _listing(root: pathlib.Path) -> list[pathlib.Path]:
  """Every file under `root`, tolerating directories that vanish while being walked (orbax renames its
  `*.orbax-checkpoint-tmp` directories when a save finishes)."""
  found = []
  for parent, dirs, names in os.walk(root, onerror=lambda e: None):
    found += [pathlib.Path(parent) / n for n in dirs + names]
  return found


class Runs:
  """The reference (1 process, 8 devices) and the 2 workers, started together; kills all on exit."""

  def __init__(self, tmp_path: pathlib.Path):
    self.tmp_path = tmp_path
    self.procs: dict[str, subprocess.Popen] = {}

  def start(self, name: str, args: list[str], env: dict) -> None:
    with (self.tmp_path / f"{name}.stdout").open("w") as fo, (self.tmp_path / f"{name}.stderr").open("w") as fe:
      self.procs[name] = subprocess.Popen([sys.executable, str(WORKER), *args, "--out", str(self.tmp_path / name)],
                                          cwd=ROOT, env=env, stdout=fo, stderr=fe)

  def wait(self, watched: list[pathlib.Path]) -> None:
    """Until every process has exited; fail if none of them nor `watched` (run dirs) changed for STALL_S
    seconds, or after LIMIT_S."""
    start = last_change = time.monotonic()
    seen = None
    try:
      while any(proc.poll() is None for proc in self.procs.values()):
        now = time.monotonic()
        state = self._progress(watched)
        if state != seen:
          seen, last_change = state, now
        if now - last_change > STALL_S or now - start > LIMIT_S:
          why = f"no output for {STALL_S} s" if now - last_change > STALL_S else f"over {LIMIT_S} s"
          pytest.fail(f"runs stopped making progress ({why}); killed\n{self.tails()}")
        time.sleep(0.5)
    finally:
      self.kill()
    codes = {name: proc.returncode for name, proc in self.procs.items()}
    assert all(code == 0 for code in codes.values()), f"exit codes {codes}\n{self.tails()}"

  def _progress(self, watched: list[pathlib.Path]) -> tuple:
    files = [self.tmp_path / f"{name}.{kind}" for name in self.procs for kind in ("stdout", "stderr")]
    for d in watched:
      files += _listing(d)
    seen = []
    for f in files:
      try:  # orbax renames and deletes files as it goes
        st = f.stat()
      except OSError:
        continue
      seen.append((str(f), st.st_size, st.st_mtime_ns))
    return tuple(sorted(seen))

  def kill(self) -> None:
    for proc in self.procs.values():
      if proc.poll() is None:
        proc.kill()
        proc.wait()

  def stdout(self, name: str) -> str:
    return (self.tmp_path / f"{name}.stdout").read_text(errors="replace")

  def result(self, name: str) -> dict:
    return json.loads((self.tmp_path / f"{name}.json").read_text())

  def tails(self, n: int = 40) -> str:
    out = []
    for name in self.procs:
      lines = [l for l in (self.tmp_path / f"{name}.stderr").read_text(errors="replace").splitlines()
               if "Involuntary full rematerialization" not in l and not l.startswith("[Gloo]")]
      out.append(f"--- {name} stdout:\n{self.stdout(name)[-2000:]}\n--- {name} stderr (last {n} lines):\n"
                 + "\n".join(lines[-n:]))
    return "\n".join(out)


def held_out_batches(cfg, lane_ranges) -> list[int]:
  """How many eval batches the held-out lanes of each range fill on their own."""
  from longctx.data.lanes import LaneBatcher
  from longctx.training.loop import build_pipeline

  pipeline, d = build_pipeline(cfg), cfg.data
  return [sum(1 for _ in LaneBatcher(pipeline.eval_source, num_lanes=d.batch_size, seg_len=d.seg_len,
                                     segments_per_step=d.segments_per_step, pad_id=pipeline.tokenizer.pad_id,
                                     lane_range=lanes, repeat=False)) for lanes in lane_ranges]


def close(a: float, b: float) -> bool:
  return abs(a - b) <= TOL


def test_two_processes_train_resume_and_evaluate_like_one(tmp_path):
  sys.path.insert(0, str(WORKER.parent))
  import multihost_worker

  run_dir, ref_dir = tmp_path / "run", tmp_path / "reference"
  coordinator = f"127.0.0.1:{free_port()}"
  runs = Runs(tmp_path)
  start = time.monotonic()
  try:
    runs.start("reference", ["--run-dir", str(ref_dir), "--straight"], worker_env(devices=8))
    # process 0 through the CLI flags, process 1 through the LONGCTX_* env vars
    runs.start("worker0", ["--run-dir", str(run_dir), "--coordinator", coordinator, "--num-processes", "2",
                           "--process-id", "0"], worker_env())
    runs.start("worker1", ["--run-dir", str(run_dir)],
               worker_env(LONGCTX_COORDINATOR=coordinator, LONGCTX_NUM_PROCESSES="2", LONGCTX_PROCESS_ID="1",
                          LONGCTX_INIT_TIMEOUT="120"))
    # The full held-out evaluation below: process 0's lanes fill 11 batches, process 1's only 10, so process 1
    # must feed a masked batch for the last step.
    assert held_out_batches(multihost_worker.config(), [(0, 4), (4, 8)]) == [11, 10]
    runs.wait([ref_dir, run_dir])
  finally:
    runs.kill()
  print(f"reference + 2 workers: {time.monotonic() - start:.1f} s")

  ref = runs.result("reference")
  assert (ref["process_count"], ref["local_devices"], ref["lanes"]) == (1, 8, [0, 8])
  results = [runs.result(f"worker{i}") for i in range(2)]
  for i, r in enumerate(results):
    assert (r["process_index"], r["process_count"], r["local_devices"]) == (i, 2, 4)
    assert r["start_step"] == 3  # resumed from the checkpoint both processes wrote
  assert [r["lanes"] for r in results] == [[0, 4], [4, 8]]  # each process read only its own lanes

  # Losses: steps 1-3 from metrics.jsonl (process 0 only), steps 4-6 from both processes' resumed runs.
  records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in records if r["split"] == "train"]
  assert [r["step"] for r in train] == list(range(1, 7)), "metrics.jsonl must be written by process 0 alone"
  logged = [r["loss"] for r in train]
  assert results[0]["losses"] == results[1]["losses"] == logged[3:]
  print(f"per-step loss |2 processes - 1 process|: {[abs(a - b) for a, b in zip(logged, ref['losses'])]}")
  assert all(close(a, b) for a, b in zip(logged, ref["losses"])), (logged, ref["losses"])
  # Gradient norms too: Adam and clipping would hide a gradient scaled on the way between processes (a sum
  # counted twice, say) from the losses and parameters. Step 1 has learning rate 0 (warmup): 5 real steps.
  ref_train = [r for r in read_metrics(ref_dir / "metrics.jsonl") if r["split"] == "train"]
  assert [r["step"] for r in ref_train] == list(range(1, 7))
  assert all(abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * b["grad_norm"] for a, b in zip(train, ref_train)), \
      ([a["grad_norm"] for a in train], [b["grad_norm"] for b in ref_train])
  assert all(r["learning_rate"] > 0 for r in train[1:])

  for r in results:
    assert r["eval"]["batches"] == ref["eval"]["batches"] == 11
    assert r["eval"]["tokens"] == ref["eval"]["tokens"]
    assert close(r["eval"]["loss"], ref["eval"]["loss"]), (r["eval"], ref["eval"])

  params, ref_params = np.load(tmp_path / "worker0.npz"), np.load(tmp_path / "reference.npz")
  assert sorted(params.files) == sorted(ref_params.files)
  worst = max(float(np.max(np.abs(params[name] - ref_params[name]))) for name in ref_params.files)
  print(f"parameters after 6 steps: max |2 processes - 1 process| = {worst:.2e}")
  assert worst <= TOL

  # The checkpoint holds every lane's data position, identical to the 1-process run's.
  from longctx.training.checkpoint import Checkpointer

  extra = Checkpointer(run_dir / "checkpoints", create=False).restore_extra(6)
  ref_extra = Checkpointer(ref_dir / "checkpoints", create=False).restore_extra(6)
  assert extra["data"]["lanes"] == [0, 8] and extra["data"] == ref_extra["data"]

  # Only process 0 prints and writes logs ([Gloo] lines come from the C++ collectives' threads, interleaved).
  out0, out1 = runs.stdout("worker0"), runs.stdout("worker1")
  for line in ("model transformer", "stopped at step 3", "run dir:", "resumed from", "eval @ step 6"):
    assert line in out0 and line not in out1, (line, out0, out1)
  # gloo's threads interleave their lines at any character, so compare words: process 1 prints none of its own.
  gloo_words = set(re.findall(r"[A-Za-z]+", "[Gloo] Rank 0 is connected to 1 peer ranks. Expected number of "
                                           "connected peer ranks is : 1"))
  assert set(re.findall(r"[A-Za-z]+", out1)) <= gloo_words, out1
  assert (run_dir / "config.json").exists() and (run_dir / "loss.png").exists()
  # Process 0's resumed run rewrote the history into one event file (only process 0 writes events).
  assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1


# ----------------------------------------------------------------------------- initialize: input errors


@pytest.mark.parametrize("kwargs, message", [
    (dict(coordinator="localhost", num_processes=2, process_id=0), "not HOST:PORT"),
    (dict(coordinator="localhost:99999", num_processes=2, process_id=0), "not HOST:PORT"),
    (dict(coordinator="localhost:1234", num_processes=2, process_id=2), "process_id=2 must be below num_processes=2"),
    (dict(coordinator="localhost:1234", num_processes=0, process_id=0), "num_processes=0 must be >= 1"),
    (dict(coordinator="localhost:1234", num_processes="two", process_id=0), "num_processes='two' is not an integer"),
    (dict(coordinator="localhost:1234", num_processes=2), "missing: --process-id / LONGCTX_PROCESS_ID"),
])
def test_initialize_rejects_bad_values(kwargs, message, monkeypatch):
  for env in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID):
    monkeypatch.delenv(env, raising=False)
  with pytest.raises(DistributedError, match=message):
    distributed.initialize(**kwargs)


def test_initialize_reads_env_and_is_a_noop_for_one_process(monkeypatch, eight_devices):
  monkeypatch.setenv(distributed.ENV_PROCESS_ID, "3")
  monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "2")
  monkeypatch.setenv(distributed.ENV_COORDINATOR, "localhost:1234")
  with pytest.raises(DistributedError, match="LONGCTX_PROCESS_ID=3 must be below LONGCTX_NUM_PROCESSES=2"):
    distributed.initialize()
  for env in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID):
    monkeypatch.delenv(env)
  assert distributed.initialize() is False  # nothing given: a single-process run
  assert distributed.initialize(num_processes=1) is False
  # JAX already runs in this process (the fixture listed its 8 devices), so it cannot join a multi-process run.
  with pytest.raises(DistributedError, match="JAX is already in use"):
    distributed.initialize(f"127.0.0.1:{free_port()}", 2, 0)


def test_unreachable_coordinator_is_one_line(tmp_path):
  """Process 1 with no coordinator to talk to: a clear error after the timeout (JAX itself would abort)."""
  code = ("import sys\nfrom longctx import cli\n"
          f"sys.exit(cli.main(['train', {str(WORKER)!r}, '--run-dir', {str(tmp_path)!r}, '--coordinator', "
          f"'127.0.0.1:{free_port()}', '--num-processes', '2', '--process-id', '1']))")
  proc = subprocess.run([sys.executable, "-c", code], env=worker_env(LONGCTX_INIT_TIMEOUT="1"), capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: process 1 could not reach the coordinator 127.0.0.1:")
  assert "within 1 s" in lines[0]
  assert not list(tmp_path.iterdir())  # nothing written


def test_distributed_without_a_cluster_is_one_line(tmp_path):
  env = {k: v for k, v in worker_env().items() if not k.startswith(("SLURM_", "OMPI_", "PMI_", "TPU_"))}
  code = ("import sys\nfrom longctx import cli\n"
          f"sys.exit(cli.main(['train', {str(WORKER)!r}, '--run-dir', {str(tmp_path)!r}, '--distributed']))")
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.strip().splitlines() == [
      "error: --distributed found no TPU pod, SLURM or Open MPI environment to join; on other clusters pass "
      "--coordinator HOST:PORT --num-processes N --process-id I"]


# ----------------------------------------------------------------------------- data positions


def test_a_whole_batch_data_position_restores_any_lane_range():
  from longctx.data.lanes import LaneBatcher
  from longctx.data.sources import SyntheticSource
  from longctx.data.tokenizers import load_tokenizer

  tok = load_tokenizer("byte")
  src = SyntheticSource("copy", tokenizer=tok, length=40, num_docs=32, seed=0, min_length=10)
  kwargs = dict(num_lanes=4, seg_len=16, segments_per_step=1, pad_id=tok.pad_id)
  whole = LaneBatcher(src, **kwargs)
  for _ in range(5):
    next(whole)
  saved = json.loads(json.dumps(whole.state_dict()))
  expect = next(whole)["tokens"]
  for lo, hi in [(0, 2), (2, 4), (1, 3)]:
    part = LaneBatcher(src, lane_range=(lo, hi), **kwargs)
    part.load_state_dict(saved)
    np.testing.assert_array_equal(next(part)["tokens"], expect[:, lo:hi])
  with pytest.raises(DataError, match="different lane layout"):
    LaneBatcher(src, **kwargs).load_state_dict(part.state_dict())  # a part cannot restore the whole


def test_a_url_run_dir_is_refused(tmp_path):
  sys.path.insert(0, str(WORKER.parent))
  import multihost_worker
  from longctx.errors import ConfigError
  from longctx.training.loop import run_training

  with pytest.raises(ConfigError, match="is a URL.*mount the bucket"):
    run_training(multihost_worker.config(), "gs://bucket/runs/x", progress=False)
