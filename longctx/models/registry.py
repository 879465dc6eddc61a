"""Model registry: `longctx models` lists every entry with its one-line description."""

from __future__ import annotations

from longctx.errors import ConfigError

_MODELS: dict[str, type] = {}


def register_model(name: str, *, config: type, description: str):
  """Class decorator registering a `SegmentLM` under `name` with its config class."""

  def wrap(cls):
    if name in _MODELS:
      raise ValueError(f"model {name!r} registered twice")
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
