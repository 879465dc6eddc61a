"""A new model is one file: tests/toy_model.py (a config, a mixer, the registration; no other file edited)
gets the shared contract, a recipe from the shared builders, `longctx models`, `--dry-run` and `longctx bench`.

Each check runs in a subprocess that imports the toy first (pytest's `-p toy_model` plugin option, or an
import before the CLI), so the toy never enters this process's registry, whose model lists other tests read.
"""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"


def _run(args, **kw):
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
  return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200, **kw)


def _cli(*argv):
  """`longctx ARGV` in a fresh process that has imported the toy model first."""
  code = f"import toy_model, sys; from longctx.cli import main; sys.exit(main({list(argv)!r}))"
  return _run([sys.executable, "-c", code])


def test_the_shared_contract_runs_for_the_new_model():
  """The same tests/test_contract.py, collected with the toy registered: every check of the contract, the
  sharded train step included, with no test written for the toy."""
  res = _run([sys.executable, "-m", "pytest", "-q", "-p", "toy_model", "-p", "no:cacheprovider",
              "tests/test_contract.py", "-k", "toy"])
  assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
  passed = int(res.stdout.strip().splitlines()[-1].split(" passed")[0].split()[-1])
  assert passed >= 10 and "sharded" in _run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "toy_model",
                                              "-p", "no:cacheprovider", "tests/test_contract.py", "-k",
                                              "toy"]).stdout


def test_the_cli_lists_dry_runs_and_benchmarks_the_new_model(tmp_path):
  models = _cli("models")
  assert models.returncode == 0 and "toy" in models.stdout and "gated running mean" in models.stdout, models.stderr
  dry = _cli("train", "recipes/synthetic/recall.py:model=toy", "--dry-run")
  assert dry.returncode == 0, dry.stderr
  assert "model toy" in dry.stdout and "FLOPs per token" in dry.stdout and "per-device memory" in dry.stdout, dry.stdout
  bench = _cli("bench", "--models", "transformer,toy", "--d-models", "32", "--seg-lens", "64", "--layers", "1",
               "--steps", "2", "--tokens-per-step", "128", "--json", str(tmp_path / "bench.json"))
  assert bench.returncode == 0, bench.stderr[-2000:]
  assert "toy" in bench.stdout and (tmp_path / "bench.json").is_file()


def test_an_installed_package_registers_its_model_through_an_entry_point(tmp_path):
  """A model living in another package (here: a distribution whose entry point `longctx.models` names the toy's
  module) is found by `longctx models` without any import of it, and a plugin that fails to import is one line."""
  def distribution(name: str, module: str) -> None:
    info = tmp_path / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[longctx.models]\n{name} = {module}\n")

  distribution("toy-plugin", "toy_model")
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(TESTS)])}
  code = "import sys; from longctx.cli import main; sys.exit(main(['models']))"
  res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert res.returncode == 0 and "toy" in res.stdout, res.stderr[-2000:]
  distribution("broken-plugin", "no_such_module")
  res = subprocess.run([sys.executable, "-m", "longctx.cli", "models"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
  assert res.returncode == 2 and "model plugin 'broken-plugin'" in res.stderr, res.stderr[-2000:]
  assert "Traceback" not in res.stderr
