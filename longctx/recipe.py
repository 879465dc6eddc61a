"""A run's whole config: loading a recipe, reading a saved config, and the checks across its sections.

Above the models and the data (it asks the model registry and the curriculum), below training, eval and
the CLI. `longctx/config.py` holds the dataclasses and the typed overrides.

A recipe is a Python file whose `config()` returns a `Config`. A recipe may take arguments, in the
style of big_vision's `get_config(arg)`: `longctx train recipes/finetune.py:model=rmt,dataset=arxiv`
calls `config(model="rmt", dataset="arxiv")`, each value converted to the parameter's annotated type
(int, float, bool; str otherwise). An unknown argument is a one-line error listing the recipe's.
"""

from __future__ import annotations

import importlib.util
import inspect
import pathlib
import sys
import traceback
import typing
from typing import Any, Mapping

from longctx import config as config_lib
from longctx.config import Config, DataConfig, MeshConfig, TrainConfig, section_from_dict
from longctx.data.curriculum import parse_stages
from longctx.errors import ConfigError
from longctx.models import get_model_class


def validate(cfg: Config) -> Config:
  """Check a whole config: value types, the model config's class against the registry, each section, the
  curriculum's stages. Returns `cfg`; a one-line ConfigError naming the key otherwise."""
  cls = get_model_class(cfg.model.name)
  if type(cfg.model) is not cls.config_class:
    raise ConfigError(f"model.name={cfg.model.name!r} needs a {cls.config_class.__name__}, got "
                      f"{type(cfg.model).__name__}")
  cfg.check_types()
  cfg.model.validate()
  cfg.data.validate()
  cfg.train.validate()
  cfg.mesh.validate()
  if cfg.train.curriculum:
    parse_stages(cfg)
  return cfg


# Model settings of longctx 0.1 that 0.2's model shell replaced: a config holding one was written by 0.1,
# whose parameter names and state layout differ too.
LEGACY_MODEL_KEYS = {"attention_impl": "model.kernel", "scan_impl": "model.scan and model.kernel",
                     "ssd_impl": "model.kernel", "retention_impl": "model.retention and model.kernel"}


def from_dict(d: Any) -> Config:
  """Inverse of `config.to_dict` (the model section picks its registered config class).

  Raises ConfigError (one line) for anything `to_dict` could not have written: a missing or unknown section
  or key, or a value of the wrong type.
  """
  sections = {"model": None, "data": DataConfig, "train": TrainConfig, "mesh": MeshConfig}
  if not isinstance(d, dict):
    raise ConfigError(f"a config must be a JSON object with sections {', '.join(sections)}; got a "
                      f"{type(d).__name__}")
  missing = [name for name in sections if not isinstance(d.get(name), dict)]
  unknown = sorted(set(d) - set(sections))
  if missing or unknown:
    raise ConfigError(f"a config needs the sections {', '.join(sections)} (objects); "
                      + (f"missing: {', '.join(missing)}" if missing else f"unknown: {', '.join(unknown)}"))
  check_not_legacy(d["model"])
  sections["model"] = model_config_class(d["model"])
  return Config(**{section: section_from_dict(cls, d[section], section) for section, cls in sections.items()})


def check_not_legacy(model: Mapping) -> None:
  """A one-line ConfigError for a model section written by longctx 0.1 (`LEGACY_MODEL_KEYS`)."""
  legacy = sorted(set(model) & set(LEGACY_MODEL_KEYS))
  if legacy:
    raise ConfigError(f"model.{legacy[0]} is a setting of longctx 0.1 (0.2 has {LEGACY_MODEL_KEYS[legacy[0]]}): this "
                      "config was written by longctx 0.1, whose parameter names and state layout differ; train "
                      "again with this version (README, 'Upgrading from 0.1')")


def model_config_class(model: Mapping) -> type:
  """The registered config class of a saved model section (by its `name`)."""
  name = model.get("name", "")
  if not isinstance(name, str):
    raise ConfigError(f"model.name={name!r}: expected a model name (a string)")
  return get_model_class(name).config_class


def check_layout(cfg: Config, mesh_shape: Mapping[str, int]) -> None:
  """The lanes split over the data shards and the segments over the sequence axis and the model's blocks;
  a one-line ConfigError otherwise. Checked by the trainer and by a dry run (on the mesh it plans for)."""
  d = cfg.data
  shards = mesh_shape["data"] * mesh_shape["fsdp"]
  if d.batch_size % shards:
    raise ConfigError(
        f"data.batch_size={d.batch_size} lanes cannot be split over {shards} data-parallel shards "
        f"(mesh data x fsdp); use a multiple of {shards}")
  if d.seg_len % mesh_shape["sequence"]:
    raise ConfigError(f"data.seg_len={d.seg_len} is not divisible by mesh.sequence={mesh_shape['sequence']}")
  multiple = get_model_class(cfg.model.name).segment_multiple(cfg.model)
  if d.seg_len % multiple:
    raise ConfigError(f"data.seg_len={d.seg_len} must be a multiple of {multiple}: model {cfg.model.name} reads "
                      f"whole blocks of model.block_len={multiple} tokens")


# ----------------------------------------------------------------------------- recipes


def split_recipe_arguments(spec: str | pathlib.Path) -> tuple[pathlib.Path, dict[str, str]]:
  """`"recipes/x.py:a=1,b=two"` -> (path, {"a": "1", "b": "two"}); a plain path has no arguments."""
  spec = str(spec)
  path, sep, args = spec.partition(".py:")
  if not sep:
    return pathlib.Path(spec), {}
  out = {}
  for item in filter(None, (a.strip() for a in args.split(","))):
    key, eq, value = item.partition("=")
    if not eq or not key.strip():
      raise ConfigError(f"recipe argument {item!r} in {spec!r} is not key=value (e.g. {path}.py:model=rmt)")
    out[key.strip()] = value.strip()
  return pathlib.Path(path + ".py"), out


def load_recipe(spec: str | pathlib.Path, **arguments: Any) -> Config:
  """Import a recipe file (`path.py` or `path.py:key=value,...`) and return its `config(**arguments)`.

  The config is not validated (overrides usually follow; see `validate`).
  """
  path, from_spec = split_recipe_arguments(spec)
  if not path.is_file():
    raise ConfigError(f"recipe file {str(path)!r} not found; pass a path like recipes/quickstart.py")
  if path.suffix != ".py":
    raise ConfigError(f"recipe file {str(path)!r} is not a .py file; a recipe is Python code defining config(), "
                      "like recipes/quickstart.py")
  module_name = f"longctx_recipe_{path.stem}"
  spec_ = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(spec_)
  # As for a script, the recipe's own directory is importable: recipes share settings through
  # sibling modules whose names start with "_" (e.g. recipes/synthetic/_recall.py).
  sys.path.insert(0, str(path.resolve().parent))
  # Loading a recipe writes nothing (no __pycache__ beside it): a dry run or a rejected config leaves no trace.
  dont_write_bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True
  try:
    spec_.loader.exec_module(module)
    if not callable(getattr(module, "config", None)):
      raise ConfigError(f"recipe {path} defines no config() function returning a longctx Config"
                        + (f" (its config is a {type(module.config).__name__})" if hasattr(module, "config") else ""))
    kwargs = _recipe_arguments(module.config, path, {**from_spec, **arguments})
    cfg = module.config(**kwargs)
  except ConfigError:
    raise
  except (Exception, SystemExit) as e:  # a recipe that raises or exits: name the file, line and error, in one line
    frame = _last_frame_in(e, path)
    line = e.lineno if isinstance(e, SyntaxError) and _same_file(e.filename, path) else frame.lineno if frame else None
    where = f"{path}:{line}" if line else str(path)
    text = (e.msg if isinstance(e, SyntaxError) else "" if isinstance(e, SystemExit) and e.code is None
            else str(e)).strip().splitlines()
    raise ConfigError(f"recipe {where} raised {type(e).__name__}" + (f": {text[0]}" if text else "")) from None
  finally:
    sys.dont_write_bytecode = dont_write_bytecode
    sys.path.remove(str(path.resolve().parent))
  if not isinstance(cfg, Config):
    raise ConfigError(f"recipe {path}: config() returned {type(cfg).__name__}, expected longctx.config.Config")
  return cfg


def _recipe_arguments(fn, path: pathlib.Path, given: Mapping[str, Any]) -> dict:
  """`given` (strings from the command line, or values) as keyword arguments of the recipe's `config`."""
  params = inspect.signature(fn).parameters
  names = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
  required = [n for n in names if params[n].default is inspect.Parameter.empty]
  usage = ", ".join(f"{n}=..." for n in names) or "none"
  unknown = sorted(set(given) - set(names))
  if unknown:
    raise ConfigError(f"recipe {path} takes no argument {unknown[0]!r}; its arguments: {usage}")
  missing = [n for n in required if n not in given]
  if missing:
    raise ConfigError(f"recipe {path} needs the argument {missing[0]}: pass {path}:{missing[0]}=... "
                      f"(its arguments: {usage})")
  try:
    hints = typing.get_type_hints(fn)
  except Exception:  # an annotation that does not resolve: take the strings as they are
    hints = {}
  out = {}
  for name, value in given.items():
    hint = hints.get(name)
    out[name] = config_lib.parse_value(value, hint, f"recipe argument {name}") if (
        isinstance(value, str) and hint in (int, float, bool)) else value
  return out


def _last_frame_in(e: BaseException, path: pathlib.Path):
  frames = [f for f in traceback.extract_tb(e.__traceback__) if _same_file(f.filename, path)]
  return frames[-1] if frames else None


def _same_file(filename: str | None, path: pathlib.Path) -> bool:
  return bool(filename) and pathlib.Path(filename).resolve() == path.resolve()


def load_and_check(spec: str | pathlib.Path, overrides: list[str] = ()) -> Config:
  """A recipe with `--set` overrides applied, validated: what `longctx train` runs."""
  return validate(config_lib.apply_overrides(load_recipe(spec), list(overrides)))


__all__ = ["validate", "from_dict", "model_config_class", "check_layout", "load_recipe", "load_and_check",
           "split_recipe_arguments"]
