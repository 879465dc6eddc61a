"""The `longctx` CLI: quickstart end to end, listing, dry runs, and bad input -> one clear line."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from longctx import cli
from longctx.models import list_models

ROOT = pathlib.Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "recipes" / "quickstart.py")


def run_cli(args, capsys):
  code = cli.main(args)
  out = capsys.readouterr()
  return code, out.out, out.err


def test_quickstart_end_to_end_shortened(tmp_path, capsys):
  """The quickstart recipe's own code path, shortened: loss falls, eval line, logs, resume, eval command."""
  run_dir = tmp_path / "qs"
  args = ["train", QUICKSTART, "--run-dir", str(run_dir), "--no-progress", "--set", "train.steps=40",
          "--set", "train.warmup_steps=5", "--set", "train.eval_batches=2", "--set", "train.checkpoint_every=20",
          "--set", "train.log_every=1"]
  code, out, err = run_cli(args, capsys)
  assert code == 0, err
  assert "eval @ step 40: loss" in out
  train = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
  losses = [r["loss"] for r in train if r["split"] == "train"]
  assert losses[0] > 5.0 and min(losses[-5:]) < losses[0] - 1.5  # bytes: from ~ln(259) to clearly lower
  assert (run_dir / "loss.png").exists() and (run_dir / "config.json").exists()
  code, out, err = run_cli(["eval", str(run_dir), "--max-batches", "2"], capsys)
  assert code == 0 and "eval @ step 40: loss" in out

  # The long-context suite on the same run: tables, results.json (merged across calls), plots.
  code, out, err = run_cli(["eval", str(run_dir), "--task", "passkey,qa2", "--lengths", "64,200", "--examples", "2",
                            "--depths", "0,1", "--seg-len", "64", "--no-progress"], capsys)
  assert code == 0, err
  assert "passkey accuracy" in out and "qa2 accuracy" in out and "depth (rows) x length" in out
  code, out, err = run_cli(["eval", str(run_dir / "checkpoints" / "40"), "--task", "ppl", "--lengths", "64,256",
                            "--examples", "2", "--no-progress"], capsys)
  assert code == 0, err
  assert "bits/token by position" in out and "0-64" in out and "64-256" in out
  results = json.loads((run_dir / "eval" / "results.json").read_text())
  assert results["step"] == 40 and set(results["tasks"]) == {"passkey", "qa2", "ppl"}
  assert len(results["tasks"]["passkey"]["accuracy"]) == 2  # two depths x two lengths
  for png in ("accuracy_vs_length.png", "loss_vs_position.png", "passkey_heatmap.png"):
    assert (run_dir / "eval" / png).stat().st_size > 1000
  code, out, err = run_cli(["eval", "--compare", str(run_dir), str(run_dir / "eval" / "results.json"), "--out",
                            str(tmp_path / "cmp")], capsys)
  assert code == 0, err
  # Runs are named by their run dir ("qs"); the same run twice gets its step to tell the two apart.
  assert out.count("qs @ step 40") >= 4 and "transformer@40" not in out
  assert (tmp_path / "cmp" / "accuracy_vs_length.png").exists()
  for args, message in [
      (["--task", "nope"], "--task 'nope': ['nope'] not in"),
      (["--task", "passkey", "--lengths", "4q"], "length '4q' is not a number like 512, 4k or 1M"),
      (["--task", "passkey", "--depths", "2"], "--depths: '2' is not a number in [0, 1]"),
      (["--task", "mqar", "--pairs", "0"], "--pairs: '0' is not a positive integer"),
      (["--compare", str(tmp_path)], "no results.json under"),
  ]:
    code, _, err = run_cli(["eval", *([] if args[0] == "--compare" else [str(run_dir)]), *args], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, (args, err)
  code, _, err = run_cli(["eval", str(run_dir / "checkpoints" / "7")], capsys)
  assert code == 2 and "no checkpoint for step 7" in err


def test_models_lists_every_model(capsys):
  code, out, _ = run_cli(["models"], capsys)
  assert code == 0 and "Transformer-XL" in out
  names = [line.split()[0] for line in out.splitlines() if line.strip()]
  assert set(list_models()) <= set(names) and len(list_models()) >= 10


@pytest.mark.parametrize("recipe", sorted(str(p) for p in (ROOT / "recipes").rglob("*.py")
                                                if not p.name.startswith("_")))
def test_dry_run_of_every_recipe(recipe, capsys):
  code, out, err = run_cli(["train", recipe, "--dry-run", "--no-compile"], capsys)  # compiled: test_pod_recipes.py
  assert code == 0, err
  for what in ("parameters:", "FLOPs per token:", "mesh:", "per-device memory", "total"):
    assert what in out


def test_pod_recipe_dry_run_reports_its_mesh(capsys):
  code, out, _ = run_cli(["train", str(ROOT / "recipes" / "pod" / "transformer.py"), "--dry-run", "--no-compile"],
                        capsys)
  assert code == 0 and "data=1 x fsdp=16 x tensor=1 x sequence=4 (64 devices)" in out


def _write(tmp_path, name, text):
  p = tmp_path / name
  p.write_text(text)
  return str(p)


BAD_INPUTS = [
    # (label, extra args or recipe text, expected message fragment)
    ("unknown key", ["--set", "model.d_modl=64"], "unknown config key 'model.d_modl'; valid keys at model:"),
    ("unknown section", ["--set", "optim.lr=1"], "unknown config key 'optim.lr'; valid keys at top level:"),
    ("wrong type", ["--set", "train.steps=ten"], "train.steps='ten': expected an int"),
    ("wrong bool", ["--set", "train.remat=maybe"], "train.remat='maybe': expected a bool"),
    ("not key=value", ["--set", "train.steps"], "is not of the form key=value"),
    ("zero size", ["--set", "data.seg_len=0"], "data.seg_len=0 must be > 0"),
    ("negative size", ["--set", "model.d_model=-8"], "model.d_model=-8 must be > 0"),
    ("heads do not divide", ["--set", "model.num_heads=3"], "not divisible by model.num_heads=3"),
    ("seg_len vs sequence axis", ["--set", "mesh.data=1", "--set", "mesh.sequence=1", "--set", "data.seg_len=100",
                                  "--set", "mesh.data=-1", "--set", "mesh.sequence=8", "--set", "data.batch_size=1"],
     "data.seg_len=100 is not divisible by mesh.sequence=8"),
    ("lanes vs data shards", ["--set", "data.batch_size=6", "--set", "mesh.data=8"],
     "data.batch_size=6 lanes cannot be split over 8 data-parallel shards"),
    ("mesh too big", ["--set", "mesh.data=16"], "needs 16 devices but 8 are available"),
    ("missing data file", ["--set", "data.source=files", "--set", "data.paths=[/nonexistent/book.txt]"],
     "data file '/nonexistent/book.txt' not found"),
    ("vocab mismatch", ["--set", "model.vocab_size=100"], "has 259 ids but model.vocab_size=100"),
    ("missing tokenizer", ["--set", "data.tokenizer=/nonexistent/tok.model"], "tokenizer model '/nonexistent/tok.model' not found"),
    ("bad source", ["--set", "data.source=ftp"], "data.source='ftp' is not one of"),
]


@pytest.mark.parametrize("label,extra,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_one_clear_line(label, extra, message, tmp_path, capsys):
  run_dir = tmp_path / "run"
  code, out, err = run_cli(["train", QUICKSTART, "--run-dir", str(run_dir), "--no-progress", *extra], capsys)
  assert code == 2
  lines = [l for l in err.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
  assert not run_dir.exists()  # nothing written, no partial checkpoint


def test_empty_dataset_and_raising_recipe(tmp_path, capsys):
  empty = _write(tmp_path, "empty.jsonl", json.dumps({"text": ""}) + "\n")
  code, _, err = run_cli(["train", QUICKSTART, "--run-dir", str(tmp_path / "r1"), "--set", "data.source=files",
                          "--set", f"data.paths=[{empty}]"], capsys)
  assert code == 2 and err.strip().startswith("error: ") and "contain no non-empty documents" in err
  assert len(err.strip().splitlines()) == 1 and not (tmp_path / "r1").exists()
  raising = _write(tmp_path, "broken.py", "def config():\n  x = {}\n  return x['missing']\n")
  code, _, err = run_cli(["train", raising, "--run-dir", str(tmp_path / "r2")], capsys)
  assert code == 2 and len(err.strip().splitlines()) == 1
  assert f"recipe {raising}:3 raised KeyError: 'missing'" in err
  code, _, err = run_cli(["train", str(tmp_path / "nope.py")], capsys)
  assert code == 2 and "recipe file" in err and "not found" in err
  not_config = _write(tmp_path, "weird.py", "def config():\n  return 42\n")
  code, _, err = run_cli(["train", not_config], capsys)
  assert code == 2 and "config() returned int" in err
  code, _, err = run_cli(["eval", str(tmp_path / "no_run")], capsys)
  assert code == 2 and "config.json not found" in err


def test_real_entry_point_and_help():
  """The installed `longctx` console script: --help explains every command; errors exit non-zero."""
  exe = [sys.executable, "-m", "longctx.cli"]
  out = subprocess.run([*exe, "train", "--help"], capture_output=True, text=True, check=True).stdout
  for option in ("--run-dir", "--set", "--dry-run", "--stop-at-step", "--no-progress"):
    assert option in out
  bad = subprocess.run([*exe, "train", QUICKSTART, "--set", "model.nope=1"], capture_output=True, text=True)
  assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
      bad.stderr.strip().splitlines()[0]] and "unknown config key 'model.nope'" in bad.stderr


def test_console_script_reruns_with_tuned_malloc_on_a_cpu_host(monkeypatch):
  """`longctx` on a glibc CPU host re-runs itself once with cli.MALLOC_TUNABLES (XLA's per-call temporaries
  stay mapped instead of page-faulting in every step); not when GLIBC_TUNABLES is set or LONGCTX_MALLOC=system."""
  import platform

  if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
    pytest.skip(f"not a glibc Linux host ({sys.platform}, {platform.libc_ver()})")

  class Exec(Exception):
    pass

  def execve(path, args, env):
    raise Exec(path, args, env)

  monkeypatch.setattr(cli.os, "execve", execve)
  monkeypatch.setattr(cli, "main", lambda: 0)
  monkeypatch.setattr(sys, "argv", ["longctx", "models"])
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
  monkeypatch.delenv("LONGCTX_MALLOC", raising=False)
  with pytest.raises(Exec) as e:
    cli.entry()
  path, args, env = e.value.args
  assert (path, args) == (sys.executable, [sys.executable, "-m", "longctx.cli", "models"])
  assert env["GLIBC_TUNABLES"] == cli.MALLOC_TUNABLES and env["JAX_PLATFORMS"] == "cpu"
  for name, value in (("GLIBC_TUNABLES", cli.MALLOC_TUNABLES), ("LONGCTX_MALLOC", "system")):
    with monkeypatch.context() as m:
      m.setenv(name, value)
      with pytest.raises(SystemExit) as done:  # straight to main, no re-run
        cli.entry()
      assert done.value.code == 0
  monkeypatch.setenv("JAX_PLATFORMS", "cuda")  # an accelerator host keeps glibc's defaults
  with pytest.raises(SystemExit):
    cli.entry()
  # The real console script: runs (re-run included) and answers.
  exe = pathlib.Path(sys.executable).with_name("longctx")
  assert exe.exists(), f"no {exe}: install the package (pip install -e .) to get the `longctx` command"
  out = subprocess.run([str(exe), "models"], capture_output=True, text=True, check=True,
                       env={**{k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"},
                            "JAX_PLATFORMS": "cpu"}).stdout
  assert "transformer" in out
