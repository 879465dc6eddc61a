"""Model size, FLOPs and per-device memory, without devices (`longctx train --dry-run`).

Works for any mesh size, e.g. a 64-chip TPU pod slice on a laptop: parameters
are built abstractly (`nnx.eval_shape`) and sharded on paper with the same
logical-axis rules the trainer uses.
"""

from __future__ import annotations

import dataclasses
import math

import jax
from flax import nnx

from longctx import recipe as recipe_lib
from longctx import sharding as shd
from longctx.config import Config
from longctx.models import build_model, get_model_class


@dataclasses.dataclass
class RunEstimate:
  num_params: int
  num_embedding_params: int
  flops_per_token_forward: float
  flops_per_token_train: float
  tokens_per_step: int
  mesh: dict[str, int]
  bytes_params: float  # per device
  bytes_optimizer: float
  bytes_gradients: float
  bytes_model_state: float
  bytes_activations: float

  @property
  def bytes_total(self) -> float:
    return (self.bytes_params + self.bytes_optimizer + self.bytes_gradients + self.bytes_model_state
            + self.bytes_activations)

  def lines(self) -> list[str]:
    gib = lambda b: f"{b / 2**30:.3f} GiB"
    mesh = " x ".join(f"{k}={v}" for k, v in self.mesh.items())
    return [
        f"parameters:        {self.num_params / 1e6:.2f}M ({self.num_embedding_params / 1e6:.2f}M in embeddings)",
        f"FLOPs per token:   {self.flops_per_token_forward / 1e9:.3f} GFLOP forward, "
        f"{self.flops_per_token_train / 1e9:.3f} GFLOP train (3x)",
        f"tokens per step:   {self.tokens_per_step:,}  ({self.flops_per_token_train * self.tokens_per_step / 1e15:.3f} "
        "PFLOP per step)",
        f"mesh:              {mesh} ({math.prod(self.mesh.values())} devices)",
        "per-device memory (estimate):",
        f"  params           {gib(self.bytes_params)}",
        f"  optimizer (Adam) {gib(self.bytes_optimizer)}",
        f"  gradients        {gib(self.bytes_gradients)}",
        f"  model state      {gib(self.bytes_model_state)}",
        f"  activations      {gib(self.bytes_activations)}",
        f"  total            {gib(self.bytes_total)}",
    ]


def target_mesh(cfg: Config, num_devices: int | None = None) -> dict[str, int]:
  """The mesh the recipe asks for; -1 is filled from `num_devices` (default: local devices)."""
  sizes = {a: getattr(cfg.mesh, a) for a in shd.MESH_AXES}
  if -1 not in sizes.values():
    return sizes
  n = num_devices or jax.device_count()
  return dict(zip(shd.MESH_AXES, shd.mesh_shape(cfg.mesh, n)))


def estimate_run(cfg: Config, *, num_devices: int | None = None) -> RunEstimate:
  recipe_lib.validate(cfg)
  mesh = target_mesh(cfg, num_devices)
  recipe_lib.check_layout(cfg, mesh)  # what the real run would refuse, a dry run refuses too
  model_cls = get_model_class(cfg.model.name)
  abstract = nnx.eval_shape(lambda: build_model(cfg.model, rngs=nnx.Rngs(0)))
  _, params = nnx.split(abstract)
  variables = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable))
  num_params = sum(math.prod(v.get_value().shape) for v in variables)
  emb = sum(math.prod(v.get_value().shape) for v in variables if "vocab" in (v.get_metadata().get("logical_axes") or ()))
  per_device_params = 0.0
  for v in variables:
    spec = shd.logical_to_spec(v.get_metadata().get("logical_axes"), v.get_value().shape, mesh)
    shards = math.prod(math.prod(mesh[a] for a in (ax if isinstance(ax, tuple) else (ax,))) for ax in spec if ax)
    per_device_params += math.prod(v.get_value().shape) * v.get_value().dtype.itemsize / shards
  d = cfg.data
  batch_shards = mesh["data"] * mesh["fsdp"]
  lanes_per_device = d.batch_size / batch_shards
  state = jax.eval_shape(lambda: abstract.init_state(d.batch_size))
  state_bytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state)) / batch_shards
  act_dtype_bytes = 2 if cfg.train.compute_dtype == "bfloat16" else 4
  tokens_device = lanes_per_device * d.seg_len * d.segments_per_step / mesh["sequence"]
  in_flight = tokens_device / d.segments_per_step if cfg.train.remat else tokens_device
  per_token = model_cls.activation_bytes_per_token(cfg.model, dtype_bytes=act_dtype_bytes) / mesh["tensor"]
  # Logits and their gradient in float32 for one segment at a time.
  logits = lanes_per_device * d.seg_len * cfg.model.vocab_size * 4 * 2 / mesh["tensor"]
  fwd = model_cls.flops_per_token(cfg.model, seg_len=d.seg_len)
  return RunEstimate(
      num_params=num_params, num_embedding_params=emb, flops_per_token_forward=fwd,
      flops_per_token_train=3 * fwd, tokens_per_step=d.batch_size * d.seg_len * d.segments_per_step, mesh=mesh,
      bytes_params=per_device_params, bytes_optimizer=2 * per_device_params, bytes_gradients=per_device_params,
      bytes_model_state=state_bytes * (2 if cfg.train.remat else d.segments_per_step + 1),
      bytes_activations=in_flight * per_token + logits)
