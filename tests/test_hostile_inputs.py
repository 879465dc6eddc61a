"""Hostile inputs to every CLI command: each ends in one line `error: ...` on stderr, exit code 2, no
traceback, and nothing written or lost (issue 8, "Config/data hostility").

Every case runs in-process through `cli.main`, with the working directory and `tempfile`'s directory moved
into the case's own tmp dir. stderr is captured at the file descriptor (what C++ libraries write counts),
and a WARNING or ERROR logged through `logging` counts as a line too (it would reach stderr in a real
process: two cases also run as one, `python -m longctx.cli`). The whole pytest base tmp dir (the shared
assets, among them a trained run, and every case's dir) is snapshotted (every path, and the SHA-256 of
every file) before and after the case and must not change. The session's closing summary counts the
cases (`hostile inputs: N tried, ...`, tests/conftest.py), across xdist workers too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import random
import shutil
import sys
import tempfile
import traceback
from typing import Callable

import pytest

from longctx import cli
from longctx import recipe as recipe_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "recipes" / "quickstart.py")
RMT = str(ROOT / "recipes" / "synthetic" / "rmt_recall.py")  # block_len 32: a blockwise model
MAMBA = str(ROOT / "recipes" / "synthetic" / "mamba_recall.py")

# A tiny quickstart: 1 layer, d_model 32, 16-token segments, 1 step (~10 s to train on 2 CPU cores).
TINY = ["--set", "model.d_model=32", "--set", "model.num_layers=1", "--set", "model.num_heads=2",
        "--set", "model.window=16", "--set", "data.seg_len=16", "--set", "data.segments_per_step=1",
        "--set", "train.steps=1", "--set", "train.warmup_steps=0", "--set", "train.eval_batches=1",
        "--no-progress"]
DRY = ["--dry-run", "--no-compile"]

RECIPES = {
    "syntax.py": "from longctx.config import Config\ndef config(:\n  return Config()\n",
    "raises_on_import.py": "raise RuntimeError('the recipe is broken')\n",
    "raises_in_config.py": "def config():\n  return {}['missing']\n",
    "returns_dict.py": "def config():\n  return {'model': {'d_model': 64}}\n",
    "no_config.py": "from longctx.config import Config\nCONFIG = Config()\n",
    "config_not_callable.py": "from longctx.config import Config\nconfig = Config()\n",
    "exits.py": "import sys\ndef config():\n  sys.exit('recipe gave up')\n",
    "recursion.py": "def config():\n  return config()\n",
    "base_model_class.py": ("from longctx.config import Config, ModelConfig\n"
                            "def config():\n  return Config(model=ModelConfig(name='transformer'))\n"),
    "unknown_model.py": ("from longctx.config import Config, ModelConfig\n"
                         "def config():\n  return Config(model=ModelConfig(name='gpt5'))\n"),
    "recipe.txt": "def config():\n  raise RuntimeError('never imported')\n",
    "wrong_field_type.py": ("from longctx.config import Config\nfrom longctx.models import TransformerConfig\n"
                            "def config():\n  return Config(model=TransformerConfig(d_model='64'))\n"),
}

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches "
         "and every zebra hums").split()


def _text(n_words: int, seed: int) -> str:
  rng = random.Random(seed)
  return " ".join(rng.choice(WORDS) for _ in range(n_words))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  """Shared inputs, made once: bad recipes, bad data files, tokenizers and a trained tiny run A."""
  from longctx.data.tokenizers import train_sentencepiece

  s = tmp_path_factory.mktemp("assets")
  for name, text in RECIPES.items():
    (s / name).write_text(text)
  (s / "binary.py").write_bytes(random.Random(0).randbytes(2048))
  (s / "empty.txt").write_bytes(b"")
  (s / "blank.txt").write_text("\n \n\t\n")
  (s / "binary.txt").write_bytes(random.Random(1).randbytes(4096))
  (s / "huge_line.txt").write_text(_text(60_000, 2))  # ~330 KB, no newline
  (s / "bad.jsonl").write_text('{"text": "fine"}\n{not json\n')
  (s / "other_field.jsonl").write_text(json.dumps({"body": "hello"}) + "\n")
  (s / "table.csv").write_text("text\nhello\n")
  (s / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + random.Random(3).randbytes(512))
  for i in range(3):
    (s / "papers" / f"good{i}.tex").parent.mkdir(exist_ok=True)
    (s / "papers" / f"good{i}.tex").write_text(_text(200, 10 + i))
  (s / "papers" / "latin1.tex").write_bytes("caf\xe9 au lait ".encode("latin-1") * 50)
  (s / "garbage.model").write_bytes(b"this is not a sentencepiece model\n")
  corpus = s / "corpus.txt"
  corpus.write_text("\n".join(_text(40, i) + f" line{i} {i * 7919}" for i in range(400)))
  tok = train_sentencepiece([str(corpus)], model_prefix=str(s / "tok300"), vocab_size=300)
  assert pathlib.Path(tok).is_file()
  code = cli.main(["train", QUICKSTART, "--run-dir", str(s / "A"), *TINY])
  assert code == 0 and (s / "A" / "checkpoints" / "1").is_dir()
  return s


def _copy_run(case_dir: pathlib.Path, assets: pathlib.Path) -> pathlib.Path:
  shutil.copytree(assets / "A", case_dir / "run")
  return case_dir / "run"


def _set_config(text: str | Callable[[dict], dict]):
  def setup(case_dir, assets):
    run = _copy_run(case_dir, assets)
    cfg = run / "config.json"
    cfg.write_text(text if isinstance(text, str) else json.dumps(text(json.loads(cfg.read_text()))))
  return setup


def _mamba_config(_: dict) -> dict:
  from longctx import config as config_lib

  return config_lib.to_dict(recipe_lib.load_recipe(MAMBA))


def _without(section: str):
  def edit(d: dict) -> dict:
    d.pop(section)
    return d
  return edit


def _with_model(**fields):
  def edit(d: dict) -> dict:
    d["model"].update(fields)
    return d
  return edit


def _config_only(case_dir, assets):
  (case_dir / "run").mkdir()
  shutil.copy(assets / "A" / "config.json", case_dir / "run" / "config.json")


def _truncate_checkpoint(case_dir, assets):
  run = _copy_run(case_dir, assets)
  for f in sorted((run / "checkpoints" / "1" / "train_state").rglob("*")):
    if f.is_file() and f.stat().st_size > 100:
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _write(name: str, data: str | bytes):
  def setup(case_dir, assets):
    path = case_dir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
  return setup


_HELD_LOCKS = []  # run dirs "in use": their locks stay held (by this process) for the rest of the session


def _training_in_progress(case_dir, assets):
  from longctx.training.run_dir import RunDirLock

  _HELD_LOCKS.append(RunDirLock(_copy_run(case_dir, assets)).acquire())


@dataclasses.dataclass
class Case:
  id: str
  args: list[str]  # {Q} quickstart, {S} shared assets dir, {A} the trained run, {T} this case's tmp dir
  expect: str  # a fragment of the one error line
  setup: Callable[[pathlib.Path, pathlib.Path], None] | None = None  # (case dir, assets dir), before snapshot
  code: int = 2
  env: dict[str, str] = dataclasses.field(default_factory=dict)  # environment variables for the case


def train(*extra: str) -> list[str]:
  return ["train", "{Q}", "--run-dir", "{T}/run", "--no-progress", *extra]


def sets(*pairs: str) -> list[str]:
  return [a for p in pairs for a in ("--set", p)]


# The RMT recall recipe without its curriculum and document alignment (which would object to seg_len first).
RMT_FLAT = ("train.curriculum=[]", "train.steps=2", "data.align_documents=0")

CASES = [
    # ------------------------------------------------------------------ the command line itself
    Case("cli-unknown-command", ["frobnicate"], "invalid choice: 'frobnicate'"),
    Case("cli-train-no-recipe", ["train"], "the following arguments are required: recipe"),
    Case("cli-train-unknown-flag", ["train", "{Q}", "--bogus"], "unrecognized arguments: --bogus"),
    Case("cli-stop-at-step-not-int", train("--stop-at-step", "ten"), "invalid int value: 'ten'"),
    Case("cli-models-extra-arg", ["models", "extra"], "unrecognized arguments: extra"),
    Case("cli-tokenizer-unknown-sub", ["tokenizer", "frob"], "invalid choice: 'frob'"),
    # ------------------------------------------------------------------ recipe files
    Case("recipe-missing", ["train", "{T}/nope.py"], "recipe file"),
    Case("recipe-is-a-directory", ["train", "{T}"], "recipe file '{T}' not found"),
    Case("recipe-not-a-py-file", ["train", "{S}/recipe.txt"], "recipe.txt' is not a .py file"),
    Case("recipe-syntax-error", ["train", "{S}/syntax.py"], "syntax.py:2 raised SyntaxError: invalid syntax"),
    Case("recipe-binary", ["train", "{S}/binary.py"], "binary.py raised SyntaxError"),
    Case("recipe-raises-on-import", ["train", "{S}/raises_on_import.py"],
         "raises_on_import.py:1 raised RuntimeError: the recipe is broken"),
    Case("recipe-raises-in-config", ["train", "{S}/raises_in_config.py", "--run-dir", "{T}/run"],
         "raises_in_config.py:2 raised KeyError: 'missing'"),
    Case("recipe-returns-dict", ["train", "{S}/returns_dict.py"], "config() returned dict"),
    Case("recipe-no-config", ["train", "{S}/no_config.py"], "defines no config() function"),
    Case("recipe-config-not-callable", ["train", "{S}/config_not_callable.py"],
         "defines no config() function returning a longctx Config (its config is a Config)"),
    Case("recipe-calls-sys-exit", ["train", "{S}/exits.py"], "exits.py:3 raised SystemExit: recipe gave up"),
    Case("recipe-infinite-recursion", ["train", "{S}/recursion.py"], "recursion.py:2 raised RecursionError"),
    Case("recipe-base-model-class", ["train", "{S}/base_model_class.py", *DRY], "needs a TransformerConfig"),
    Case("recipe-wrong-field-type", ["train", "{S}/wrong_field_type.py", *DRY], "model.d_model='64': expected an int"),
    Case("recipe-unknown-model", ["train", "{S}/unknown_model.py", *DRY], "unknown model 'gpt5'; registered models:"),
    # ------------------------------------------------------------------ overrides
    Case("set-unknown-key", train(*sets("train.stepz=1")), "unknown config key 'train.stepz'"),
    Case("set-unknown-section", ["train", "{Q}", *DRY, *sets("optim.lr=1")], "unknown config key 'optim.lr'"),
    Case("set-not-an-int", train(*sets("model.d_model=abc")), "model.d_model='abc': expected an int"),
    Case("set-list-for-int", train(*sets("model.d_model=[64,128]")), "model.d_model='[64,128]': expected an int"),
    Case("set-missing-equals", train(*sets("train.steps")), "is not of the form key=value"),
    Case("curriculum-bad-stage", train(*sets('train.curriculum=["steps=3 data.task_lenght=64"]')),
         "train.curriculum[0]: unknown config key 'data.task_lenght'"),
    Case("curriculum-steps-do-not-add-up", train(*sets('train.curriculum=["steps=3","steps=4"]')),
         "the curriculum's stages add up to 7 steps; set train.steps=7"),
    Case("set-empty-key", train(*sets("=5")), "unknown config key ''"),
    Case("set-whole-section", train(*sets("model=3")), "model is a section, not a value"),
    Case("set-into-a-field", train(*sets("model.d_model.x=1")), "model.d_model is not a section"),
    Case("set-model-name", train(*sets("model.name=mamba")), "model.name cannot be overridden"),
    Case("set-not-a-bool", train(*sets("train.remat=maybe")), "expected a bool"),
    Case("set-nan-learning-rate", train(*sets("train.learning_rate=nan")),
         "train.learning_rate='nan': expected a finite float"),
    Case("set-inf-learning-rate", train(*sets("train.learning_rate=inf")),
         "train.learning_rate='inf': expected a finite float"),
    Case("set-float16", ["train", "{Q}", *DRY, *sets("train.compute_dtype=float16")],
         "train.compute_dtype='float16' is not one of"),
    # ------------------------------------------------------------------ zero / negative sizes
    Case("size-d-model-0", train(*sets("model.d_model=0")), "model.d_model=0 must be > 0"),
    Case("size-num-layers-neg", ["train", "{Q}", *DRY, *sets("model.num_layers=-1")],
         "model.num_layers=-1 must be > 0"),
    Case("size-vocab-0", ["train", "{Q}", *DRY, *sets("model.vocab_size=0")], "model.vocab_size=0 must be > 0"),
    Case("size-batch-0", train(*sets("data.batch_size=0")), "data.batch_size=0 must be > 0"),
    Case("size-seg-len-0", ["train", "{Q}", *DRY, *sets("data.seg_len=0")], "data.seg_len=0 must be > 0"),
    Case("size-segments-0", train(*sets("data.segments_per_step=0")), "data.segments_per_step=0 must be > 0"),
    Case("size-steps-0", train(*sets("train.steps=0")), "train.steps=0 must be > 0"),
    Case("size-lr-neg", train(*sets("train.learning_rate=-1")), "train.learning_rate=-1.0 must be > 0"),
    Case("size-warmup-neg", train(*sets("train.warmup_steps=-5")),
         "train.warmup_steps, train.eval_every and train.eval_batches must be >= 0"),
    Case("size-eval-fraction", train(*sets("data.eval_fraction=1.5")), "data.eval_fraction=1.5 must be in [0, 1)"),
    Case("size-window-0", ["train", "{Q}", *DRY, *sets("model.window=0")], "model.window=0 must be >= 1"),
    Case("size-heads-do-not-divide", ["train", "{Q}", *DRY, *sets("model.num_heads=3")],
         "not divisible by model.num_heads=3"),
    Case("size-stop-at-step-0", train("--stop-at-step", "0"), "--stop-at-step=0 must be >= 1"),
    Case("size-stop-at-step-neg", train("--stop-at-step", "-3"), "--stop-at-step=-3 must be >= 1"),
    # ------------------------------------------------------------------ mesh and lengths that do not divide
    Case("mesh-axis-0", ["train", "{Q}", *DRY, *sets("mesh.data=0")], "mesh axis sizes must be positive or -1"),
    Case("mesh-two-fill-axes", train(*sets("mesh.fsdp=-1")), "at most one mesh axis may be -1"),
    Case("mesh-bigger-than-devices", train(*sets("mesh.data=16")), "needs 16 devices but 8 are available"),
    Case("mesh-batch-not-divisible", train(*sets("data.batch_size=6")),
         "data.batch_size=6 lanes cannot be split over 8 data-parallel shards"),
    Case("mesh-batch-not-divisible-dry-run", ["train", "{Q}", *DRY, *sets("data.batch_size=6")],
         "data.batch_size=6 lanes cannot be split over 8 data-parallel shards"),
    Case("mesh-seg-len-vs-sequence", train(*sets("data.seg_len=100", "mesh.sequence=8", "data.batch_size=1")),
         "data.seg_len=100 is not divisible by mesh.sequence=8"),
    Case("blockwise-seg-len", ["train", RMT, "--run-dir", "{T}/run", *sets(*RMT_FLAT, "data.seg_len=100")],
         "data.seg_len=100 must be a multiple of 32"),
    Case("blockwise-seg-len-dry-run", ["train", RMT, *DRY, *sets(*RMT_FLAT, "data.seg_len=100")],
         "data.seg_len=100 must be a multiple of 32"),
    # ------------------------------------------------------------------ run dirs and multi-host flags
    Case("run-dir-is-a-url", ["train", "{Q}", "--run-dir", "gs://bucket/run", *TINY], "is a URL"),
    Case("run-dir-is-a-file", ["train", "{Q}", "--run-dir", "{S}/empty.txt", *TINY],
         "empty.txt' is a file, not a directory; pass another --run-dir"),
    Case("run-dir-under-a-file", ["train", "{Q}", "--run-dir", "{S}/empty.txt/run", *TINY],
         "cannot be made: '{S}/empty.txt' is a file"),
    Case("init-from-missing", train("--init-from", "{T}/nowhere"), "nowhere: no such file or directory"),
    Case("init-from-other-shapes", train("--init-from", "{A}", *sets("train.steps=1")),
         "does not fit the recipe's model"),
    Case("distributed-missing-id", train("--num-processes", "2"), "missing: --coordinator"),
    Case("distributed-id-too-big", train("--num-processes", "2", "--process-id", "2", "--coordinator", "localhost:1"),
         "must be below"),
    Case("distributed-bad-coordinator", train("--num-processes", "2", "--process-id", "0", "--coordinator", "nohost"),
         "coordinator='nohost' is not HOST:PORT"),
    # ------------------------------------------------------------------ data files
    Case("data-missing-file", train(*sets("data.source=files", "data.paths=[{T}/book.txt]")), "book.txt' not found"),
    Case("data-empty-file", train(*sets("data.source=files", "data.paths=[{S}/empty.txt]")),
         "contain no non-empty documents"),
    Case("data-blank-file", train(*sets("data.source=files", "data.paths=[{S}/blank.txt]")),
         "contain no non-empty documents"),
    Case("data-binary-file", train(*sets("data.source=files", "data.paths=[{S}/binary.txt]")),
         "binary.txt' is not UTF-8 text (byte "),
    Case("data-binary-image", train(*sets("data.source=files", "data.paths=[{S}/image.png]")),
         "image.png' is not UTF-8 text (byte 0 is 0x89)"),
    Case("data-one-unreadable-among-many", train(*sets("data.source=files", "data.paths=[{S}/papers/*.tex]")),
         "data file '{S}/papers/latin1.tex' is not UTF-8 text (byte 3 is 0xe9); convert it to UTF-8"),
    Case("data-huge-single-line", train(*sets("data.source=files", "data.paths=[{S}/huge_line.txt]")),
         "too few to split into training and held-out documents"),
    Case("data-empty-eval-file",
         train(*sets("data.source=files", "data.paths=[{S}/huge_line.txt]", "data.eval_paths=[{S}/empty.txt]")),
         "held-out files ['{S}/empty.txt'] yields no documents"),
    Case("data-bad-jsonl", train(*sets("data.source=files", "data.paths=[{S}/bad.jsonl]")),
         ".jsonl files need one JSON object per line"),
    Case("data-jsonl-wrong-field", train(*sets("data.source=files", "data.paths=[{S}/other_field.jsonl]")),
         "field 'text' not in"),
    Case("data-hub-offline", train(*sets("data.source=hub", "data.hub_name=deepmind/pg19")),
         "HF_HUB_OFFLINE is set, so hub dataset 'deepmind/pg19' cannot be streamed", env={"HF_HUB_OFFLINE": "1"}),
    Case("data-hub-unreachable", train(*sets("data.source=hub", "data.hub_name=deepmind/pg19")),
         "cannot reach the Hugging Face hub at http://127.0.0.1:9", env={"HF_ENDPOINT": "http://127.0.0.1:9"}),
    Case("data-glob-matches-nothing", train(*sets("data.source=files", "data.paths=[{T}/*.txt]")), "matches no file"),
    Case("data-directory", train(*sets("data.source=files", "data.paths=[{S}]")), "assets0' is a directory"),
    Case("data-files-without-paths", train(*sets("data.source=files")), "needs data.paths"),
    # ------------------------------------------------------------------ tokenizers in training
    Case("tokenizer-vocab-exceeds-model", train(*sets("data.tokenizer={S}/tok300.model")),
         "has 300 ids but model.vocab_size=259"),
    Case("tokenizer-garbage-file", train(*sets("data.tokenizer={S}/garbage.model")), "could not be loaded"),
    Case("tokenizer-missing-file", train(*sets("data.tokenizer={T}/tok.model")), "not found"),
    # ------------------------------------------------------------------ a checkpoint of another model
    Case("train-in-a-run-dir-in-use", train(*TINY[:-1]), "run dir {T}/run is in use by another training (pid ",
         setup=_training_in_progress),
    Case("resume-with-another-model", ["train", MAMBA, "--run-dir", "{A}", "--no-progress",
                                     *sets("train.steps=2", "train.curriculum=[]")],
         "was trained with another model than this recipe's (model.name 'transformer' -> 'mamba'"),
    Case("resume-with-another-size", ["train", "{Q}", "--run-dir", "{A}", "--no-progress"],
         "was trained with another model than this recipe's (model.d_model 32 -> 128, model.num_heads 2 -> 4"),
    # ------------------------------------------------------------------ tokenizer train
    Case("tok-input-missing", ["tokenizer", "train", "--input", "{T}/none.txt", "--out", "{T}/tok"],
         "not found; check --input"),
    Case("tok-input-empty", ["tokenizer", "train", "--input", "{S}/empty.txt", "--out", "{T}/tok"], "no text found"),
    Case("tok-input-blank", ["tokenizer", "train", "--input", "{S}/blank.txt", "--out", "{T}/new/dir/tok"],
         "no text found"),
    Case("tok-input-binary", ["tokenizer", "train", "--input", "{S}/binary.txt", "--out", "{T}/tok"],
         "binary.txt' is not UTF-8 text (byte "),
    Case("tok-input-one-unreadable-among-many", ["tokenizer", "train", "--input", "{S}/papers/*.tex", "--out",
                                                 "{T}/tok"], "latin1.tex' is not UTF-8 text (byte 3 is 0xe9)"),
    Case("tok-input-huge-line", ["tokenizer", "train", "--input", "{S}/huge_line.txt", "--out", "{T}/tok"],
         "--vocab-size=8000 is too large for this text"),
    Case("tok-vocab-below-byte-fallback", ["tokenizer", "train", "--input", "{S}/corpus.txt", "--vocab-size", "100",
                                           "--out", "{T}/tok"], "--vocab-size=100 is too small for this text"),
    Case("tok-input-wrong-field", ["tokenizer", "train", "--input", "{S}/other_field.jsonl", "--out", "{T}/tok"],
         "pass --text-field"),
    Case("tok-vocab-0", ["tokenizer", "train", "--input", "{S}/corpus.txt", "--vocab-size", "0", "--out", "{T}/t"],
         "--vocab-size=0 is too small"),
    Case("tok-vocab-huge", ["tokenizer", "train", "--input", "{S}/corpus.txt", "--vocab-size", "100000",
                            "--out", "{T}/new/tok"], "--vocab-size=100000 is too large for this text"),
    Case("tok-out-is-a-directory", ["tokenizer", "train", "--input", "{S}/corpus.txt", "--vocab-size", "300",
                                    "--out", "{T}"], "is a directory, but it is the prefix"),
    Case("tok-missing-input", ["tokenizer", "train", "--out", "{T}/tok"], "required: --input"),
    Case("tok-model-type", ["tokenizer", "train", "--input", "{S}/corpus.txt", "--out", "{T}/t", "--model-type", "x"],
         "invalid choice: 'x'"),
    # ------------------------------------------------------------------ eval
    Case("eval-no-run", ["eval"], "needs a run directory"),
    Case("eval-missing-dir", ["eval", "{T}/nowhere"], "config.json not found"),
    Case("eval-not-a-run", ["eval", "{S}"], "config.json not found"),
    Case("eval-corrupt-config", ["eval", "{T}/run"],
         "run/config.json is not valid JSON", setup=_set_config("{\"model\": {trunc")),
    Case("eval-config-not-an-object", ["eval", "{T}/run"],
         "run/config.json is not a longctx config (a config must be a JSON object", setup=_set_config("[1, 2, 3]")),
    Case("eval-config-missing-section", ["eval", "{T}/run"],
         "run/config.json is not a longctx config (a config needs the sections model, data, train, mesh (objects); "
         "missing: data)",
         setup=_set_config(_without("data"))),
    Case("eval-config-unknown-model", ["eval", "{T}/run"],
         "run/config.json is not a longctx config (unknown model 'gpt5'", setup=_set_config(_with_model(name="gpt5"))),
    Case("eval-config-unknown-field", ["eval", "{T}/run"],
         "run/config.json is not a longctx config (unknown config key model.colour",
         setup=_set_config(_with_model(colour="red"))),
    Case("eval-config-bad-value", ["eval", "{T}/run"],
         "run/config.json is not a longctx config (model.d_model='big': expected an int)",
         setup=_set_config(_with_model(d_model="big"))),
    Case("eval-checkpoint-of-another-model", ["eval", "{T}/run"],
         "run/checkpoints/1 could not be restored", setup=_set_config(_mamba_config)),
    Case("eval-truncated-checkpoint", ["eval", "{T}/run", "--max-batches", "1"],
         "run/checkpoints/1 could not be restored", setup=_truncate_checkpoint),
    Case("eval-no-checkpoints", ["eval", "{T}/run"], "no checkpoints in", setup=_config_only),
    Case("eval-step-missing", ["eval", "{A}/checkpoints/7"], "no checkpoint for step 7"),
    Case("eval-set-changes-shapes", ["eval", "{A}", *sets("model.d_model=64")], "changes the shapes"),
    Case("eval-set-unknown-key", ["eval", "{A}", *sets("model.nope=1")], "unknown config key 'model.nope'"),
    Case("eval-tokenizer-vocab-exceeds-model", ["eval", "{A}", "--task", "passkey", "--lengths", "64",
                                                *sets("data.tokenizer={S}/tok300.model")],
         "has 300 ids but model.vocab_size=259"),
    Case("eval-max-batches-neg", ["eval", "{A}", "--max-batches", "-1"], "--max-batches"),
    Case("eval-examples-0", ["eval", "{A}", "--task", "passkey", "--examples", "0"], "--examples=0 must be >= 1"),
    Case("eval-length-0", ["eval", "{A}", "--task", "passkey", "--lengths", "0"], "--lengths: length '0' must be >= 1"),
    Case("eval-seg-len-neg", ["eval", "{A}", "--task", "passkey", "--lengths", "64", "--seg-len", "-4"],
         "--seg-len=-4 must be >= 1"),
    Case("eval-unknown-task", ["eval", "{A}", "--task", "sudoku"], "'sudoku'"),
    Case("eval-compare-missing", ["eval", "--compare", "{T}/nowhere"], "no results.json under"),
    Case("eval-compare-and-run", ["eval", "{A}", "--compare", "{A}"], "not both"),
    # ------------------------------------------------------------------ bench
    Case("bench-unknown-model", ["bench", "--models", "gpt5"], "--models 'gpt5'"),
    Case("bench-d-models-abc", ["bench", "--d-models", "abc"], "--d-models: length 'abc' is not a number"),
    Case("bench-d-models-0", ["bench", "--d-models", "0"], "--d-models: length '0' must be >= 1"),
    Case("bench-seg-lens-neg", ["bench", "--seg-lens=-5"], "--seg-lens: length '-5' is not a number"),
    Case("bench-set-unknown", ["bench", *sets("model.nope=1")], "bench --set 'model.nope=1'"),
    Case("bench-layers-0", ["bench", "--d-models", "32", "--seg-lens", "16", "--layers", "0"],
         "--layers=0 must be >= 1"),
    Case("bench-steps-0", ["bench", "--d-models", "32", "--seg-lens", "16", "--steps", "0"], "--steps=0 must be >= 1"),
    Case("bench-tokens-per-step-0", ["bench", "--d-models", "32", "--seg-lens", "16", "--tokens-per-step", "0"],
         "--tokens-per-step=0 must be >= 1"),
    Case("bench-stream-seg-len-0", ["bench", "--d-models", "32", "--seg-lens", "", "--stream-lengths", "64",
                                    "--stream-seg-len", "0"], "--stream-seg-len=0 must be >= 1"),
    Case("bench-json-dir-missing", ["bench", "--d-models", "32", "--seg-lens", "16", "--layers", "1", "--steps", "1",
                                    "--json", "{T}/no/such/dir/bench.json"],
         "bench.json': its directory does not exist"),
]

GENERATE = [
    Case("generate-missing-run", ["generate", "{T}/nowhere", "--prompt-file", "{S}/corpus.txt"],
         "run directory '{T}/nowhere' not found"),
    Case("generate-not-a-run", ["generate", "{S}", "--prompt-file", "{S}/corpus.txt"], "config.json not found"),
    Case("generate-no-prompt-flag", ["generate", "{A}"], "required: --prompt-file"),
    Case("generate-prompt-missing", ["generate", "{A}", "--prompt-file", "{T}/p.txt"], "p.txt' not found"),
    Case("generate-prompt-empty", ["generate", "{A}", "--prompt-file", "{S}/empty.txt"], "is empty"),
    Case("generate-prompt-binary", ["generate", "{A}", "--prompt-file", "{S}/binary.txt"], "is not UTF-8"),
    Case("generate-max-new-tokens-0", ["generate", "{A}", "--prompt-file", "{S}/corpus.txt", "--max-new-tokens", "0"],
         "--max-new-tokens=0 must be >= 1"),
    Case("generate-temperature-neg", ["generate", "{A}", "--prompt-file", "{S}/corpus.txt", "--temperature", "-1"],
         "--temperature=-1.0"),
    Case("generate-top-p-0", ["generate", "{A}", "--prompt-file", "{S}/corpus.txt", "--top-p", "0"], "--top-p=0.0"),
    Case("generate-step-missing", ["generate", "{A}", "--prompt-file", "{S}/corpus.txt", "--step", "99"],
         "no checkpoint for step 99"),
    Case("generate-seg-len-0", ["generate", "{A}", "--prompt-file", "{S}/corpus.txt", "--seg-len", "0"],
         "(--seg-len) 0 must be >= 1"),
    Case("generate-corrupt-config", ["generate", "{T}/run", "--prompt-file", "{S}/corpus.txt"],
         "run/config.json is not valid JSON", setup=_set_config("not json at all")),
]

EXPORT = [
    Case("export-missing-run", ["export", "{T}/nowhere", "--format", "safetensors", "--out", "{T}/x"],
         "nowhere not found"),
    Case("export-not-a-run", ["export", "{S}", "--format", "safetensors", "--out", "{T}/x"], "config.json not found"),
    Case("export-bad-format", ["export", "{A}", "--format", "onnx", "--out", "{T}/x"], "invalid choice: 'onnx'"),
    Case("export-hf-of-transformer", ["export", "{A}", "--format", "hf", "--out", "{T}/x"],
         "--format hf supports models gated_deltanet, griffin, mamba, mamba2, mlstm"),
    Case("export-out-not-empty", ["export", "{A}", "--format", "safetensors", "--out", "{S}"],
         "already exists and is not empty"),
    Case("export-step-missing", ["export", "{A}", "--format", "safetensors", "--out", "{T}/x", "--step", "99"],
         "no checkpoint for step 99"),
    Case("export-corrupt-config", ["export", "{T}/run", "--format", "safetensors", "--out", "{T}/x"],
         "run/config.json is not valid JSON", setup=_set_config("{")),
    Case("export-config-missing-section", ["export", "{T}/run", "--format", "safetensors", "--out", "{T}/x"],
         "run/config.json is not a longctx run config (a config needs the sections",
         setup=_set_config(_without("train"))),
    Case("export-hf-config-bad-value", ["export", "{T}/run", "--format", "hf", "--out", "{T}/x"],
         "run/config.json: model.d_model='big': expected an int", setup=_set_config(_with_model(d_model="big"))),
    Case("init-from-export-bad-config", train("--init-from", "{T}/exp"),
         "exp/config.json: model.d_model='big': expected an int",
         setup=_write("exp/config.json", json.dumps({"format": "longctx", "format_version": 1, "model": {
             "name": "transformer", "d_model": "big"}, "step": 1, "tokenizer": "byte"}))),
]

IMPORT_HF = [
    Case("import-hf-missing-dir", ["import-hf", "{T}/nowhere", "--out", "{T}/x"], "not found"),
    Case("import-hf-no-config", ["import-hf", "{T}", "--out", "{T}/x"], "config.json not found"),
    Case("import-hf-corrupt-config", ["import-hf", "{T}/hf", "--out", "{T}/x"],
         "config.json", setup=_write("hf/config.json", "{\"model_type\": ")),
    Case("import-hf-llama", ["import-hf", "{T}/hf", "--out", "{T}/x"],
         "llama", setup=_write("hf/config.json", json.dumps({"model_type": "llama", "hidden_size": 64}))),
    Case("import-hf-no-weights", ["import-hf", "{T}/hf", "--out", "{T}/x"], "model.safetensors",
         setup=_write("hf/config.json", json.dumps({
             "model_type": "mamba", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 300,
             "state_size": 16, "expand": 2, "conv_kernel": 4}))),
    Case("import-hf-garbage-weights", ["import-hf", "{T}/hf", "--out", "{T}/x"],
         "model.safetensors is not a readable safetensors file",
         setup=lambda d, a: [_write("hf/config.json", json.dumps({
             "model_type": "mamba", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 300,
             "state_size": 16, "expand": 2, "conv_kernel": 4}))(d, a),
             _write("hf/model.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")(d, a)]),
]


def _has_command(name: str) -> bool:
  try:
    cli._parser().parse_args([name, "--help"])
  except SystemExit as e:
    return e.code == 0
  return False


for _name, _cases in (("generate", GENERATE), ("export", EXPORT), ("import-hf", IMPORT_HF)):
  if _has_command(_name):  # other commands join the table once they exist
    CASES += _cases

HOSTILE_CASES = 161  # the README quotes this number


def test_the_table_holds_the_cases_the_readme_counts():
  """The closing summary prints how many cases ran; this asserts the table has them all (a case dropped or
  a command missing from `_has_command` would otherwise only lower the printed count)."""
  assert len({c.id for c in CASES}) == len(CASES) == HOSTILE_CASES, (len(CASES), HOSTILE_CASES)
  assert f"feeds every command {HOSTILE_CASES} such" in (ROOT / "README.md").read_text()


def snapshot(root: pathlib.Path) -> dict[str, str]:
  out = {}
  for p in sorted(root.rglob("*")):
    rel = str(p.relative_to(root))
    if p.is_symlink():
      out[rel] = "link " + os.readlink(p)
    elif p.is_dir():
      out[rel] = "dir"
    else:
      out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
  return out


def _run(args: list[str], capsys) -> tuple[int, str, str, bool]:
  """(exit code, stdout, stderr, crashed): as the console script would end, without leaving the process."""
  crashed = False
  try:
    code = cli.main(args)
  except SystemExit as e:  # argparse, or anything else that exits
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    if isinstance(e.code, str):
      print(e.code, file=sys.stderr)
  except BaseException:  # what the interpreter would print as a traceback
    crashed, code = True, 1
    print(traceback.format_exc(), file=sys.stderr)
  out = capsys.readouterr()
  return code, out.out, out.err, crashed


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input(case, assets, tmp_path, tmp_path_factory, monkeypatch, capfd, caplog):
  if case.setup:
    case.setup(tmp_path, assets)
  for key, value in case.env.items():
    monkeypatch.setenv(key, value)
  sys_tmp = tmp_path / "systmp"
  sys_tmp.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(sys_tmp))
  monkeypatch.setenv("TMPDIR", str(sys_tmp))
  monkeypatch.chdir(tmp_path)
  base = tmp_path_factory.getbasetemp()
  fill = dict(Q=QUICKSTART, S=str(assets), A=str(assets / "A"), T=str(tmp_path))
  args = [a.format(**fill) for a in case.args]
  capfd.readouterr()
  caplog.clear()
  before = snapshot(base)
  code, out, err, crashed = _run(args, capfd)  # capfd: what C++ code writes to fd 2 counts too
  after = snapshot(base)
  # A warning logged through `logging` would be a line on stderr in a real process (pytest captures it here).
  err += "".join(f"{r.levelname}:{r.name}:{r.getMessage()}\n" for r in caplog.records if r.levelno >= logging.WARNING)
  lines = [l for l in err.splitlines() if l.strip()]
  changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
  expect = case.expect.format(**fill)
  result = dict(id=case.id, code=code, line=lines[0] if len(lines) == 1 else err, crashed=crashed or "Traceback" in err,
                clear=len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0] and code == case.code,
                changed=changed)
  assert not result["crashed"], err
  assert not changed, f"files changed: {changed[:10]}"
  assert code == case.code, (code, err)
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  assert expect in lines[0], lines[0]


@pytest.mark.parametrize("case_id", ["data-bad-jsonl", "init-from-other-shapes"])
def test_in_a_real_process(case_id, assets, tmp_path, tmp_path_factory):
  """Two cases whose libraries log (HF datasets, orbax via absl) run as the console script would: still one line."""
  import subprocess

  case = next(c for c in CASES if c.id == case_id)
  fill = dict(Q=QUICKSTART, S=str(assets), A=str(assets / "A"), T=str(tmp_path))
  env = {**os.environ, "TMPDIR": str(tmp_path)}
  env.pop("XLA_FLAGS", None)  # the console script's own environment: one CPU device, as a user has it
  before = snapshot(tmp_path_factory.getbasetemp())
  proc = subprocess.run([sys.executable, "-m", "longctx.cli", *[a.format(**fill) for a in case.args]],
                        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
  assert snapshot(tmp_path_factory.getbasetemp()) == before
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
  assert case.expect.format(**fill) in lines[0], lines[0]
