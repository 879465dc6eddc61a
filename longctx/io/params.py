"""A model's parameters by name: the flat `{"blocks.0.mixer.in_proj": array}` dicts that exports,
checkpoints and fine-tuning share, nested back into the model's own structure, and the model's parameter
shapes without allocating them."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from longctx.config import ModelConfig
from longctx.errors import CheckpointError
from longctx.models import build_model

Flat = dict[str, np.ndarray]


def flatten_params(tree: Mapping) -> Flat:
  """A nested param dict (`nnx.to_pure_dict`, keys str or int) -> {"blocks.0.mixer.in_proj": array}."""
  out: Flat = {}

  def walk(node, prefix):
    for key, value in node.items():
      name = f"{prefix}{key}"
      if isinstance(value, Mapping):
        walk(value, name + ".")
      else:
        out[name] = value

  walk(tree, "")
  return out


def _paths(tree: Mapping, prefix: tuple = ()) -> Iterator[tuple[tuple, Any]]:
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from _paths(value, prefix + (key,))
    else:
      yield prefix + (key,), value


def params_from_flat(flat: Mapping[str, np.ndarray], *, like: Mapping) -> dict:
  """Nest `flat` into the structure of `like` (a pure param dict of arrays or ShapeDtypeStructs).

  Each array is cast to its counterpart's dtype. Raises a one-line CheckpointError
  naming the first missing, unexpected or mis-shaped tensor.
  """
  expected = {".".join(str(k) for k in path): (path, leaf) for path, leaf in _paths(like)}
  missing = sorted(set(expected) - set(flat))
  extra = sorted(set(flat) - set(expected))
  if missing or extra:
    parts = []
    if missing:
      parts.append(f"{len(missing)} missing (first: {missing[0]})")
    if extra:
      parts.append(f"{len(extra)} unexpected (first: {extra[0]})")
    raise CheckpointError(f"the weights do not fit this model: {', '.join(parts)} tensors; "
                          "export and load with the same model config")
  out: dict = {}
  for name, (path, leaf) in expected.items():
    value = flat[name]
    if tuple(value.shape) != tuple(leaf.shape):
      raise CheckpointError(f"tensor {name} has shape {tuple(value.shape)} but the model needs "
                            f"{tuple(leaf.shape)}; export and load with the same model config")
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = np.asarray(value).astype(leaf.dtype, copy=False)
  return out


def abstract_params(cfg: ModelConfig) -> dict:
  """The model's parameters as a pure dict of ShapeDtypeStructs (nothing allocated)."""
  model = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))
  return nnx.to_pure_dict(nnx.state(model))


def load_params_into(model, flat: Mapping[str, np.ndarray]):
  """Replace every parameter of the nnx `model` by `flat`'s (checked as `params_from_flat`); returns it."""
  state = nnx.state(model)
  pure = params_from_flat(flat, like=nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, _tree_map(jnp.asarray, pure))
  nnx.update(model, state)
  return model


def model_from_flat(cfg: ModelConfig, flat: Mapping[str, np.ndarray]):
  """The nnx model of `cfg` holding `flat`'s weights, without a random init first."""
  abstract = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  pure = params_from_flat(flat, like=nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, _tree_map(jnp.asarray, pure))
  return nnx.merge(graphdef, state)


def _tree_map(fn: Callable, tree: Mapping) -> dict:
  return {k: _tree_map(fn, v) if isinstance(v, Mapping) else fn(v) for k, v in tree.items()}
