"""Model registry: `longctx models` lists every entry with its one-line description."""

from __future__ import annotations

import dataclasses

from longctx.errors import ConfigError

_MODELS: dict[str, type] = {}


def register_model(name: str, *, config: type, description: str):
  """Class decorator registering a `SegmentLM` under `name` with its config class (whose `name` defaults to it)."""

  def wrap(cls):
    if name in _MODELS:
      raise ValueError(f"model {name!r} registered twice")
    default = {f.name: f.default for f in dataclasses.fields(config)}.get("name")
    if default != name:
      raise ValueError(f"{config.__name__}.name defaults to {default!r}; the config of model {name!r} must default "
                       f"to {name!r}")
    cls.config_class = config
    cls.description = description
    cls.registry_name = name
    _MODELS[name] = cls
    return cls

  return wrap


def get_model_class(name: str) -> type:
  if name not in _MODELS:
    raise ConfigError(f"unknown model {name!r}; registered models: {', '.join(sorted(_MODELS))}")
  return _MODELS[name]


def list_models() -> dict[str, str]:
  """Name -> one-line description, sorted by name."""
  return {name: _MODELS[name].description for name in sorted(_MODELS)}


def registered() -> list[type]:
  """Every registered model class, in registration order."""
  return list(_MODELS.values())


def config_for(name: str, **settings):
  """The config of registered model `name` with those of `settings` its config class has (the others are
  ignored): one dict of shared sizes (d_model, layers, heads, window, ...) builds any model's config, as the
  recipes' builders, `longctx bench` and the shared contract test do. Not validated."""
  cls = get_model_class(name).config_class
  fields = {f.name for f in dataclasses.fields(cls)}
  return cls(**{key: value for key, value in settings.items() if key in fields})


def tiny_settings(config_class: type) -> dict:
  """The `tiny` settings of a config class and its bases (the subclass's win)."""
  out: dict = {}
  for klass in reversed(config_class.__mro__):
    out.update(getattr(klass, "__dict__", {}).get("tiny", {}))
  return out


def tiny_config(name: str, **overrides):
  """A tiny config of registered model `name` (vocab 50, d_model 32, 2 layers, its `tiny` settings)."""
  cls = get_model_class(name).config_class
  fields = {f.name for f in dataclasses.fields(cls)}
  settings = {"vocab_size": 50, "d_model": 32, "num_layers": 2, **tiny_settings(cls), **overrides}
  return cls(**{key: value for key, value in settings.items() if key in fields})
