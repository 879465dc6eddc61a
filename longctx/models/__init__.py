"""Every model behind the one segment-recurrent interface (see `base.py`).

A model is one module of this package that registers itself with `@register_model`. Importing the package
imports each of its modules, so a new model file is found without being listed anywhere; every registered
model class and its config class are then names of this package (`from longctx.models import RMTConfig`).

A model in another installed package is found through its entry point in the group `longctx.models`
(in its pyproject.toml: `[project.entry-points."longctx.models"] mymodel = "mypackage.mymodel"`): the named
module is imported here, and registers itself like a file of this package.
"""

import importlib
import importlib.metadata
import pkgutil

from flax import nnx

from longctx.errors import ConfigError
from longctx.models.base import LM, SegmentLM, reset_rows
from longctx.models.registry import (config_for, get_model_class, list_models, register_model, registered,
                                     tiny_config)

for _module in pkgutil.iter_modules(__path__):
  importlib.import_module(f"{__name__}.{_module.name}")


def _load_plugins() -> None:
  for entry in importlib.metadata.entry_points(group="longctx.models"):
    try:
      entry.load()
    except Exception as e:  # one line naming the package at fault, not a traceback from deep inside it
      raise ConfigError(f"the model plugin {entry.name!r} ({entry.value}, entry point group longctx.models) "
                        f"failed to import: {type(e).__name__}: {e}") from None


_load_plugins()
for _cls in registered():
  globals()[_cls.__name__] = _cls
  globals()[_cls.config_class.__name__] = _cls.config_class
del _module, _cls


def build_model(cfg, *, rngs: nnx.Rngs) -> SegmentLM:
  """Instantiate the registered model for `cfg.name` (eagerly: one op per parameter)."""
  return get_model_class(cfg.name)(cfg, rngs=rngs)


def create_model(cfg, *, seed: int = 0) -> SegmentLM:
  """Like `build_model`, but initialises every parameter in one compiled call."""
  import jax

  abstract = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(seed)))
  graphdef, _ = nnx.split(abstract)
  params = jax.jit(lambda: nnx.state(build_model(cfg, rngs=nnx.Rngs(seed))))()
  return nnx.merge(graphdef, params)
