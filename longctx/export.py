"""Checkpoint export and Hugging Face interop.

Two directory formats, each `config.json` + `model.safetensors`:

* **longctx export** (every model; `longctx export RUN --format safetensors`):
  `model.safetensors` holds every parameter under its dotted nnx path
  (`blocks.0.mixer.in_proj`, `embedding.table`, ...) in its stored dtype
  (float32 for trained runs) with our layouts (`[in, out]` matrices), and
  `config.json` is

      {"format": "longctx", "format_version": 1,
       "model": {<the ModelConfig fields, "name" included>},
       "step": N, "tokenizer": "tokenizer.model" | "byte" | null}

  Any framework reads it (safetensors + JSON); no pickles. A run trained with a
  sentencepiece model carries a copy of it as `tokenizer.model` (the same in
  `--format hf` dirs), so an export needs nothing outside its directory.
* **Hugging Face** (`--format hf`, the models with an HF counterpart: `hf_models()`): the directory that
  `transformers.MambaForCausalLM.from_pretrained(DIR)` /
  `Mamba2ForCausalLM` / `xLSTMForCausalLM.from_pretrained(DIR)` load, with HF's names and layouts
  (`[out, in]` linear weights, conv1d `[C, 1, K]`). It computes the same
  logits (tested to < 1e-6 relative in float32). A config HF cannot express is
  refused with a one-line error; nothing that loads but computes differently is
  ever written. `import_hf` reads such a directory (ours or one from the hub,
  `model.safetensors`, a sharded `model.safetensors.index.json`, or
  `pytorch_model.bin` with torch installed) back into a longctx export.

Which models have a Hugging Face counterpart, and how their weights and configs map, lives next to each
model's math (`hf_model_type`, `hf_config`, `hf_weight_map`, `config_from_hf` in models/mamba.py,
models/mamba2.py and models/mlstm.py; the shared machinery in models/hf.py): this module only finds the model by name.

Stable Python API (`longctx train --init-from` builds on `read_export`):

    export_run(run_dir, *, fmt, out, step=None) -> Path     # "safetensors" or "hf"
    import_hf(hf_dir, *, out) -> Path                       # an HF model dir -> longctx export
    read_export(path) -> (ModelConfig, {dotted name: np.ndarray})   # checked against the config
    params_from_flat(flat, *, like) -> pure param dict shaped like `like`
                                       (e.g. the Trainer's `train_state["params"]`)
    load_params_into(model, flat) -> model                  # in place, nnx
    model_from_export(path) -> model                        # build + load
    model_from_flat(cfg, flat) -> model

Every problem (missing run or step, corrupt file, missing / extra /
mis-shaped tensor, a model or option HF cannot express) raises a one-line
`LongctxError` (`CheckpointError` or `ConfigError`).
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Mapping

import numpy as np

from longctx import recipe as recipe_lib
from longctx.config import ModelConfig
from longctx.data.tokenizers import TOKENIZER_FILE, tokenizer_in
from longctx.errors import CheckpointError, ConfigError
from longctx.io.export_dir import (  # noqa: F401  (the stable API above, re-exported)
    export_tokenizer, model_config_from_dict, model_from_export, read_export, read_export_meta,
    tokenizer_to_record, write_export)
from longctx.io.files import CONFIG, WEIGHTS, check_out, read_json, read_safetensors, write_dir
from longctx.io.params import (  # noqa: F401
    Flat, abstract_params, flatten_params, load_params_into, model_from_flat, params_from_flat)
from longctx.io.runs import resolve_checkpoint
from longctx.models import get_model_class, hf, registered

FORMATS = ("safetensors", "hf")


def hf_models() -> dict[str, str]:
  """Registered model name -> transformers model_type, for the models with a Hugging Face counterpart."""
  return {cls.registry_name: cls.hf_model_type for cls in registered() if getattr(cls, "hf_model_type", None)}


# ----------------------------------------------------------------------------- runs


def restore_params(run_dir: str | pathlib.Path, *, step: int | None = None) -> tuple[Any, Flat, int]:
  """A run's saved Config, its parameters at `step` (default: latest) as a flat numpy dict, and the step.

  Only the parameters are read (not the optimizer state), into host memory,
  whatever mesh the run was trained on. `run_dir` may also be `RUN/checkpoints/STEP`.
  """
  from longctx.training.checkpoint import Checkpointer

  run_dir, path_step = resolve_checkpoint(run_dir)
  if step is None:
    step = path_step
  if not run_dir.is_dir():
    raise CheckpointError(f"run directory {run_dir} not found; pass a directory written by `longctx train`")
  saved = read_json(run_dir / "config.json")
  try:
    cfg = recipe_lib.validate(recipe_lib.from_dict(saved))
  except ConfigError as e:  # a missing section, an unknown key, a value of the wrong type
    raise CheckpointError(f"{run_dir / 'config.json'} is not a longctx run config ({e})") from None
  like = abstract_params(cfg.model)
  ckpt = Checkpointer(run_dir / "checkpoints", create=False, async_save=False)
  try:
    step = ckpt.checked_step(step)
    params = ckpt.restore_params(step, like)  # numpy on the host: `like` has no shardings
  finally:
    ckpt.close()
  flat = {k: np.asarray(v) for k, v in flatten_params(params).items()}
  params_from_flat(flat, like=like)  # shapes as the saved config says, or one line naming the tensor
  return cfg, flat, int(step)


def export_run(run_dir: str | pathlib.Path, *, fmt: str, out: str | pathlib.Path,
               step: int | None = None) -> pathlib.Path:
  """Export a run's checkpoint (`step`, default latest) to `out` as `fmt` ("safetensors" or "hf").

  Checks everything it can (format, model support for hf, output dir) before
  restoring, and writes `out` atomically. Returns `out`.
  """
  if fmt not in FORMATS:
    raise ConfigError(f"--format {fmt!r} is not one of {FORMATS}")
  out = pathlib.Path(out)
  check_out(out)
  run, _ = resolve_checkpoint(run_dir)
  if not run.is_dir():
    raise CheckpointError(f"run directory {run} not found; pass a directory written by `longctx train`")
  saved = read_json(run / "config.json")
  model_dict = saved.get("model") or {}
  tokenizer = (saved.get("data") or {}).get("tokenizer")
  if isinstance(tokenizer, str):
    tokenizer = tokenizer_in(run, tokenizer)  # the run dir's own copy
  if fmt == "hf":
    try:
      model_cfg = model_config_from_dict(model_dict)
    except ConfigError as e:
      raise CheckpointError(f"{run / 'config.json'}: {e}") from None
    hf_config(model_cfg)  # refuse early, before restoring
  cfg, flat, step = restore_params(run_dir, step=step)
  if fmt == "safetensors":
    return write_export(out, cfg=cfg.model, flat=flat, step=step, tokenizer=tokenizer)
  return write_hf(out, cfg=cfg.model, flat=flat, tokenizer=tokenizer, step=step)


# ----------------------------------------------------------------------------- Hugging Face


def _hf_class(cfg: ModelConfig) -> type:
  """The model class of `cfg` if it has a Hugging Face counterpart, else a one-line refusal."""
  names = hf_models()
  if cfg.name not in names:
    raise ConfigError(f"--format hf supports models {', '.join(names)} (their transformers counterparts), not "
                      f"{cfg.name!r}; use --format safetensors")
  return get_model_class(cfg.name)


def _hf_tokens(tokenizer: str | None, *, vocab_size: int) -> dict:
  """bos/eos/pad ids of the run's tokenizer that lie in the vocabulary, when it can be loaded here."""
  if not tokenizer:
    return {}
  from longctx.data.tokenizers import load_tokenizer
  from longctx.errors import LongctxError

  try:
    tok = load_tokenizer(tokenizer)
  except (LongctxError, OSError):
    return {}
  ids = {"bos_token_id": int(tok.bos_id), "eos_token_id": int(tok.eos_id), "pad_token_id": int(tok.pad_id)}
  return {k: v for k, v in ids.items() if 0 <= v < vocab_size}


def hf_config(cfg: ModelConfig, *, tokenizer: str | None = None, step: int | None = None) -> dict:
  """The transformers `config.json` of a longctx config (the model's own keys, the run's longctx config and
  tokenizer ids), or a one-line refusal."""
  model_cls = _hf_class(cfg)
  if cfg.embed_conv:  # the shell's token conv has no transformers equivalent
    raise ConfigError(f"model.embed_conv={cfg.embed_conv} has no Hugging Face {cfg.name} equivalent; "
                      "HF needs model.embed_conv=0")
  return {**model_cls.hf_config(cfg), "longctx": {"model": dataclasses.asdict(cfg), "step": step,
                                                  "tokenizer": tokenizer},
          **_hf_tokens(tokenizer, vocab_size=cfg.vocab_size)}


def to_hf(cfg: ModelConfig, flat: Mapping[str, np.ndarray]) -> Flat:
  """Our flat weights -> HF's state dict (numpy); every tensor must be mapped exactly once."""
  hf_config(cfg)
  return hf.to_hf(_hf_class(cfg), cfg, flat)


def write_hf(out: str | pathlib.Path, *, cfg: ModelConfig, flat: Flat, tokenizer: str | None = None,
             step: int | None = None) -> pathlib.Path:
  """Write a transformers model directory (atomically); a sentencepiece `tokenizer` goes in as
  tokenizer.model, and its BOS/EOS/PAD ids into config.json."""
  recorded, copy = tokenizer_to_record(tokenizer)
  config = hf_config(cfg, tokenizer=recorded, step=step)
  config.update(_hf_tokens(copy or recorded, vocab_size=cfg.vocab_size))
  tensors = {k: v.astype(np.float32) if v.dtype != np.float32 else v for k, v in to_hf(cfg, flat).items()}
  return write_dir(pathlib.Path(out), config=config, tensors=tensors, metadata={"format": "pt"}, tokenizer_file=copy)


def config_from_hf(hf_cfg: Mapping) -> ModelConfig:
  """A longctx config from a transformers config.json (by its model_type), or a one-line refusal."""
  by_type = {kind: name for name, kind in hf_models().items()}
  kind = hf_cfg.get("model_type")
  if kind not in by_type:
    raise ConfigError(f"model_type={kind!r}: import-hf reads transformers models of type {', '.join(by_type)}")
  return get_model_class(by_type[kind]).config_from_hf(hf_cfg)


def from_hf(cfg: ModelConfig, tensors: Mapping[str, np.ndarray], *, use_conv_bias: bool = True) -> Flat:
  """HF's state dict -> our flat float32 weights for `cfg` (a tied `lm_head.weight` is dropped)."""
  tensors = {k.replace("backbone.embedding.", "backbone.embeddings."): v for k, v in tensors.items()}
  model_cls = _hf_class(cfg)
  optional = {}
  if not use_conv_bias:  # no conv bias in the checkpoint: ours is zeros
    for _, name, _ in model_cls.hf_weight_map(cfg):
      if name.endswith("conv1d.bias"):
        weight = name.replace(".bias", ".weight")
        optional[name] = lambda t, w=weight: np.zeros((t[w].shape[0] if w in t else 0,), np.float32)
  return hf.from_hf(model_cls, cfg, tensors, optional=optional,
                    ignored=("lm_head.weight",) if cfg.tie_embeddings else ())


def read_hf_weights(hf_dir: pathlib.Path) -> Flat:
  """model.safetensors, a sharded model.safetensors.index.json, or pytorch_model.bin (needs torch)."""
  single, index, pickle = hf_dir / WEIGHTS, hf_dir / "model.safetensors.index.json", hf_dir / "pytorch_model.bin"
  if single.is_file():
    return read_safetensors(single)
  if index.is_file():
    shards = sorted(set((read_json(index).get("weight_map") or {}).values()))
    if not shards:
      raise CheckpointError(f"{index} has no weight_map")
    out: Flat = {}
    for shard in shards:
      out.update(read_safetensors(hf_dir / shard))
    return out
  if pickle.is_file():
    try:
      import torch
    except ImportError:
      raise ConfigError(f"{pickle} is a torch pickle: install torch (pip install -e \".[hf]\") to read it, "
                        "or convert it to model.safetensors") from None
    try:
      state = torch.load(str(pickle), map_location="cpu", weights_only=True)
    except Exception as e:
      msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
      raise CheckpointError(f"{pickle} could not be read ({msg})") from None
    return {k: v.detach().to(torch.float32).numpy() for k, v in state.items()}
  raise CheckpointError(f"{hf_dir} has no {WEIGHTS}, model.safetensors.index.json or pytorch_model.bin")


def import_hf(hf_dir: str | pathlib.Path, *, out: str | pathlib.Path) -> pathlib.Path:
  """Read a transformers model directory (of a model in `hf_models()`) and write it as a longctx export at `out`."""
  hf_dir = pathlib.Path(hf_dir)
  if not hf_dir.is_dir():
    raise CheckpointError(f"Hugging Face model directory {hf_dir} not found (download it first, e.g. "
                          "huggingface-cli download state-spaces/mamba-130m-hf --local-dir DIR)")
  out = pathlib.Path(out)
  check_out(out)
  hf_cfg = read_json(hf_dir / CONFIG)
  cfg = config_from_hf(hf_cfg)
  flat = from_hf(cfg, read_hf_weights(hf_dir), use_conv_bias=bool(hf_cfg.get("use_conv_bias", True)))
  meta = hf_cfg.get("longctx") or {}
  tokenizer = meta.get("tokenizer")
  if tokenizer == TOKENIZER_FILE:  # a longctx hf export carries its sentencepiece model
    tokenizer = str(hf_dir / TOKENIZER_FILE) if (hf_dir / TOKENIZER_FILE).is_file() else None
  return write_export(out, cfg=cfg, flat=flat, step=meta.get("step"), tokenizer=tokenizer)
