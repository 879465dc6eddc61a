"""Fine-tuning: `longctx train recipes/finetune.py:model=<model>,dataset=<data> --init-from CKPT` on local files.

A tiny model is pretrained through `recipes/pg19/<model>.py` on local text files with a sentencepiece
tokenizer trained on them, then fine-tuned through the matching fine-tuning recipe on other files: the
fine-tuning run starts where pretraining ended (its first loss is the trained model's, not a random init's).
"""

import pathlib
import sysconfig

import jax
import numpy as np
import pytest

from longctx import recipe as recipe_lib
from longctx.data.tokenizers import train_sentencepiece
from longctx.errors import CheckpointError, ConfigError
from longctx.training.checkpoint import load_initial_params
from longctx.training.loop import run_training
from longctx.training.trainer import Trainer

TINY = {
    "transformer": ["model.d_model=32", "model.num_layers=2", "model.num_heads=4", "model.window=16",
                    "model.attention_block=0"],
    "mamba2": ["model.d_model=32", "model.num_layers=2", "model.head_dim=16", "model.state_size=8",
               "model.chunk_size=8"],
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """Two disjoint sets of local .txt files (standard-library modules' source) and a tokenizer trained on the first."""
  root = tmp_path_factory.mktemp("finetune")
  modules = sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).glob("[a-k]*.py"))
  sizes = [(p, p.stat().st_size) for p in modules]
  picked = [p for p, size in sizes if 4_000 < size < 40_000][:48]
  for i, p in enumerate(picked):
    sub = root / ("pre" if i % 2 == 0 else "ft")
    sub.mkdir(exist_ok=True)
    (sub / f"{p.stem}.txt").write_text(p.read_text(encoding="utf-8", errors="replace"))
  model = train_sentencepiece([str(f) for f in sorted((root / "pre").glob("*.txt"))],
                              model_prefix=str(root / "tok"), vocab_size=384)
  return root, model


def _overrides(model: str, corpus, files: str, steps: int) -> list[str]:
  root, tok = corpus
  return TINY[model] + [
      "model.vocab_size=384", "data.source=files", f"data.paths=[{root / files}/*.txt]", f"data.tokenizer={tok}",
      "data.batch_size=4", "data.seg_len=32", "data.segments_per_step=2", "data.eval_fraction=0.1",
      f"train.steps={steps}", "train.learning_rate=1e-2", "train.warmup_steps=2", "train.log_every=1",
      f"train.checkpoint_every={steps}", "train.eval_batches=1", "train.async_checkpoint=false",
      "train.compute_dtype=float32", "train.remat=false", "mesh.data=1", "mesh.fsdp=1"]


def _cfg(recipe: str, overrides: list[str]):
  return recipe_lib.load_and_check(recipe, overrides)


@pytest.fixture(scope="module", params=["transformer", "mamba2"])
def pretrained(request, corpus, tmp_path_factory):
  model = request.param
  run = tmp_path_factory.mktemp(f"pre_{model}")
  out = run_training(_cfg(f"recipes/pg19/{model}.py", _overrides(model, corpus, "pre", 40)), run,
                     progress=False, devices=jax.devices()[:1], log=lambda *_: None)
  return model, run, out


def test_finetune_continues_from_the_checkpoint(pretrained, corpus, tmp_path):
  model, run, pre = pretrained
  scratch_start, trained = pre["losses"][0], float(np.mean(pre["losses"][-5:]))
  assert trained < scratch_start - 1.0, f"pretraining did not learn ({scratch_start:.2f} -> {trained:.2f})"
  lines = []
  cfg = _cfg(f"recipes/finetune.py:model={model}", _overrides(model, corpus, "ft", 2) + [f"train.init_from={run}"])
  ft = run_training(cfg, tmp_path / "ft", progress=False, devices=jax.devices()[:1], log=lines.append)
  assert any(line.startswith(f"initialised the parameters from {run / 'checkpoints' / '40'}") for line in lines)
  # Held-out files of the same kind: the first fine-tuning loss is the trained model's, far below a fresh init's.
  print(f"{model}: fresh init {scratch_start:.3f}, pretrained {trained:.3f}, fine-tuning starts at {ft['losses'][0]:.3f}")
  assert abs(ft["losses"][0] - trained) < 0.25 * (scratch_start - trained), (ft["losses"][0], trained, scratch_start)


def test_initial_params_are_the_checkpoint_params_exactly(pretrained, corpus):
  model, run, pre = pretrained
  cfg = _cfg(f"recipes/finetune.py:model={model},dataset=arxiv", _overrides(model, corpus, "ft", 2))
  trainer = Trainer(cfg, devices=jax.devices()[:1])
  abstract = trainer.abstract_train_state_sharded()["params"]
  for source in (run, run / "checkpoints", run / "checkpoints" / "40"):
    params, _ = load_initial_params(source, model_cfg=cfg.model, abstract_params=abstract)
    for a, b in zip(jax.tree.leaves(jax.device_get(params)), jax.tree.leaves(jax.device_get(pre["train_state"]["params"]))):
      np.testing.assert_array_equal(a, b)


def test_settings_that_change_no_shape_may_differ(pretrained, corpus):
  model, run, _ = pretrained
  change = "model.window=32" if model == "transformer" else "model.chunk_size=16"
  cfg = _cfg(f"recipes/finetune.py:model={model}", _overrides(model, corpus, "ft", 2) + [change])
  trainer = Trainer(cfg, devices=jax.devices()[:1])
  _, line = load_initial_params(run, model_cfg=cfg.model, abstract_params=trainer.abstract_train_state_sharded()["params"])
  key = change.split("=")[0].split(".")[1]
  assert f"model settings changed: {key}" in line


@pytest.mark.parametrize("problem", ["shape", "other model", "missing", "not a checkpoint"])
def test_bad_init_from_is_one_clear_line(problem, pretrained, corpus, tmp_path):
  model, run, _ = pretrained
  overrides = _overrides(model, corpus, "ft", 2)
  recipe = f"recipes/finetune.py:model={model}"
  source = run
  if problem == "shape":
    overrides = overrides + ["model.d_model=48"]
  elif problem == "other model":
    other = "mamba2" if model == "transformer" else "transformer"
    recipe, overrides = f"recipes/finetune.py:model={other}", _overrides(other, corpus, "ft", 2)
  elif problem == "missing":
    source = tmp_path / "nowhere"
  else:
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    source = tmp_path / "junk"
  cfg = _cfg(recipe, overrides + [f"train.init_from={source}"])
  with pytest.raises((ConfigError, CheckpointError)) as info:
    run_training(cfg, tmp_path / "ft", progress=False, devices=jax.devices()[:1], log=lambda *_: None)
  msg = str(info.value)
  assert "\n" not in msg and "--init-from" in msg
  expected = {"shape": "d_model", "other model": "holds a", "missing": "no such file", "not a checkpoint": "not a run dir"}
  assert expected[problem] in msg, msg
  assert not (tmp_path / "ft" / "checkpoints").exists() or not any((tmp_path / "ft" / "checkpoints").iterdir())


def test_a_run_with_checkpoints_resumes_instead(pretrained, corpus, tmp_path):
  model, run, _ = pretrained
  cfg = _cfg(f"recipes/finetune.py:model={model}", _overrides(model, corpus, "ft", 2) + [f"train.init_from={run}"])
  run_training(cfg, tmp_path / "ft", progress=False, devices=jax.devices()[:1], stop_at_step=1, log=lambda *_: None)
  lines = []
  run_training(cfg, tmp_path / "ft", progress=False, devices=jax.devices()[:1], log=lines.append)
  assert any("resumed from" in line and "is not read again" in line for line in lines), lines


def test_cli_init_from_flag(pretrained, corpus, tmp_path, capsys):
  """`longctx train RECIPE --init-from CKPT` through the command line: it fine-tunes, and a bad CKPT is one line."""
  from longctx import cli

  model, run, _ = pretrained
  sets = [a for o in _overrides(model, corpus, "ft", 1) + ["mesh.data=-1", "data.batch_size=8"] for a in ("--set", o)]
  recipe = f"recipes/finetune.py:model={model},dataset=arxiv"
  code = cli.main(["train", recipe, "--run-dir", str(tmp_path / "ft"), "--no-progress", "--init-from", str(run), *sets])
  out = capsys.readouterr()
  assert code == 0, out.err
  assert f"initialised the parameters from {run / 'checkpoints' / '40'}" in out.out
  assert '"init_from": "' + str(run) + '"' in (tmp_path / "ft" / "config.json").read_text()
  code = cli.main(["train", recipe, "--run-dir", str(tmp_path / "ft2"), "--no-progress", "--init-from",
                   str(tmp_path / "nope"), *sets])
  err = capsys.readouterr().err
  assert code == 2 and err.count("\n") == 1 and err.startswith("error: --init-from") and "no such file" in err


def test_init_from_an_export_dir(pretrained, corpus, tmp_path):
  """`longctx export --format safetensors` output is a starting point too, with the checkpoint's exact weights."""
  from longctx.export import export_run

  model, run, pre = pretrained
  out = export_run(run, fmt="safetensors", out=tmp_path / "exported")
  cfg = _cfg(f"recipes/finetune.py:model={model}", _overrides(model, corpus, "ft", 2))
  trainer = Trainer(cfg, devices=jax.devices()[:1])
  params, line = load_initial_params(out, model_cfg=cfg.model,
                                     abstract_params=trainer.abstract_train_state_sharded()["params"])
  assert line.startswith(f"initialised the parameters from export {out}")
  for a, b in zip(jax.tree.leaves(jax.device_get(params)), jax.tree.leaves(jax.device_get(pre["train_state"]["params"]))):
    np.testing.assert_array_equal(a, b)
