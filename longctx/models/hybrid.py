"""Hybrid stacks: layers of different models in one stack, named per layer (Jamba, Zamba, Samba, Qwen3-Next style).

    model.layers = "mamba2,mamba2,transformer"        # repeated over num_layers, bottom first
    model.settings = ["transformer.window=512", "mamba2.state_size=64"]   # per kind of layer

Each entry of `layers` is a registered model whose layers are all one mixer (transformer, retnet, mamba,
mamba2, gated_deltanet, gla, mlstm): a layer of the hybrid is exactly a layer of that model (its block:
its mixer, and the gated MLP after it if that model has one), built from that model's own config. Those
configs share the hybrid's sizes (vocab, d_model, num_layers, d_ff, norms, the embedding and head
settings, `kernel`), its `num_heads` (for the models that split d_model into heads) and its attention
`window`; anything else is the model's default unless `settings` names it as `kind.field=value`.

Nothing else is new: the shell (models/base.py) embeds, carries each layer's state (an XL cache, a
recurrent state), resets it at document starts and streams; each layer shards and runs context-parallel
as it does in its own model (ring attention, the sequence-parallel recurrences); the cost hooks add up the
layers'. Griffin (models/griffin.py) is the same idea with its own two blocks.
"""

from __future__ import annotations

import dataclasses
import typing

from longctx.config import ModelConfig, MultiHeadConfig, parse_value
from longctx.errors import ConfigError
from longctx.models.base import LM
from longctx.models.registry import get_model_class, register_model

# The hybrid's fields every kind of layer shares (the others are the hybrid's own).
SHARED = tuple(f.name for f in dataclasses.fields(ModelConfig) if f.name != "name")


@dataclasses.dataclass
class HybridConfig(ModelConfig):
  tiny = {"layers": "mamba2,transformer", "window": 8, "num_heads": 2,
          "settings": ["mamba2.head_dim=16", "mamba2.state_size=8", "mamba2.chunk_size=8"]}

  name: str = "hybrid"
  layers: str = "mamba2,mamba2,transformer"  # the model of each layer, repeated over num_layers
  num_heads: int = 4  # of every kind of layer that splits d_model into heads (attention, retention, ...)
  window: int = 128  # of every kind of layer that has an attention window
  settings: list[str] = dataclasses.field(default_factory=list)  # "kind.field=value": one kind's own setting

  def kinds(self) -> list[str]:
    """The model of each layer, bottom first."""
    names = [k.strip() for k in self.layers.split(",") if k.strip()]
    return [names[i % len(names)] for i in range(self.num_layers)] if names else []

  def kind_config(self, kind: str) -> ModelConfig:
    """The config of `kind`'s layers: its model's defaults, the hybrid's shared sizes, then `settings`."""
    cls = get_model_class(kind).config_class
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {key: getattr(self, key) for key in SHARED}
    if issubclass(cls, MultiHeadConfig):
      values["num_heads"] = self.num_heads
    if "window" in fields:
      values["window"] = self.window
    hints = typing.get_type_hints(cls)
    for item in self.settings:
      target, _, raw = item.partition("=")
      owner, _, field = target.strip().partition(".")
      if owner == kind:
        values[field] = parse_value(raw.strip(), hints[field], f"model.settings {owner}.{field}")
    return cls(**values)

  def validate(self) -> None:
    super().validate()
    if self.num_heads < 1 or self.window < 1:
      raise ConfigError(f"model.num_heads={self.num_heads} and model.window={self.window} must be >= 1")
    names = sorted(set(self.kinds()))
    if not names:
      raise ConfigError(f"model.layers={self.layers!r} names no layer; e.g. model.layers=mamba2,mamba2,transformer")
    for kind in names:
      cls = get_model_class(kind)  # an unknown name: one line listing the registered models
      if not stackable(cls):
        raise ConfigError(f"model.layers: {kind} cannot be a hybrid's layer (its layers are not all one mixer on "
                          f"the shell); stackable: {', '.join(stackable_models())}")
    for item in self.settings:
      target, eq, _ = item.partition("=")
      owner, dot, field = target.strip().partition(".")
      if not eq or not dot:
        raise ConfigError(f"model.settings entry {item!r} must read kind.field=value, e.g. transformer.window=512")
      if owner not in names:
        raise ConfigError(f"model.settings entry {item!r}: {owner!r} is not one of model.layers ({', '.join(names)})")
      shared = SHARED + ("num_heads", "window", "name")
      if field in shared:
        raise ConfigError(f"model.settings entry {item!r}: {field} is the hybrid's own; set model.{field}")
      cls = get_model_class(owner).config_class
      if field not in {f.name for f in dataclasses.fields(cls)}:
        raise ConfigError(f"model.settings entry {item!r}: {owner} has no field {field!r}")
    for kind in names:
      try:
        self.kind_config(kind).validate()
      except ConfigError as e:
        raise ConfigError(f"the {kind} layers of model.layers: {e}") from None

  def layer_configs(self) -> list[tuple[str, ModelConfig]]:
    configs = {kind: self.kind_config(kind) for kind in set(self.kinds())}
    return [(configs[kind].layer_pattern()[0], configs[kind]) for kind in self.kinds()]

  def layer_pattern(self) -> list[str]:
    return [name for name, _ in self.layer_configs()]


def stackable(model_cls) -> bool:
  """A model whose every layer is its config's one mixer on the unchanged shell (no blocks read at a time, no
  state beside the layers, no own step)."""
  hooks = ("forward_step", "step_length", "init_extra_state", "fresh_extra_state", "segment_multiple", "__call__")
  cfg_cls = model_cls.config_class
  if not issubclass(model_cls, LM) or not cfg_cls.mixer or model_cls is Hybrid or any(
      getattr(cfg_cls, name) is not getattr(ModelConfig, name) for name in ("layer_pattern", "layer_configs")):
    return False
  below = model_cls.__mro__[:model_cls.__mro__.index(LM)]
  return not any(hook in klass.__dict__ for klass in below for hook in hooks)


def stackable_models() -> list[str]:
  from longctx.models.registry import registered

  return sorted(cls.registry_name for cls in registered() if stackable(cls))


@register_model("hybrid", config=HybridConfig,
                description="Hybrid stack: each layer any one-mixer model's (e.g. mamba2,mamba2,transformer)")
class Hybrid(LM):
  context_parallel = "each layer's own (ring attention, sequence-parallel recurrences)"
