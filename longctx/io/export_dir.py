"""The longctx export directory: `config.json` (format, model config, step, tokenizer) + `model.safetensors`
(every parameter under its flat name), and a sentencepiece `tokenizer.model` when the run had one.
`longctx/export.py` writes it from a run and converts it to and from Hugging Face's formats."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Mapping

import numpy as np

from longctx import recipe as recipe_lib
from longctx.config import ModelConfig, section_from_dict
from longctx.data.tokenizers import TOKENIZER_FILE
from longctx.errors import CheckpointError, ConfigError
from longctx.io.files import CONFIG, WEIGHTS, read_json, read_safetensors, write_dir
from longctx.io.params import Flat, abstract_params, model_from_flat, params_from_flat
from longctx.models import get_model_class

FORMAT = "longctx"
FORMAT_VERSION = 1


def tokenizer_to_record(spec: str | None) -> tuple[str | None, str | None]:
  """(the "tokenizer" an export's config.json records, the file to copy into it): "byte" stays "byte", a
  sentencepiece model is copied in as tokenizer.model (as Hugging Face model dirs carry theirs), so the
  export needs nothing outside it; None when the run recorded none or its file is not found."""
  if spec in (None, "", "byte"):
    return spec or None, None
  if pathlib.Path(spec).is_file():
    return TOKENIZER_FILE, spec
  return None, None


def export_tokenizer(path: str | pathlib.Path) -> str | None:
  """The tokenizer of a longctx export dir: "byte", the path of its tokenizer.model, or None."""
  path = pathlib.Path(path)
  meta = read_export_meta(path)
  spec = meta.get("tokenizer")
  if spec == TOKENIZER_FILE:
    return str(((path.parent if path.is_file() else path) / TOKENIZER_FILE).absolute())
  return spec if spec == "byte" else None


def model_config_from_dict(values: Mapping) -> ModelConfig:
  """A validated ModelConfig from its dict (`"name"` picks the registered config class)."""
  if not isinstance(values, Mapping) or "name" not in values:
    raise CheckpointError("the model config has no 'name'; expected the dict of a longctx ModelConfig")
  cls = get_model_class(values["name"]).config_class
  names = {f.name for f in dataclasses.fields(cls)}
  recipe_lib.check_not_legacy(values)
  unknown = sorted(set(values) - names)
  if unknown:
    raise ConfigError(f"unknown model config key {unknown[0]!r} for model {values['name']!r}; "
                      f"valid keys: {', '.join(sorted(names))}")
  cfg = section_from_dict(cls, dict(values), "model")  # a value of the wrong type: one line, not a TypeError
  cfg.validate()
  return cfg



def export_config(cfg: ModelConfig, *, step: int | None, tokenizer: str | None) -> dict:
  return {"format": FORMAT, "format_version": FORMAT_VERSION, "model": dataclasses.asdict(cfg), "step": step,
          "tokenizer": tokenizer}


def write_export(out: str | pathlib.Path, *, cfg: ModelConfig, flat: Flat, step: int | None,
                 tokenizer: str | None) -> pathlib.Path:
  """Write a longctx export dir (atomically) after checking `flat` fits `cfg`. `tokenizer`: "byte", the path
  of a sentencepiece model (copied in as tokenizer.model), or None."""
  params_from_flat(flat, like=abstract_params(cfg))
  recorded, copy = tokenizer_to_record(tokenizer)
  return write_dir(pathlib.Path(out), config=export_config(cfg, step=step, tokenizer=recorded),
                tensors={k: np.asarray(v) for k, v in flat.items()}, metadata={"format": FORMAT}, tokenizer_file=copy)


def read_export(path: str | pathlib.Path) -> tuple[ModelConfig, Flat]:
  """Read a longctx export dir (or its model.safetensors): the model config and its flat weights.

  The weights are checked against the config (every tensor present, none extra,
  shapes right), so `params_from_flat(flat, like=...)` of a model built from
  the returned config cannot fail.
  """
  path = pathlib.Path(path)
  if path.is_file() and path.name == WEIGHTS:
    path = path.parent
  if not path.is_dir():
    raise CheckpointError(f"export directory {path} not found; write one with `longctx export RUN --format "
                          "safetensors --out DIR` or `longctx import-hf HF_DIR --out DIR`")
  meta = read_json(path / CONFIG)
  if meta.get("format") != FORMAT:
    hint = ""
    if "model_type" in meta:
      hint = f"; it looks like a Hugging Face model: run `longctx import-hf {path} --out DIR` first"
    elif "train" in meta:
      hint = f"; it looks like a run dir: run `longctx export {path} --format safetensors --out DIR` first"
    raise CheckpointError(f"{path / CONFIG} is not a longctx export (format={meta.get('format')!r}){hint}")
  version = meta.get("format_version", 0)
  if not isinstance(version, int) or version > FORMAT_VERSION:
    raise CheckpointError(f"{path} has export format_version {version!r}; this longctx reads versions up to "
                          f"{FORMAT_VERSION}: upgrade longctx")
  try:
    cfg = model_config_from_dict(meta.get("model"))
  except ConfigError as e:
    raise CheckpointError(f"{path / CONFIG}: {e}") from None
  flat = read_safetensors(path / WEIGHTS)
  params_from_flat(flat, like=abstract_params(cfg))
  return cfg, flat


def read_export_meta(path: str | pathlib.Path) -> dict:
  """The config.json of a longctx export (format, model, step, tokenizer)."""
  path = pathlib.Path(path)
  return read_json((path.parent if path.is_file() else path) / CONFIG)


def model_from_export(path: str | pathlib.Path):
  """Build the exported model with its weights (float32 as stored); returns the nnx model."""
  cfg, flat = read_export(path)
  return model_from_flat(cfg, flat)
