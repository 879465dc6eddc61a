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
* **Hugging Face** (`--format hf`, mamba and mamba2 only): the directory that
  `transformers.MambaForCausalLM.from_pretrained(DIR)` /
  `Mamba2ForCausalLM.from_pretrained(DIR)` load, with HF's names and layouts
  (`[out, in]` linear weights, conv1d `[C, 1, K]`). It computes the same
  logits (tested to < 1e-6 relative in float32). A config HF cannot express is
  refused with a one-line error; nothing that loads but computes differently is
  ever written. `import_hf` reads such a directory (ours or one from the hub,
  `model.safetensors`, a sharded `model.safetensors.index.json`, or
  `pytorch_model.bin` with torch installed) back into a longctx export.

Weight map (ours -> HF, per layer `i`; `T` = transposed):

    embedding.table               backbone.embeddings.weight
    embedding.head (untied)       lm_head.weight (T); tied: tie_word_embeddings=true, no lm_head
    final_norm.scale              backbone.norm_f.weight
    blocks.i.norm.scale           backbone.layers.i.norm.weight
    blocks.i.mixer.in_proj        ...mixer.in_proj.weight (T)      Mamba-2 columns z | x B C | dt
    blocks.i.mixer.conv_weight    ...mixer.conv1d.weight [C, 1, K] (w.T[:, None, :])
    blocks.i.mixer.conv_bias      ...mixer.conv1d.bias
    blocks.i.mixer.x_proj         ...mixer.x_proj.weight (T)       Mamba only
    blocks.i.mixer.dt_proj        ...mixer.dt_proj.weight (T)      Mamba only
    blocks.i.mixer.dt_bias        ...mixer.dt_proj.bias (Mamba), ...mixer.dt_bias (Mamba-2)
    blocks.i.mixer.A_log, D       ...mixer.A_log, ...mixer.D
    blocks.i.mixer.norm           ...mixer.norm.weight             Mamba-2 gated RMSNorm
    blocks.i.mixer.out_proj       ...mixer.out_proj.weight (T)

Stable Python API (`longctx train --init-from` builds on `read_export`):

    export_run(run_dir, *, fmt, out, step=None) -> Path     # "safetensors" or "hf"
    import_hf(hf_dir, *, out) -> Path                       # HF Mamba / Mamba-2 dir -> longctx export
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
import math
import pathlib
from typing import Any, Callable, Mapping

import numpy as np

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

FORMATS = ("safetensors", "hf")
HF_MODELS = ("mamba", "mamba2")


# ----------------------------------------------------------------------------- runs


def restore_params(run_dir: str | pathlib.Path, *, step: int | None = None) -> tuple[Any, Flat, int]:
  """A run's saved Config, its parameters at `step` (default: latest) as a flat numpy dict, and the step.

  Only the parameters are read (not the optimizer state), into host memory,
  whatever mesh the run was trained on. `run_dir` may also be `RUN/checkpoints/STEP`.
  """
  from longctx import config as config_lib
  from longctx.training.checkpoint import Checkpointer

  run_dir, path_step = resolve_checkpoint(run_dir)
  if step is None:
    step = path_step
  if not run_dir.is_dir():
    raise CheckpointError(f"run directory {run_dir} not found; pass a directory written by `longctx train`")
  saved = read_json(run_dir / "config.json")
  try:
    cfg = config_lib.from_dict(saved).validate()
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


def _transpose(w: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(w.T)


def _conv_to_hf(w: np.ndarray) -> np.ndarray:
  """`[K, C]` -> torch depthwise Conv1d `[C, 1, K]`."""
  return np.ascontiguousarray(w.T[:, None, :])


def _conv_from_hf(w: np.ndarray) -> np.ndarray:
  if w.ndim != 3 or w.shape[1] != 1:
    raise CheckpointError(f"conv1d.weight has shape {w.shape}, expected a depthwise [channels, 1, K]")
  return np.ascontiguousarray(w[:, 0, :].T)


_IDENTITY = (lambda w: w, lambda w: w)
_T = (_transpose, _transpose)
_CONV = (_conv_to_hf, _conv_from_hf)

# (ours, HF, (to_hf, from_hf)) of one mixer, under blocks.i.mixer. / backbone.layers.i.mixer.
_MIXER_MAPS = {
    "mamba": [("in_proj", "in_proj.weight", _T), ("conv_weight", "conv1d.weight", _CONV),
              ("conv_bias", "conv1d.bias", _IDENTITY), ("x_proj", "x_proj.weight", _T),
              ("dt_proj", "dt_proj.weight", _T), ("dt_bias", "dt_proj.bias", _IDENTITY),
              ("A_log", "A_log", _IDENTITY), ("D", "D", _IDENTITY), ("out_proj", "out_proj.weight", _T)],
    "mamba2": [("in_proj", "in_proj.weight", _T), ("conv_weight", "conv1d.weight", _CONV),
               ("conv_bias", "conv1d.bias", _IDENTITY), ("dt_bias", "dt_bias", _IDENTITY),
               ("A_log", "A_log", _IDENTITY), ("D", "D", _IDENTITY), ("norm", "norm.weight", _IDENTITY),
               ("out_proj", "out_proj.weight", _T)],
}


def weight_map(cfg: ModelConfig) -> list[tuple[str, str, tuple[Callable, Callable]]]:
  """Every (our name, HF name, (to_hf, from_hf)) of a Mamba / Mamba-2 config."""
  pairs = [("embedding.table", "backbone.embeddings.weight", _IDENTITY),
           ("final_norm.scale", "backbone.norm_f.weight", _IDENTITY)]
  if not cfg.tie_embeddings:
    pairs.append(("embedding.head", "lm_head.weight", _T))
  for i in range(cfg.num_layers):
    pairs.append((f"blocks.{i}.norm.scale", f"backbone.layers.{i}.norm.weight", _IDENTITY))
    pairs += [(f"blocks.{i}.mixer.{ours}", f"backbone.layers.{i}.mixer.{hf}", fns)
              for ours, hf, fns in _MIXER_MAPS[cfg.name]]
  return pairs


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
  """The transformers `config.json` of a longctx Mamba / Mamba-2 config, or a one-line refusal.

  `time_step_*` and `rescale_prenorm_residual` only steer HF's initialisation;
  `residual_in_fp32` (HF keeps the residual stream in float32) changes nothing
  for the float32 weights written here.
  """
  if cfg.name not in HF_MODELS:
    raise ConfigError(f"--format hf supports models {', '.join(HF_MODELS)} (transformers MambaForCausalLM / "
                      f"Mamba2ForCausalLM), not {cfg.name!r}; use --format safetensors")
  for option, needed in (("embed_conv", 0),):  # options our shared layers have and HF's Mamba lacks
    if getattr(cfg, option, needed) != needed:
      raise ConfigError(f"model.{option}={getattr(cfg, option)} has no Hugging Face {cfg.name} equivalent; "
                        f"HF needs model.{option}={needed}")
  common = {
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.num_layers,
      "state_size": cfg.state_size, "expand": cfg.expand, "conv_kernel": cfg.conv_kernel,
      "layer_norm_epsilon": cfg.norm_eps, "use_bias": False, "use_conv_bias": True, "hidden_act": "silu",
      "residual_in_fp32": True, "time_step_min": cfg.dt_min, "time_step_max": cfg.dt_max,
      "time_step_floor": 1e-4, "rescale_prenorm_residual": False, "initializer_range": 0.1, "use_cache": True,
      "tie_word_embeddings": bool(cfg.tie_embeddings), "dtype": "float32",
      "longctx": {"model": dataclasses.asdict(cfg), "step": step, "tokenizer": tokenizer},
      **_hf_tokens(tokenizer, vocab_size=cfg.vocab_size),
  }
  if cfg.name == "mamba":
    return {"architectures": ["MambaForCausalLM"], "model_type": "mamba", **common,
            "intermediate_size": cfg.d_inner, "time_step_rank": cfg.resolved_dt_rank, "time_step_scale": 1.0,
            "time_step_init_scheme": "random", "use_mambapy": False}
  return {"architectures": ["Mamba2ForCausalLM"], "model_type": "mamba2", **common,
          "num_heads": cfg.resolved_num_heads, "head_dim": cfg.head_dim, "n_groups": cfg.num_groups,
          "chunk_size": cfg.chunk_size, "time_step_rank": math.ceil(cfg.d_model / 16)}


def to_hf(cfg: ModelConfig, flat: Mapping[str, np.ndarray]) -> Flat:
  """Our flat weights -> HF's state dict (numpy); every tensor must be mapped exactly once."""
  hf_config(cfg)
  pairs = weight_map(cfg)
  unmapped = sorted(set(flat) - {ours for ours, _, _ in pairs})
  if unmapped:
    raise ConfigError(f"tensor {unmapped[0]} has no Hugging Face {cfg.name} equivalent; export with "
                      "--format safetensors")
  missing = [ours for ours, _, _ in pairs if ours not in flat]
  if missing:
    raise CheckpointError(f"tensor {missing[0]} is missing from the checkpoint")
  return {hf: np.asarray(to(np.asarray(flat[ours]))) for ours, hf, (to, _) in pairs}


def write_hf(out: str | pathlib.Path, *, cfg: ModelConfig, flat: Flat, tokenizer: str | None = None,
             step: int | None = None) -> pathlib.Path:
  """Write a transformers Mamba / Mamba-2 directory (atomically); a sentencepiece `tokenizer` goes in as
  tokenizer.model, and its BOS/EOS/PAD ids into config.json."""
  recorded, copy = tokenizer_to_record(tokenizer)
  config = hf_config(cfg, tokenizer=recorded, step=step)
  config.update(_hf_tokens(copy or recorded, vocab_size=cfg.vocab_size))
  tensors = {k: v.astype(np.float32) if v.dtype != np.float32 else v for k, v in to_hf(cfg, flat).items()}
  return write_dir(pathlib.Path(out), config=config, tensors=tensors, metadata={"format": "pt"}, tokenizer_file=copy)


def _float(x) -> float:
  if isinstance(x, dict) and "__float__" in x:  # transformers >= 5 writes inf as {"__float__": "Infinity"}
    return float(x["__float__"])
  return float(x)


def config_from_hf(hf: Mapping) -> ModelConfig:
  """A longctx Mamba / Mamba-2 config from a transformers config.json, or a one-line refusal."""
  from longctx.models import Mamba2Config, MambaConfig

  kind = hf.get("model_type")
  if kind not in HF_MODELS:
    raise ConfigError(f"model_type={kind!r}: import-hf reads transformers models of type "
                      f"{', '.join(HF_MODELS)} (MambaForCausalLM / Mamba2ForCausalLM)")

  def need(key: str, value) -> None:
    if hf.get(key, value) != value:
      raise ConfigError(f"Hugging Face config {key}={hf[key]!r} has no longctx {kind} equivalent; "
                        f"longctx needs {key}={value!r}")

  need("use_bias", False)
  need("hidden_act", "silu")
  try:
    if kind == "mamba2":
      limit = [_float(x) for x in hf.get("time_step_limit", (0.0, math.inf))]
      if limit != [0.0, math.inf]:
        raise ConfigError(f"Hugging Face config time_step_limit={limit} clamps the time step, which longctx "
                          "mamba2 does not; it needs time_step_limit=[0.0, inf]")
    saved = (hf.get("longctx") or {}).get("model") or {}
    base = dict(saved) if saved.get("name") == kind else {"name": kind}
    arch = {"vocab_size": int(hf["vocab_size"]), "d_model": int(hf["hidden_size"]),
            "num_layers": int(hf["num_hidden_layers"]), "state_size": int(hf["state_size"]),
            "expand": int(hf.get("expand", 2)), "conv_kernel": int(hf.get("conv_kernel", 4)),
            "norm_eps": float(hf.get("layer_norm_epsilon", 1e-5)),
            "tie_embeddings": bool(hf.get("tie_word_embeddings", kind == "mamba")),
            "dt_min": float(hf.get("time_step_min", 0.001)), "dt_max": float(hf.get("time_step_max", 0.1))}
    if int(hf["hidden_size"]) * arch["expand"] != int(hf.get("intermediate_size", arch["d_model"] * arch["expand"])):
      raise ConfigError(f"Hugging Face config intermediate_size={hf['intermediate_size']} is not expand x "
                        "hidden_size, which longctx needs")
    if kind == "mamba":
      auto = math.ceil(arch["d_model"] / 16)
      rank = hf.get("time_step_rank", "auto")
      rank = auto if rank == "auto" else int(rank)
      arch["dt_rank"] = rank if rank != auto or base.get("dt_rank") == rank else 0  # 0 = derived, our default
      cls = MambaConfig
    else:
      heads, head_dim = int(hf["num_heads"]), int(hf["head_dim"])
      derived = arch["expand"] * arch["d_model"] // head_dim
      arch.update(num_heads=heads if heads != derived or base.get("num_heads") == heads else 0, head_dim=head_dim,
                  num_groups=int(hf.get("n_groups", 8)))
      cls = Mamba2Config
  except (KeyError, TypeError, ValueError) as e:
    raise ConfigError(f"Hugging Face config is missing or has a bad {e}; expected a transformers "
                      f"{kind} config.json") from None
  values = {**base, **arch}
  unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
  for key in unknown:
    values.pop(key)
  cfg = cls(**values)
  cfg.validate()
  return cfg


def from_hf(cfg: ModelConfig, tensors: Mapping[str, np.ndarray], *, use_conv_bias: bool = True) -> Flat:
  """HF's state dict -> our flat float32 weights for `cfg` (tied `lm_head.weight` is dropped)."""
  tensors = {k.replace("backbone.embedding.", "backbone.embeddings."): v for k, v in tensors.items()}
  pairs = weight_map(cfg)
  flat: Flat = {}
  for ours, hf, (_, back) in pairs:
    if hf not in tensors:
      if hf.endswith("conv1d.bias") and not use_conv_bias:
        conv = tensors.get(hf.replace(".bias", ".weight"))
        flat[ours] = np.zeros((0 if conv is None else conv.shape[0],), np.float32)
        continue
      raise CheckpointError(f"the Hugging Face weights have no {hf}; is the config right for them?")
    flat[ours] = np.asarray(back(np.asarray(tensors[hf], np.float32)))
  used = {hf for _, hf, _ in pairs} | ({"lm_head.weight"} if cfg.tie_embeddings else set())
  extra = sorted(set(tensors) - used)
  if extra:
    raise CheckpointError(f"the Hugging Face weights hold {len(extra)} tensors longctx {cfg.name} has no place "
                          f"for (first: {extra[0]})")
  return flat


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
  """Read a transformers Mamba / Mamba-2 directory and write it as a longctx export at `out`."""
  hf_dir = pathlib.Path(hf_dir)
  if not hf_dir.is_dir():
    raise CheckpointError(f"Hugging Face model directory {hf_dir} not found (download it first, e.g. "
                          "huggingface-cli download state-spaces/mamba-130m-hf --local-dir DIR)")
  out = pathlib.Path(out)
  check_out(out)
  hf = read_json(hf_dir / CONFIG)
  cfg = config_from_hf(hf)
  flat = from_hf(cfg, read_hf_weights(hf_dir), use_conv_bias=bool(hf.get("use_conv_bias", True)))
  meta = hf.get("longctx") or {}
  tokenizer = meta.get("tokenizer")
  if tokenizer == TOKENIZER_FILE:  # a longctx hf export carries its sentencepiece model
    tokenizer = str(hf_dir / TOKENIZER_FILE) if (hf_dir / TOKENIZER_FILE).is_file() else None
  return write_export(out, cfg=cfg, flat=flat, step=meta.get("step"), tokenizer=tokenizer)
