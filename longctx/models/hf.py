"""Hugging Face interop shared by the models that have a transformers counterpart.

A model with one (Mamba, Mamba-2) sets `hf_model_type` and defines, next to its math:

    hf_config(cfg) -> dict                      the transformers config.json keys of its architecture
    hf_weight_map(cfg) -> [(ours, hf, (to_hf, from_hf)), ...]   every tensor, by our flat and HF's name
    config_from_hf(hf: Mapping) -> its ModelConfig               or a one-line ConfigError

An entry whose `ours` is a tuple of names is one HF tensor fused from several of ours (Qwen3-Next's
in_proj_qkvz): its `to_hf` takes the tuple of our arrays, its `from_hf` returns one.

and `to_hf` / `from_hf` below turn the weights either way through that map. `longctx export --format hf`
and `longctx import-hf` (longctx/export.py) find the model by name and call these.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np

from longctx.errors import CheckpointError, ConfigError

Flat = dict[str, np.ndarray]
Transform = tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]


def _transpose(w: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(w.T)


def _conv_to_hf(w: np.ndarray) -> np.ndarray:
  """`[K, C]` -> torch depthwise Conv1d `[C, 1, K]`."""
  return np.ascontiguousarray(w.T[:, None, :])


def _conv_from_hf(w: np.ndarray) -> np.ndarray:
  if w.ndim != 3 or w.shape[1] != 1:
    raise CheckpointError(f"conv1d.weight has shape {w.shape}, expected a depthwise [channels, 1, K]")
  return np.ascontiguousarray(w[:, 0, :].T)


IDENTITY: Transform = (lambda w: w, lambda w: w)
TRANSPOSE: Transform = (_transpose, _transpose)
CONV: Transform = (_conv_to_hf, _conv_from_hf)  # our [K, C] <-> torch's depthwise Conv1d [C, 1, K]
ONE_PLUS: Transform = (lambda s: s - 1.0, lambda w: w + 1.0)  # our RMSNorm scale <-> Gemma's / Qwen3-Next's 1 + w


def to_hf(model_cls, cfg, flat: Mapping[str, np.ndarray]) -> Flat:
  """Our flat weights -> HF's state dict (numpy); every tensor must be mapped exactly once."""
  pairs = model_cls.hf_weight_map(cfg)
  unmapped = sorted(set(flat) - {name for ours, _, _ in pairs for name in _names(ours)})
  if unmapped:
    raise ConfigError(f"tensor {unmapped[0]} has no Hugging Face {cfg.name} equivalent; export with "
                      "--format safetensors")
  missing = [name for ours, _, _ in pairs for name in _names(ours) if name not in flat]
  if missing:
    raise CheckpointError(f"tensor {missing[0]} is missing from the checkpoint")
  take = lambda ours: (tuple(np.asarray(flat[n]) for n in ours) if isinstance(ours, tuple)
                       else np.asarray(flat[ours]))
  return {hf: np.asarray(to(take(ours))) for ours, hf, (to, _) in pairs}


def _names(ours) -> tuple[str, ...]:
  return ours if isinstance(ours, tuple) else (ours,)


def from_hf(model_cls, cfg, tensors: Mapping[str, np.ndarray], *, optional: Mapping[str, Callable] = (),
            ignored: tuple[str, ...] = ()) -> Flat:
  """HF's state dict -> our flat float32 weights for `cfg`.

  `optional`: HF names that may be absent, with a function `tensors -> our value` for that case; `ignored`:
  HF names to drop (a tied head). Anything else unmapped is a one-line CheckpointError.
  """
  pairs = model_cls.hf_weight_map(cfg)
  optional = dict(optional)
  flat: Flat = {}
  for ours, hf, (_, back) in pairs:
    if hf not in tensors:
      if hf in optional:
        flat[ours] = optional[hf](tensors)
        continue
      raise CheckpointError(f"the Hugging Face weights have no {hf}; is the config right for them?")
    tensor = np.asarray(tensors[hf], np.float32)
    try:
      value = back(tensor)
    except ValueError:  # a reshape that does not fit: the config and the weights disagree
      raise CheckpointError(f"the Hugging Face tensor {hf} has shape {tensor.shape}, which the config's sizes "
                            "do not fit; is the config right for these weights?") from None
    for name, part in (zip(ours, value) if isinstance(ours, tuple) else ((ours, value),)):
      flat[name] = np.ascontiguousarray(part)
  used = {hf for _, hf, _ in pairs} | set(ignored)
  extra = sorted(set(tensors) - used)
  if extra:
    raise CheckpointError(f"the Hugging Face weights hold {len(extra)} tensors longctx {cfg.name} has no place "
                          f"for (first: {extra[0]})")
  return flat


def config_of(cls, values: Mapping):
  """`cls(**values)` without the keys it does not have, validated (a config read from a transformers config)."""
  names = {f.name for f in dataclasses.fields(cls)}
  cfg = cls(**{k: v for k, v in values.items() if k in names})
  cfg.validate()
  return cfg


def hf_float(x: Any) -> float:
  """A float of a transformers config.json (transformers >= 5 writes inf as {"__float__": "Infinity"})."""
  if isinstance(x, dict) and "__float__" in x:
    return float(x["__float__"])
  return float(x)


def require(hf: Mapping, key: str, value: Any, *, kind: str) -> None:
  """A one-line ConfigError unless the transformers config has `key` = `value` (or lacks it)."""
  if hf.get(key, value) != value:
    raise ConfigError(f"Hugging Face config {key}={hf[key]!r} has no longctx {kind} equivalent; "
                      f"longctx needs {key}={value!r}")
