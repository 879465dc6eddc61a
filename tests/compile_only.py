"""Compiling kernels for hardware this machine does not have.

TPU: libtpu (installed with the test extra, `jax[tpu]`) holds the real TPU compiler; `jax.experimental.topologies`
describes a slice's chips without one, and `lower(lowering_platforms=("tpu",)).compile()` runs Mosaic and XLA:TPU
on them, so a kernel the TPU compiler rejects fails here exactly as it would on a TPU.

GPU: `lower(lowering_platforms=("cuda",))` runs the Pallas Triton lowering (our kernel -> Triton IR), which
catches everything but Triton's own compile to PTX (that needs a GPU: scripts/check_accelerator.py).
"""

from __future__ import annotations

import functools
import importlib.util
import sys

import jax
import pytest

TOPOLOGY = "v5p:2x2x1"


@functools.cache
def tpu_device():
  """One chip of a v5p slice for compile-only use; fails (not skips) when libtpu is missing on Linux."""
  if importlib.util.find_spec("libtpu") is None:
    if sys.platform != "linux":
      pytest.skip(f"libtpu (the TPU compiler) has no wheel for {sys.platform}; these checks run on Linux")
    pytest.fail('libtpu is missing: install the test extra (pip install -e ".[test]"), which brings jax[tpu]')
  from jax.experimental import topologies

  return topologies.get_topology_desc(platform="tpu", topology_name=TOPOLOGY).devices[0]


def on_tpu(*shapes):
  """ShapeDtypeStructs `(shape, dtype)` placed on the compile-only TPU chip."""
  sharding = jax.sharding.SingleDeviceSharding(tpu_device())
  return [jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for shape, dtype in shapes]


def tpu_compile(fn, *shapes) -> None:
  """Compile `fn` for a TPU v5p chip with the real compiler; raises its error if the kernel is rejected."""
  jax.jit(fn).trace(*on_tpu(*shapes)).lower(lowering_platforms=("tpu",)).compile()


def cuda_lower(fn, *shapes) -> str:
  """Lower `fn` for CUDA (Pallas kernels to Triton IR); returns the module text."""
  args = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in shapes]
  return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
