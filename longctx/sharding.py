"""Device mesh and sharding rules: one place that maps logical axes to mesh axes.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel + parameter
sharding), `tensor` (heads / MLP width), `sequence` (context parallel).
Parameters carry logical axis names (`Param(..., logical_axes=("embed", "mlp"))`);
`LOGICAL_RULES` maps each name to a mesh axis. Batch rows (lanes) and every
leaf of the model state are sharded over (data, fsdp) on their first dimension,
so a lane stays on its device for the whole run.
"""

from __future__ import annotations

import math
from typing import Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from longctx.config import MeshConfig
from longctx.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor", "sequence")
BATCH_AXES = ("data", "fsdp")
SEQUENCE_AXIS = "sequence"

# logical parameter axis -> mesh axis (None = replicated)
LOGICAL_RULES: dict[str, str | None] = {
    "embed": "fsdp",
    "vocab": "tensor",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "conv": None,
    "layers": None,
    "state": None,
    "memory": None,
}


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, ...]:
  """Resolve -1 (fill) and check the product equals `num_devices`."""
  sizes = [getattr(cfg, a) for a in MESH_AXES]
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))} does not divide {num_devices} devices")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError(
        f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but {num_devices} are available; "
        "set one mesh axis to -1 to fill")
  return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(cfg, len(devices))
  return jax.make_mesh(shape, MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(axes: tuple[str | None, ...] | None, shape: tuple[int, ...],
                    axis_sizes: Mapping[str, int]) -> P:
  """PartitionSpec for a parameter; a dim that the mesh axis does not divide stays replicated.

  `axis_sizes` is `mesh.shape` or any {axis: size} mapping (e.g. a pod mesh in a dry run).
  """
  if axes is None:
    return P()
  spec = []
  for name, dim in zip(axes, shape):
    mesh_axis = LOGICAL_RULES.get(name) if name else None
    if mesh_axis is not None and axis_sizes[mesh_axis] > 1 and dim % axis_sizes[mesh_axis] == 0:
      spec.append(mesh_axis)
    else:
      spec.append(None)
  return P(*spec)


def param_shardings(abstract_params: nnx.State, mesh: Mesh):
  """NamedShardings for a params `nnx.State` (pure-dict tree), from each Param's logical axes."""

  def one(var):
    axes = var.get_metadata().get("logical_axes")
    return NamedSharding(mesh, logical_to_spec(axes, var.get_value().shape, mesh.shape))

  shardings = jax.tree.map(one, abstract_params, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.to_pure_dict(shardings)


def batch_spec(ndim: int, *, batch_dim: int = 0) -> P:
  spec = [None] * ndim
  spec[batch_dim] = BATCH_AXES
  return P(*spec)


def lane_shardings(tree, mesh: Mesh, *, batch_dim: int = 0):
  """Shard every array's `batch_dim` over (data, fsdp): model states and batches."""
  return jax.tree.map(lambda x: NamedSharding(mesh, batch_spec(np.ndim(x), batch_dim=batch_dim)), tree)


def replicated(tree, mesh: Mesh):
  return jax.tree.map(lambda _: NamedSharding(mesh, P()), tree)


def num_batch_shards(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def context_parallel_size() -> int:
  """Devices on the `sequence` axis of the mesh in context (`jax.set_mesh`), 1 if none.

  The trainer traces its steps under `jax.set_mesh(mesh)`; layers that have a
  context-parallel form (ring attention, the sequence-parallel recurrence) check
  this at trace time and wrap themselves in `over_sequence`.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or SEQUENCE_AXIS not in mesh.axis_names:
    return 1
  if SEQUENCE_AXIS in getattr(mesh, "manual_axes", ()):  # already inside a shard_map over it
    return 1
  return mesh.shape[SEQUENCE_AXIS]


def over_sequence(fn, *, in_specs, out_specs):
  """`jax.shard_map` of `fn` over the `sequence` axis only (data, fsdp and tensor stay automatic).

  Specs name only `sequence` (e.g. `P(None, "sequence")` for `[batch, seq, ...]`, `P()` for
  arrays every sequence shard needs whole, such as a cache); batch sharding is left to XLA.
  """
  return jax.shard_map(fn, mesh=jax.sharding.get_abstract_mesh(), in_specs=in_specs, out_specs=out_specs,
                       axis_names={SEQUENCE_AXIS}, check_vma=False)


BATCH = "batch"  # in `over_mesh` specs: the dim split over the batch axes (data, fsdp)


def over_mesh(fn, *, in_specs, out_specs):
  """`fn` as one `jax.shard_map` over every mesh axis not already manual, for calls that must see per-device
  arrays: a Pallas kernel cannot be partitioned by XLA ("Mosaic kernels cannot be automatically
  partitioned"), so the layers run their Pallas paths through this.

  Specs name `BATCH` for the batch dim (split over data and fsdp where they divide it, else replicated) and
  `sequence` for a sequence dim split over that axis; every other dim, and every other axis (tensor), is
  replicated. With no mesh in context, or one whose free axes all have size 1, `fn` is called directly.
  """

  def call(*args):
    mesh = jax.sharding.get_abstract_mesh()
    manual = set(getattr(mesh, "manual_axes", ()))
    free = [] if mesh.empty else [a for a in mesh.axis_names if a not in manual]
    if all(mesh.shape[a] == 1 for a in free):
      return fn(*args)
    batch_axes = tuple(a for a in BATCH_AXES if a in free and mesh.shape[a] > 1)
    shards = int(np.prod([mesh.shape[a] for a in batch_axes]))
    for x, spec in zip(args, in_specs):
      if any(name == BATCH and x.shape[dim] % shards for dim, name in enumerate(spec)):
        batch_axes = ()  # a batch the batch axes do not divide: every device runs all of it
    concrete = lambda spec: P(*[(batch_axes or None) if name == BATCH else name for name in spec])
    outs = concrete(out_specs) if isinstance(out_specs, P) else tuple(concrete(s) for s in out_specs)
    return jax.shard_map(fn, mesh=mesh, in_specs=tuple(concrete(s) for s in in_specs), out_specs=outs,
                         axis_names=set(free), check_vma=False)(*args)

  return call


def describe(mesh: Mesh) -> str:
  return " x ".join(f"{a}={mesh.shape[a]}" for a in MESH_AXES) + f" ({mesh.size} devices)"


__all__ = ["MESH_AXES", "LOGICAL_RULES", "make_mesh", "mesh_shape", "param_shardings", "lane_shardings",
           "replicated", "batch_spec", "describe", "num_batch_shards", "context_parallel_size", "over_sequence",
           "SEQUENCE_AXIS"]
