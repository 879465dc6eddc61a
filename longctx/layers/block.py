"""Mixers and the residual block around them: what one layer of every model is made of.

A *mixer* is a layer's token mixer (windowed attention, retention, an SSM, a memory layer) with the state
it carries from step to step:

    state = mixer.init_state(batch_size)           # a dict of arrays, each [batch, ...]; reads no parameter
    y, state = mixer(x, state, ctx)                # x, y [batch, seq, d_model]; ctx: layers/context.py

A `Block` is the pre-norm residual layer around a mixer, `x + mixer(norm(x))` then `x + mlp(mlp_norm(x))`
(no MLP for a mixer that has none, as Mamba's). The shell (models/base.py) stacks blocks as the config's
layer pattern names them: mixers are registered by name (`register_mixer`), so which mixer sits at which
depth is data (`ModelConfig.layer_pattern`).
"""

from __future__ import annotations

from typing import ClassVar

import jax
from flax import nnx

from longctx.errors import ConfigError
from longctx.layers.context import Context
from longctx.layers.linear import GatedMLP
from longctx.layers.norms import RMSNorm

_MIXERS: dict[str, type] = {}


def register_mixer(name: str):
  """Class decorator registering a mixer (or a block class) under `name`, the name layer patterns use."""

  def wrap(cls):
    if _MIXERS.get(name, cls) is not cls:
      raise ValueError(f"mixer {name!r} registered twice")
    cls.mixer_name = name
    _MIXERS[name] = cls
    return cls

  return wrap


def get_mixer(name: str) -> type:
  if name not in _MIXERS:
    raise ConfigError(f"unknown mixer {name!r}; registered mixers: {', '.join(sorted(_MIXERS))}")
  return _MIXERS[name]


class Mixer(nnx.Module):
  """Base class of the token mixers (module docstring). Subclasses take `(cfg, *, layer, rngs)`."""

  mixer_name: ClassVar[str] = ""
  mlp: ClassVar[bool] = True  # its block adds the gated MLP after it
  block_class: ClassVar[type | None] = None  # the block around it (None: `Block`)

  def init_state(self, batch_size: int) -> dict:
    """The state of `batch_size` fresh lanes: zeros, no parameter read (the trainer calls it abstractly)."""
    return {}

  def fresh_state(self, batch_size: int) -> dict:
    """The state a new document starts from; may read parameters (a learned initial memory)."""
    return self.init_state(batch_size)

  def __call__(self, x: jax.Array, state: dict, ctx: Context) -> tuple[jax.Array, dict]:
    raise NotImplementedError

  @classmethod
  def reach(cls, cfg) -> int:
    """How many tokens back a token reads through this layer without its carried memory (a window, a conv)."""
    return 0

  @classmethod
  def flops_per_token(cls, cfg, *, seg_len: int) -> float:
    """Forward matmul FLOPs per token of the mixer (2 per multiply-add), its projections included."""
    raise NotImplementedError

  @classmethod
  def activation_bytes_per_token(cls, cfg, *, dtype_bytes: int) -> float:
    """Activations its layer (block) saves for the backward pass per token, for memory estimates. The default
    counts the block around it: residual and norm inputs and the gated MLP's hidden (mixers add their own)."""
    return float((4 * cfg.d_model + (3 * cfg.resolved_d_ff if cls.mlp else 0)) * dtype_bytes)


class Block(nnx.Module):
  """`x + mixer(norm(x))`, then `x + mlp(mlp_norm(x))` when the mixer wants the gated MLP."""

  def __init__(self, cfg, mixer: Mixer, *, rngs: nnx.Rngs):
    self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    self.mixer = mixer
    if type(mixer).mlp:
      self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
      self.mlp = GatedMLP(cfg.d_model, cfg.resolved_d_ff, rngs=rngs, out_scale=1.0 / (2 * cfg.num_layers))
    else:
      self.mlp_norm = self.mlp = None

  def init_state(self, batch_size: int) -> dict:
    return self.mixer.init_state(batch_size)

  def fresh_state(self, batch_size: int) -> dict:
    return self.mixer.fresh_state(batch_size)

  def __call__(self, x: jax.Array, state: dict, ctx: Context) -> tuple[jax.Array, dict]:
    y, state = self.mixer(self.norm(x), state, ctx)
    x = x + y
    if self.mlp is not None:
      x = x + self.mlp(self.mlp_norm(x))
    return x, state

  @staticmethod
  def mlp_flops_per_token(cfg) -> float:
    return float(2 * 3 * cfg.d_model * cfg.resolved_d_ff)


def build_block(name: str, cfg, *, layer: int, rngs: nnx.Rngs) -> nnx.Module:
  """The block of layer `layer` for the mixer registered as `name`."""
  mixer_cls = get_mixer(name)
  block_cls = mixer_cls.block_class or Block
  return block_cls(cfg, mixer_cls(cfg, layer=layer, rngs=rngs), rngs=rngs)
