"""The one backend switch: `model.kernel`, resolved per platform here and nowhere else.

    "reference"  the obvious form each kernel is tested against: dense attention, the token-by-token
                 recurrence (slow; the oracle, and what a new platform can always run)
    "xla"        the blockwise / chunked pure-JAX forms (flash attention, the chunked recurrence)
    "pallas"     the Pallas kernels in kernels/, the platform's own (kernels/pallas_target.py): compiled on
                 a platform in `PALLAS_PLATFORMS[op]`, refused on any other accelerator, and on a CPU the
                 TPU kernel run by the Pallas interpreter (the tests' way to check them)
    "auto"       Pallas where it is known to compile for the platform (`PALLAS_PLATFORMS`), XLA elsewhere

Algorithm choices that are not backends stay fields of the model that has them (RetNet's parallel or
chunked retention, Mamba's associative or chunked scan).
"""

from __future__ import annotations

import dataclasses

import jax

from longctx.config import KERNELS
from longctx.errors import ConfigError
from longctx.kernels.pallas_target import TARGETS


OPS = ("attention", "linear_recurrence", "selective_scan")

# Platforms on which each op's Pallas kernel is known to compile (issue 24 adds them as their compile tests
# pass). attention: the Mosaic TPU kernels compile for a v5p chip and the Triton kernels lower for CUDA
# (tests/test_compile_attention.py).
PALLAS_PLATFORMS: dict[str, tuple[str, ...]] = {"attention": ("tpu", "gpu"), "linear_recurrence": (),
                                                  "selective_scan": ()}


@dataclasses.dataclass(frozen=True)
class Implementation:
  """What a kernel call runs: `impl` for the kernels' switch ("reference", "xla" or "pallas") and, for
  Pallas, whether the interpreter runs it."""

  impl: str
  interpret: bool = False


def resolve(kernel: str, op: str, *, platform: str | None = None) -> Implementation:
  """The implementation `kernel` ("auto", "reference", "xla" or "pallas") means for `op` on `platform`
  (default: jax's default backend)."""
  if kernel not in KERNELS:
    raise ConfigError(f"model.kernel={kernel!r} is not one of {KERNELS}")
  if op not in OPS:
    raise ValueError(f"op={op!r} is not one of {OPS}")
  platform = platform or jax.default_backend()
  if kernel == "auto":
    kernel = "pallas" if platform in PALLAS_PLATFORMS[op] else "xla"
  if kernel != "pallas":
    return Implementation(kernel)
  if platform in TARGETS and platform not in PALLAS_PLATFORMS[op]:
    raise ConfigError(f"model.kernel='pallas': the {op} Pallas kernel is not known to compile on {platform} "
                      f"(it does on: {', '.join(PALLAS_PLATFORMS[op]) or 'none yet'}); use model.kernel=xla (or auto)")
  return Implementation("pallas", interpret=platform not in TARGETS)
