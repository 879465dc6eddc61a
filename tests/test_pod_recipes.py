"""Pod recipes and launchers: every recipes/pod recipe dry-runs (estimate + compiled per-device memory for
its 64-device mesh), reduced-depth extrapolation, one-line errors, and the TPU / SLURM launch scripts."""

import dataclasses
import importlib.util
import json
import os
import pathlib
import re
import shlex
import subprocess

import pytest

from longctx import cli, dryrun
from longctx.models import list_models
from longctx import recipe as recipe_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
POD = ROOT / "recipes" / "pod"
POD_RECIPES = sorted(p.stem for p in POD.glob("*.py") if not p.name.startswith("_"))
MODELS = sorted(list_models())  # every registered model has a pod recipe
GIB = 2**30


def run_cli(args, capsys):
  code = cli.main(args)
  out = capsys.readouterr()
  return code, out.out, out.err


def gib(out: str, label: str, *, after: str = "") -> float:
  """The GiB figure on the line starting with `label` (the first one after the line containing `after`)."""
  text = out[out.index(after):] if after else out
  match = re.search(rf"^\s+{re.escape(label)}\s+([0-9.]+) GiB", text, flags=re.M)
  assert match, (label, after, out)
  return float(match.group(1)) * GIB


def test_one_pod_recipe_per_model_on_64_chips():
  assert sorted(POD_RECIPES) == sorted(MODELS)
  assert not (ROOT / "recipes" / "pg19_transformer_pod.py").exists()
  for name in POD_RECIPES:
    path = POD / f"{name}.py"
    cfg = recipe_lib.load_recipe(path)
    mesh = dataclasses.asdict(cfg.mesh)
    assert -1 not in mesh.values() and mesh["data"] * mesh["fsdp"] * mesh["tensor"] * mesh["sequence"] == 64, name
    if name in ("transformer", "retnet", "mamba", "mamba2", "gated_deltanet", "gla", "mlstm", "griffin", "hybrid"):
      assert mesh["sequence"] > 1, f"{name}: the attention baseline and linear recurrences use context parallelism"
    assert cfg.data.batch_size * cfg.data.seg_len * cfg.data.segments_per_step == 2**21, name
    doc = path.read_text().split('"""')[1]
    for what in ("v5p-128", "Mesh:", "tokens per step", f"recipes/pod/{name}.py --dry-run", "launch_tpu_pod.sh",
                 "launch_slurm.sh", "gs://"):
      assert what in doc, (name, what)


def one_layer(name: str) -> list[str]:
  """--set overrides for a copy of a recipe with one ordinary layer (and its special layers, in place)."""
  small = dryrun.reduced_model(recipe_lib.load_recipe(POD / f"{name}.py").model, 1)
  sets = [f"model.num_layers={small.num_layers}"]
  sets += [f"model.{k}=[{','.join(map(str, getattr(small, k)))}]" for k in small.layer_lists]
  sets += [f"model.{k}={getattr(small, k)}" for k in small.layer_indices]
  return [a for s in sets for a in ("--set", s)]


def check_dry_run(out: str) -> None:
  """The estimate's and the compiled step's per-device lines are there, and their figures agree."""
  assert "(64 devices)" in out and "per-device memory (estimate):" in out
  assert "per-device memory (compiled train step, XLA:CPU, 64 virtual host devices as the mesh):" in out
  section = "compiled train step"
  args, temp, total = (gib(out, k, after=section) for k in ("arguments", "temporaries", "total"))
  params, optimizer, state = (gib(out, k) for k in ("params", "optimizer (Adam)", "model state"))
  # Arguments hold the float32 params, Adam's two moments, the lanes' model state and the batch.
  assert 0.95 * (params + optimizer) <= args <= params + optimizer + state + 0.5 * GIB, out
  assert 0 < temp and args <= total, out


@pytest.mark.parametrize("name", POD_RECIPES)
def test_pod_recipe_dry_run_with_compiled_memory(name, capsys):
  """Every pod recipe's dry run: estimate + the train step compiled for its 64-device mesh (a CPU subprocess).

  CI compiles a one-layer copy (every other setting, the mesh included, is the recipe's) to stay fast;
  the default path, two reduced depths extrapolated to the recipe's, runs below for one recipe.
  """
  code, out, err = run_cli(["train", str(POD / f"{name}.py"), "--dry-run", *one_layer(name)], capsys)
  assert code == 0, err
  check_dry_run(out)
  assert "extrapolated" not in out


def test_default_dry_run_extrapolates_from_two_reduced_depths(capsys, monkeypatch):
  """The default path: two reduced depths compiled, extended to 24 layers (1 and 2 instead of 6 and 8, for CI)."""
  monkeypatch.setattr(dryrun, "REDUCED", (1, 2))
  code, out, err = run_cli(["train", str(POD / "rmt.py"), "--dry-run"], capsys)
  assert code == 0, err
  check_dry_run(out)
  assert "extrapolated linearly from compiles at 1 and 2 layers to 24" in out and "(2 layers)" in out


def test_no_compile_prints_only_the_estimate(capsys):
  code, out, err = run_cli(["train", str(POD / "transformer.py"), "--dry-run", "--no-compile"], capsys)
  assert code == 0, err
  assert "per-device memory (estimate):" in out and "compiled" not in out


@pytest.mark.parametrize("extra,message", [
    (["--set", "data.seg_len=16383"], "data.seg_len=16383 is not divisible by mesh.sequence=4"),
    (["--set", "data.batch_size=8", "--set", "data.segments_per_step=16"],
     "data.batch_size=8 lanes cannot be split over 16 data-parallel shards"),
], ids=["seg_len", "lanes"])
def test_dry_run_errors_are_one_line(extra, message, capsys):
  code, out, err = run_cli(["train", str(POD / "transformer.py"), "--dry-run", *extra], capsys)
  lines = [l for l in err.splitlines() if l.strip()]
  assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is not None, reason="libtpu is installed: it would compile")
def test_tpu_topology_without_libtpu_is_one_line(capsys):
  code, _, err = run_cli(["train", str(POD / "rmt.py"), "--dry-run", "--tpu-topology", "v5p:4x4x4", *one_layer("rmt")],
                         capsys)
  lines = [l for l in err.splitlines() if l.strip()]
  assert code == 2 and len(lines) == 1 and "needs libtpu (pip install \"jax[tpu]\")" in lines[0], err


def test_reduced_depth_keeps_special_layers_in_place():
  cfg = recipe_lib.load_recipe(POD / "block_recurrent.py").model
  assert dryrun.special_layers(cfg) == (19,)
  two = dryrun.reduced_model(cfg, 2)
  assert (two.num_layers, two.recurrent_layers) == (3, [2])  # after both ordinary layers, as 19 is after 19
  mem = dataclasses.replace(recipe_lib.load_recipe(POD / "memorizing.py").model, knn_layers=[0, -1])
  three = dryrun.reduced_model(mem, 3)
  assert (three.num_layers, three.knn_layers) == (5, [0, 4])
  melodi = dataclasses.replace(recipe_lib.load_recipe(POD / "melodi.py").model, long_layer=-1)
  assert dryrun.reduced_model(melodi, 2).long_layer == 2 and dryrun.reduced_model(melodi, 2).num_layers == 3
  assert dryrun.depth_plan(cfg, full=False) == (6, 8) and dryrun.depth_plan(cfg, full=True) == (23,)
  shallow = dataclasses.replace(cfg, num_layers=9, recurrent_layers=[1])
  assert dryrun.depth_plan(shallow, full=False) == (8,)  # 8 ordinary layers or fewer: compiled as they are
  plain = recipe_lib.load_recipe(POD / "mamba.py").model
  assert dryrun.reduced_model(plain, 2).num_layers == 2 and dryrun.depth_plan(plain, full=True) == (48,)
  # A repeating pattern is compiled in whole units: Griffin's (recurrent, recurrent, attention) at 6 and 9 layers.
  griffin = recipe_lib.load_recipe(POD / "griffin.py").model
  assert dryrun.pattern_period(griffin) == 3 and dryrun.depth_plan(griffin, full=False) == (6, 9)
  assert dryrun.depth_plan(plain, full=False) == (6, 8)


def test_extrapolation_is_the_line_through_two_depths():
  a = {"num_layers": 2, "bytes": {f: 10.0 for f in dryrun.FIELDS}, "seconds": 1.0}
  b = {"num_layers": 3, "bytes": {f: 13.0 for f in dryrun.FIELDS}, "seconds": 1.0}
  assert dryrun.extrapolate([a, b], 24) == {f: 10.0 + 22 * 3.0 for f in dryrun.FIELDS}
  assert dryrun.extrapolate([a], 24) == a["bytes"]


def test_subprocess_env_replaces_the_device_count():
  env = dryrun.subprocess_env(64)
  assert env["JAX_PLATFORMS"] == "cpu"
  assert env["XLA_FLAGS"].count("--xla_force_host_platform_device_count") == 1
  assert "--xla_force_host_platform_device_count=64" in env["XLA_FLAGS"]
  assert "--xla_backend_optimization_level=0" in env["XLA_FLAGS"]  # XLA:CPU only: not for the TPU compiler
  assert "optimization_level" not in dryrun.subprocess_env(1, fast_cpu=False)["XLA_FLAGS"]


# ----------------------------------------------------------------------------- launchers


def script(name, *args, env=None):
  return subprocess.run(["bash", str(ROOT / "scripts" / name), *args], capture_output=True, text=True,
                        env={**os.environ, **(env or {})}, cwd=ROOT)


@pytest.mark.parametrize("name", ["launch_tpu_pod.sh", "launch_slurm.sh"])
def test_launchers_parse_and_explain_themselves(name):
  assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / name)], capture_output=True).returncode == 0
  help_ = script(name, "--help")
  assert help_.returncode == 0 and "--dry-run" in help_.stdout and "RECIPE" in help_.stdout
  bad = script(name, "recipes/pod/transformer.py")
  assert bad.returncode == 2 and bad.stderr.startswith("error: need")
  unknown = script(name, "--frobnicate")
  assert unknown.returncode == 2 and "unknown option --frobnicate" in unknown.stderr


def commands(stdout: str, program: str) -> list[list[str]]:
  """The argv of every printed command line starting with `program` (dry runs print them shell-quoted)."""
  return [shlex.split(l) for l in stdout.splitlines() if l.startswith(program + " ")]


def remote(argv: list[str]) -> str:
  (command,) = [a[len("--command="):] for a in argv if a.startswith("--command=")]
  return command


def test_tpu_launcher_dry_run_prints_setup_and_train_on_all_workers():
  res = script("launch_tpu_pod.sh", "--dry-run", "my-v5p", "us-east5-a", "my-proj", "recipes/pod/mamba2.py",
               "gs://bucket/runs/m2", "--set", "train.steps=10", "--set", "data.paths=[a b.txt]")
  assert res.returncode == 0, res.stderr
  scp, setup, train = commands(res.stdout, "gcloud")
  assert scp[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", scp[5]] and "my-v5p:~/longctx.tar.gz" in scp
  assert setup[:5] == train[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] and setup[5] == "my-v5p"
  for argv in (scp, setup, train):
    assert {"--zone=us-east5-a", "--project=my-proj", "--worker=all"} <= set(argv), argv
  assert "pip install" in remote(setup) and '"jax[tpu]"' in remote(setup)
  run = remote(train)  # the bucket is mounted on every worker, and training writes the mounted path
  assert run.startswith("cd ~/longctx && ") and "gcsfuse --implicit-dirs bucket /tmp/longctx-gcs/bucket" in run
  assert shlex.split(run.split("&& ")[-1]) == [
      ".venv/bin/longctx", "train", "recipes/pod/mamba2.py", "--run-dir", "/tmp/longctx-gcs/bucket/runs/m2",
      "--distributed", "--no-progress", "--set", "train.steps=10", "--set", "data.paths=[a b.txt]"]
  quiet = script("launch_tpu_pod.sh", "--dry-run", "--no-setup", "--detach", "t", "z", "p",
                 "recipes/pod/rmt.py", "/nfs/runs/r")
  (only,) = commands(quiet.stdout, "gcloud")
  assert "nohup" in remote(only) and "> train.log" in remote(only) and "--run-dir /nfs/runs/r " in remote(only)
  assert "gcsfuse" not in remote(only) and "every worker sees" in quiet.stderr
  missing = script("launch_tpu_pod.sh", "--dry-run", "t", "z", "p", "recipes/pod/nope.py", "gs://b/r")
  assert missing.returncode == 2 and "recipe recipes/pod/nope.py not found" in missing.stderr


def fake_tool(tmp_path, name: str, extra: str = "") -> pathlib.Path:
  """A stand-in `name` on PATH that logs its argv (one JSON list a line) to tmp_path/name.log."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  tool = bin_dir / name
  tool.write_text(f"#!/usr/bin/env bash\n{extra}\n"
                  f"python3 -c 'import json, sys; print(json.dumps(sys.argv[1:]))' \"$@\" >> {tmp_path / name}.log\n")
  tool.chmod(0o755)
  return bin_dir


def test_tpu_launcher_runs_gcloud_with_a_packed_checkout(tmp_path):
  """Without --dry-run (gcloud replaced by a logger): the checkout is packed, copied, set up, then trained."""
  listing = tmp_path / "tarball.txt"
  bin_dir = fake_tool(tmp_path, "gcloud", extra=f'if [[ $4 == scp ]]; then tar -tzf "$5" > {listing}; fi')
  res = script("launch_tpu_pod.sh", "my-v5p", "z", "p", "recipes/pod/transformer.py", "gs://b/run",
               env={"PATH": f"{bin_dir}:{os.environ['PATH']}"})
  assert res.returncode == 0, res.stderr
  calls = [json.loads(l) for l in (tmp_path / "gcloud.log").read_text().splitlines()]
  assert [c[3] for c in calls] == ["scp", "ssh", "ssh"] and all("--worker=all" in c for c in calls)
  packed = listing.read_text().split()
  assert {"pyproject.toml", "recipes/pod/transformer.py", "recipes/pod/_pod.py", "longctx/cli.py"} <= set(packed)
  assert not any(p.startswith(".venv/") for p in packed)
  assert "--distributed" in remote(calls[2]) and not pathlib.Path(calls[0][4]).exists()  # tarball removed


def test_slurm_launcher_runs_srun_inside_a_job(tmp_path):
  bin_dir = fake_tool(tmp_path, "srun")
  res = script("launch_slurm.sh", "--no-setup", "recipes/pod/mamba2.py", "/shared/r",
               env={"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "42"})
  assert res.returncode == 0, res.stderr
  (call,) = [json.loads(l) for l in (tmp_path / "srun.log").read_text().splitlines()]
  assert call[0] == "--kill-on-bad-exit=1" and call[2:] == [
      "train", "recipes/pod/mamba2.py", "--run-dir", "/shared/r", "--distributed", "--no-progress"]


def test_slurm_launcher_dry_run_and_refusal_outside_a_job():
  header = (ROOT / "scripts" / "launch_slurm.sh").read_text()
  for what in ("#SBATCH --nodes=", "#SBATCH --gpus-per-node=", "#SBATCH --ntasks-per-node="):
    assert what in header
  res = script("launch_slurm.sh", "--dry-run", "recipes/pod/retnet.py", "/shared/runs/r", "--set", "train.steps=5")
  assert res.returncode == 0, res.stderr
  (srun,) = commands(res.stdout, "srun")
  i = srun.index("train")
  assert srun[i - 1].endswith("/bin/longctx") and srun[i:] == [
      "train", "recipes/pod/retnet.py", "--run-dir", "/shared/runs/r", "--distributed", "--no-progress",
      "--set", "train.steps=5"]
  assert any("jax[cuda12]" in argv for argv in commands(res.stdout, str(ROOT / ".venv/bin/pip")))
  outside = script("launch_slurm.sh", "recipes/pod/retnet.py", "/shared/runs/r", env={"SLURM_JOB_ID": ""})
  assert outside.returncode == 2 and "not inside a SLURM job" in outside.stderr
