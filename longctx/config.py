"""Typed configuration: the dataclasses of a run and dotted overrides, at the bottom of the import graph.

The CLI applies overrides such as `--set model.d_model=512 train.steps=100`; an unknown key or a value of
the wrong type raises `ConfigError` naming the key and the valid choices. Each section checks its own
values (`validate`); loading a recipe, reading a saved config and the checks across sections and against
the registered models live in `longctx/recipe.py`, above the models and the data.

Each model registers its own config dataclass (a subclass of `ModelConfig`), so `model.*` overrides are
checked against the fields of the chosen model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import typing
from typing import Any

from longctx.errors import ConfigError


KERNELS = ("auto", "reference", "xla", "pallas")  # model.kernel: see longctx/layers/kernel.py
TASKS = ("passkey", "mqar", "copy", "qa1", "qa2")  # data.task: the synthetic tasks (longctx/data/synthetic.py)


@dataclasses.dataclass
class ModelConfig:
  """Fields shared by every model. Subclasses add their own."""

  # Fields of a subclass naming layers that differ from the others (a kNN layer, a recurrent layer), which
  # the dry run keeps in place when it reduces the depth: lists of indices (negative counts from the top)
  # and single indices read through `resolved_<field>` (None = no such layer).
  layer_lists: typing.ClassVar[tuple[str, ...]] = ()
  layer_indices: typing.ClassVar[tuple[str, ...]] = ()
  # The mixer of every layer (a name registered with layers.block.register_mixer), unless the subclass
  # overrides `layer_pattern`.
  mixer: typing.ClassVar[str] = ""
  # Settings of a tiny model of this kind (besides vocab 50, d_model 32, 2 layers, 4 heads): what the shared
  # contract test (tests/test_contract.py) builds for every registered model.
  tiny: typing.ClassVar[dict] = {}

  name: str = ""
  vocab_size: int = 259
  d_model: int = 128
  num_layers: int = 2
  d_ff: int = 0  # 0 = round(8/3 * d_model) up to a multiple of 64 (gated MLP)
  tie_embeddings: bool = True
  norm_eps: float = 1e-6
  embed_conv: int = 0  # width of a causal depthwise conv over token embeddings (0 = off; 4 helps recall)
  logit_cap: float = 0.0  # > 0: logits = cap * tanh(logits / cap) (Gemma 2, xLSTM 7B: 30); 0 = off
  embed_scale: bool = False  # multiply input embeddings by sqrt(d_model), rounded to bfloat16 (Gemma, Griffin)
  kernel: str = "auto"  # "auto", "reference", "xla" or "pallas": which implementation the kernels run

  def validate(self) -> None:
    _positive("model", self, "vocab_size", "d_model", "num_layers")
    if self.d_ff < 0:
      raise ConfigError("model.d_ff must be >= 0 (0 = derived default)")
    if self.embed_conv < 0 or self.embed_conv == 1:
      raise ConfigError(f"model.embed_conv={self.embed_conv} must be 0 (off) or a width >= 2 (e.g. 4)")
    if self.kernel not in KERNELS:
      raise ConfigError(f"model.kernel={self.kernel!r} is not one of {KERNELS}")
    if self.logit_cap < 0:
      raise ConfigError(f"model.logit_cap={self.logit_cap} must be >= 0 (0 = off)")

  def layer_pattern(self) -> list[str]:
    """The mixer of each layer, bottom first (names registered with `layers.block.register_mixer`)."""
    return [self.mixer] * self.num_layers

  def layer_configs(self) -> list[tuple[str, "ModelConfig"]]:
    """(mixer name, the config its layer reads) of each layer, bottom first: this config for every layer, except
    in a hybrid stack (models/hybrid.py), whose layers each read the config of their own model."""
    return [(name, self) for name in self.layer_pattern()]

  @property
  def resolved_d_ff(self) -> int:
    if self.d_ff:
      return self.d_ff
    return int(math.ceil(8 * self.d_model / 3 / 64) * 64)


@dataclasses.dataclass
class MultiHeadConfig(ModelConfig):
  """A model whose layers split d_model into heads (attention, retention)."""

  tiny: typing.ClassVar[dict] = {"num_heads": 4}

  num_heads: int = 4
  head_dim: int = 0  # 0 = d_model // num_heads

  def validate(self) -> None:
    super().validate()
    _positive("model", self, "num_heads")
    if self.head_dim < 0:
      raise ConfigError("model.head_dim must be >= 0 (0 = d_model // num_heads)")
    if self.head_dim == 0 and self.d_model % self.num_heads:
      raise ConfigError(
          f"model.d_model={self.d_model} is not divisible by model.num_heads={self.num_heads}; "
          "change one of them or set model.head_dim explicitly")

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.d_model // self.num_heads


@dataclasses.dataclass
class WidthFactorConfig(MultiHeadConfig):
  """A multi-head model whose key and value widths are factors of d_model split over the heads (GLA, mLSTM):
  `width_factors` names its two factor fields, key first; `head_dim` is not used."""

  width_factors: typing.ClassVar[tuple[str, str]] = ("key_expand", "value_expand")

  def validate(self) -> None:
    super().validate()
    key, value = self.width_factors
    if self.head_dim:
      raise ConfigError(f"model.head_dim={self.head_dim} is not used by {self.name}: its key and value widths are "
                        f"model.{key} and model.{value} x d_model, split over model.num_heads")
    for field in self.width_factors:
      factor = getattr(self, field)
      total = factor * self.d_model
      if not factor > 0 or total != int(total) or int(total) % self.num_heads:
        raise ConfigError(f"model.{field}={factor} x d_model={self.d_model} must be a positive whole number of "
                          f"channels divisible by model.num_heads={self.num_heads}")

  def _width(self, field: str) -> int:
    return int(getattr(self, field) * self.d_model) // self.num_heads

  @property
  def key_dim(self) -> int:
    return self._width(self.width_factors[0])

  @property
  def value_dim(self) -> int:
    return self._width(self.width_factors[1])


@dataclasses.dataclass
class DataConfig:
  """Where documents come from and how they are packed into lanes.

  source:
    "stdlib"    the Python standard library's own source files (no download)
    "files"     local files (`paths`, glob patterns allowed): .jsonl / .json / .parquet are one document
                per row (`text_field`), any other file (.txt, .tex, .md, .py, ...) one UTF-8 document;
                each may be compressed (.gz, .bz2, .xz, .zst)
    "hub"       a Hugging Face hub dataset, streamed (`hub_name`, `hub_config`, `text_field`)
    "synthetic" generated long-context tasks (`task`: passkey, mqar, copy, qa1, qa2, or a
                comma-separated mixture such as "passkey,mqar,qa1,qa2", where naming a task twice
                draws it twice as often; see data/synthetic.py)
  """

  source: str = "stdlib"
  paths: list[str] = dataclasses.field(default_factory=list)
  eval_paths: list[str] = dataclasses.field(default_factory=list)
  hub_name: str = ""
  hub_config: str = ""
  text_field: str = "text"
  split: str = "train"
  eval_split: str = "validation"
  task: str = "passkey"  # synthetic: a task or a mixture "a,b,c"; a task named n times is drawn n times as often
  task_length: int = 1024  # synthetic: approximate document length in tokens (the maximum if a range)
  task_min_length: int = 0  # synthetic: > 0 draws each length log-uniformly from [task_min_length, task_length]
  prompt_loss_weight: float = 0.0  # synthetic: loss weight of prompt tokens (answers weigh 1; 0 = answer-only)
  # synthetic passkey: [lo, hi] = the key's depth drawn uniformly in it (0 = the start of the filler, 1 =
  # just before the question); [] = anywhere. E.g. [0, 0.5] keeps the key at least half a document back.
  passkey_depth: list[float] = dataclasses.field(default_factory=list)
  num_docs: int = 0  # synthetic: documents per epoch (0 = 10_000); other sources: cap (0 = all)
  eval_fraction: float = 0.02  # stdlib/files without eval_paths: held-out fraction of documents
  skip_unreadable: bool = False  # files: skip (and count, in one warning) files that are not UTF-8 / not JSON
  tokenizer: str = "byte"  # "byte" or a path to a sentencepiece .model
  batch_size: int = 8  # global number of lanes
  seg_len: int = 128  # tokens per segment
  segments_per_step: int = 2  # K: segments per train step (truncated BPTT window)
  # > 0 pads every document to a multiple of this many tokens: model.block_len (documents start at a block),
  # or a multiple of seg_len, e.g. segments_per_step x seg_len (documents start at a train step, so
  # backpropagation through the state spans a document that fits in one step)
  align_documents: int = 0
  seed: int = 0

  def validate(self) -> None:
    _positive("data", self, "batch_size", "seg_len", "segments_per_step", "task_length")
    a = self.align_documents
    if a < 0 or (a and self.seg_len % a and a % self.seg_len):
      raise ConfigError(f"data.align_documents={a} must be 0, divide data.seg_len={self.seg_len}, or be a multiple "
                        "of it")
    if self.passkey_depth and (len(self.passkey_depth) != 2 or not 0.0 <= self.passkey_depth[0] <=
                               self.passkey_depth[1] <= 1.0):
      raise ConfigError(f"data.passkey_depth={self.passkey_depth} must be [] or [lo, hi] with 0 <= lo <= hi <= 1")
    valid = ("stdlib", "files", "hub", "synthetic")
    if self.source not in valid:
      raise ConfigError(f"data.source={self.source!r} is not one of {valid}")
    if self.source == "files" and not self.paths:
      raise ConfigError("data.source='files' needs data.paths (e.g. --set data.paths=[a.txt,b.jsonl])")
    if self.source == "hub" and not self.hub_name:
      raise ConfigError("data.source='hub' needs data.hub_name (e.g. --set data.hub_name=deepmind/pg19)")
    if not 0.0 <= self.eval_fraction < 1.0:
      raise ConfigError(f"data.eval_fraction={self.eval_fraction} must be in [0, 1)")
    if self.source == "synthetic":
      parse_tasks(self.task)
      if not 0 <= self.task_min_length <= self.task_length:
        raise ConfigError(f"data.task_min_length={self.task_min_length} must be in [0, data.task_length="
                          f"{self.task_length}]")
      if not 0.0 <= self.prompt_loss_weight <= 1.0:
        raise ConfigError(f"data.prompt_loss_weight={self.prompt_loss_weight} must be in [0, 1]")


def parse_tasks(spec: str) -> tuple[str, ...]:
  """`data.task`: `"passkey"` or a mixture `"passkey,mqar,qa1"` -> a tuple of known task names."""
  tasks = tuple(t.strip() for t in spec.split(",") if t.strip())
  bad = [t for t in tasks if t not in TASKS]
  if not tasks or bad:
    raise ConfigError(f"data.task={spec!r}: {bad or 'empty'} not in {TASKS} (a mixture is comma-separated)")
  return tasks


@dataclasses.dataclass
class TrainConfig:
  steps: int = 200
  learning_rate: float = 3e-3
  warmup_steps: int = 20
  min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  grad_clip: float = 1.0
  compute_dtype: str = "float32"  # "float32" or "bfloat16" (params stay float32)
  remat: bool = False  # rematerialise each segment's forward pass in the backward pass
  # Gradients of the state carried between the K segments of a step: "carry" backpropagates through it over
  # the whole step (truncated BPTT over K segments; what recurrent memories need to learn to write), "stop"
  # cuts it at every segment start (Transformer-XL's SG(cache), Block-Recurrent's detached state), a cheaper
  # backward that learns nothing about what to carry.
  state_gradient: str = "carry"
  # A step of K <= unroll_segments segments is compiled as straight-line code (one copy of the model per
  # segment): no stacked residuals, 1.26-1.28x the tokens/s of a lax.scan at K=2 on a CPU core. Above it, a
  # lax.scan keeps the program size and compile time flat in K (K=8 unrolled compiles in ~2x the time).
  unroll_segments: int = 4
  seed: int = 0
  log_every: int = 10
  eval_every: int = 0  # 0 = only at the end
  eval_batches: int = 0  # 0 = stream the whole held-out set
  checkpoint_every: int = 100  # permanent checkpoints (the newest keep_checkpoints stay)
  keep_checkpoints: int = 3
  checkpoint_minutes: float = 0.0  # > 0: also a temporary checkpoint this often (only the newest stays)
  async_checkpoint: bool = True
  nan_policy: str = "stop"  # non-finite loss/gradient: "stop" (keep the last good checkpoint) or "skip" the step
  max_skipped_steps: int = 10  # nan_policy "skip": stop after this many consecutive skipped steps
  # Fine-tuning: start a new run from these weights (a run dir, one of its checkpoints/STEP dirs, or a
  # `longctx export` / `longctx import-hf` dir); optimizer, step and data start fresh. "" = random init.
  # Ignored once the run dir has checkpoints of its own (the run then resumes from those).
  init_from: str = ""
  # Stages with their own data, e.g. ["steps=300 data.task_length=256", "steps=700 data.task_length=1024"]
  # (see longctx/data/curriculum.py); [] = one stage of `data`. train.steps = the stages' sum.
  curriculum: list[str] = dataclasses.field(default_factory=list)

  def validate(self) -> None:
    _positive("train", self, "steps", "learning_rate", "log_every", "keep_checkpoints", "checkpoint_every")
    if self.warmup_steps < 0 or self.eval_every < 0 or self.eval_batches < 0:
      raise ConfigError("train.warmup_steps, train.eval_every and train.eval_batches must be >= 0")
    if self.compute_dtype not in ("float32", "bfloat16"):
      raise ConfigError(f"train.compute_dtype={self.compute_dtype!r} is not one of ('float32', 'bfloat16')")
    if self.unroll_segments < 0:
      raise ConfigError(f"train.unroll_segments={self.unroll_segments} must be >= 0 (0 = always a lax.scan)")
    if self.state_gradient not in ("carry", "stop"):
      raise ConfigError(f"train.state_gradient={self.state_gradient!r} is not one of ('carry', 'stop')")
    if self.nan_policy not in ("stop", "skip"):
      raise ConfigError(f"train.nan_policy={self.nan_policy!r} is not one of ('stop', 'skip')")
    if self.checkpoint_minutes < 0 or self.max_skipped_steps < 1:
      raise ConfigError("train.checkpoint_minutes must be >= 0 (0 = off) and train.max_skipped_steps >= 1")


@dataclasses.dataclass
class MeshConfig:
  """Device mesh shape. -1 on one axis = fill with the remaining devices."""

  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  sequence: int = 1

  def validate(self) -> None:
    sizes = dataclasses.astuple(self)
    if sum(s == -1 for s in sizes) > 1:
      raise ConfigError("at most one mesh axis may be -1 (fill)")
    if any(s == 0 or s < -1 for s in sizes):
      raise ConfigError(f"mesh axis sizes must be positive or -1, got {dataclasses.asdict(self)}")


@dataclasses.dataclass
class Config:
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)

  def check_types(self) -> "Config":
    """Every field holds a value of its declared type (a recipe may set any Python value); one-line ConfigError."""
    for section in ("model", "data", "train", "mesh"):
      obj = getattr(self, section)
      hints = typing.get_type_hints(type(obj))
      for f in dataclasses.fields(obj):
        _checked(getattr(obj, f.name), hints[f.name], f"{section}.{f.name}")
    return self


def _positive(section: str, obj: Any, *names: str) -> None:
  for name in names:
    value = getattr(obj, name)
    if not value > 0:
      raise ConfigError(f"{section}.{name}={value} must be > 0")
    if not math.isfinite(value):
      raise ConfigError(f"{section}.{name}={value} must be a finite number > 0")


# ----------------------------------------------------------------------------- overrides


def to_dict(cfg: Any) -> dict:
  """Nested plain dict of a config (for JSON logs and checkpoints)."""
  return dataclasses.asdict(cfg)


def section_from_dict(cls, values: dict, prefix: str):
  """One config section `cls` from its dict; ConfigError (one line) for an unknown key or a wrong type."""
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - names)
  if unknown:
    raise ConfigError(f"unknown config key {prefix}.{unknown[0]}; valid keys: {', '.join(sorted(names))}")
  hints = typing.get_type_hints(cls)
  return cls(**{key: _checked(value, hints[key], f"{prefix}.{key}") for key, value in values.items()})


def _checked(value: Any, hint: Any, key: str) -> Any:
  """`value` if it is of type `hint` (an int passes as a float; a tuple as a list, which it becomes), else a
  ConfigError naming the key."""
  if typing.get_origin(hint) in (list, tuple):
    (inner,) = typing.get_args(hint)[:1]
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"{key}={value!r}: expected a list")
    return [_checked(v, inner, key) for v in value]
  if hint is bool and isinstance(value, bool):
    return value
  if hint is int and isinstance(value, numbers.Integral) and not isinstance(value, bool):
    return int(value)
  if hint is float and isinstance(value, numbers.Real) and not isinstance(value, bool):
    return float(value)
  if hint is str and isinstance(value, str):
    return value
  raise ConfigError(f"{key}={value!r}: expected {_kind(hint)}")


def _kind(hint: Any) -> str:
  return {bool: "a bool (true/false)", int: "an int", float: "a float", str: "a string"}.get(hint, str(hint))


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
  """Apply `key=value` overrides, e.g. `model.d_model=512`, `data.paths=[a.txt,b.txt]`."""
  for item in overrides:
    if "=" not in item:
      raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.steps=100)")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    target: Any = cfg
    for i, part in enumerate(parts):
      if not dataclasses.is_dataclass(target):
        raise ConfigError(f"unknown config key {key!r}: {'.'.join(parts[:i])} is not a section")
      fields = {f.name: f for f in dataclasses.fields(target)}
      if part not in fields:
        where = ".".join(parts[:i]) or "top level"
        raise ConfigError(f"unknown config key {key!r}; valid keys at {where}: {', '.join(sorted(fields))}")
      if i == len(parts) - 1:
        if part == "name" and isinstance(target, ModelConfig):
          raise ConfigError("model.name cannot be overridden; pick a recipe for that model instead")
        section = getattr(target, part)
        if dataclasses.is_dataclass(section):
          example = next(f.name for f in dataclasses.fields(section) if f.name != "name")
          raise ConfigError(f"{key.strip()} is a section, not a value; override one of its fields, e.g. "
                            f"{key.strip()}.{example}=...")
        hint = typing.get_type_hints(type(target))[part]
        setattr(target, part, parse_value(raw.strip(), hint, key))
      else:
        target = getattr(target, part)
  return cfg


def parse_value(raw: str, hint: Any, key: str) -> Any:
  origin = typing.get_origin(hint)
  if origin in (list, tuple):
    (inner,) = typing.get_args(hint)[:1]
    if inner is str and raw.startswith("["):  # a JSON list of strings, e.g. train.curriculum=["steps=3 ...", ...]
      try:
        items = json.loads(raw)
      except json.JSONDecodeError:
        items = None
      if isinstance(items, list) and all(isinstance(x, str) for x in items):
        return items
    body = raw[1:-1] if raw.startswith("[") and raw.endswith("]") else raw
    items = [s.strip() for s in body.split(",") if s.strip()]
    return [parse_value(s, inner, key) for s in items]
  if hint is bool:
    if raw.lower() in ("true", "1", "yes", "on"):
      return True
    if raw.lower() in ("false", "0", "no", "off"):
      return False
    raise ConfigError(f"{key}={raw!r}: expected a bool (true/false)")
  if hint is int:
    try:
      return int(raw)
    except ValueError:
      raise ConfigError(f"{key}={raw!r}: expected an int") from None
  if hint is float:
    try:
      value = float(raw)
    except ValueError:
      raise ConfigError(f"{key}={raw!r}: expected a float") from None
    if not math.isfinite(value):
      raise ConfigError(f"{key}={raw!r}: expected a finite float")
    return value
  if hint is str:
    return raw
  raise ConfigError(f"{key}: cannot override a field of type {hint}")


def replace(cfg: Config, **sections: Any) -> Config:
  """A copy of `cfg` with whole sections replaced."""
  return dataclasses.replace(cfg, **sections)


__all__ = [
    "Config", "ModelConfig", "MultiHeadConfig", "DataConfig", "TrainConfig", "MeshConfig", "KERNELS", "TASKS",
    "apply_overrides", "parse_value", "section_from_dict", "to_dict", "replace", "parse_tasks",
]
