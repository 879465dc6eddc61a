"""The one backend switch: `model.kernel`, resolved per platform here and nowhere else.

    "reference"  the obvious form each kernel is tested against: dense attention, the token-by-token
                 recurrence (slow; the oracle, and what a new platform can always run)
    "xla"        the blockwise / chunked pure-JAX forms (flash attention, the chunked recurrence)
    "pallas"     the Pallas kernels in kernels/, the platform's own (kernels/pallas_target.py): compiled on
                 a platform in `PALLAS_PLATFORMS[op]`, refused on any other accelerator, and on a CPU the
                 TPU kernel run by the Pallas interpreter (the tests' way to check them)
    "auto"       Pallas where it is known to compile for the platform (`PALLAS_PLATFORMS`) and was not measured
                 slower than XLA there (`AUTO_KEEPS_XLA`), XLA elsewhere

Algorithm choices that are not backends stay fields of the model that has them (RetNet's parallel or
chunked retention, Mamba's fused, associative or chunked scan).
"""

from __future__ import annotations

import contextlib
import dataclasses

import jax

from longctx.config import KERNELS
from longctx.errors import ConfigError
from longctx.kernels.pallas_target import TARGETS


# The linear recurrence is two ops here: its decay forms and its delta rule have different kernels' speed.
OPS = ("attention", "linear_recurrence", "delta_rule", "selective_scan")

# Platforms on which each op's Pallas kernel is known to compile. TPU: every kernel compiles with the TPU
# compiler for a v5p chip (tests/test_compile_*.py, compile-only: none has run on a TPU yet). GPU: the
# attention and linear-recurrence Triton kernels compiled and matched their references on an H200; the
# selective-scan Triton kernels lower to Triton IR (tests/test_compile_selective_scan.py) but have not been
# compiled to PTX on a GPU yet, so they are not listed.
PALLAS_PLATFORMS: dict[str, tuple[str, ...]] = {"attention": ("tpu", "gpu"), "linear_recurrence": ("tpu", "gpu"),
                                                  "delta_rule": ("tpu", "gpu"), "selective_scan": ("tpu",)}

# Where "auto" keeps XLA although the Pallas kernel compiles, because it was measured slower: the delta rule's
# Triton kernel (one program per batch row and head, the chunk's triangular solve sequential inside) took 3.4x
# the XLA path's time on an H200 (bf16, batch 4 x 4096 tokens x 16 heads of 64).
AUTO_KEEPS_XLA: dict[str, tuple[str, ...]] = {"delta_rule": ("gpu",)}


_TARGET_PLATFORM: str | None = None


@contextlib.contextmanager
def compiling_for(platform: str):
  """Resolve kernels for `platform` rather than jax's backend while compiling ahead of time for another one
  (`longctx train --dry-run --tpu-topology` compiles on a CPU what a TPU would run: its Pallas kernels)."""
  global _TARGET_PLATFORM
  previous, _TARGET_PLATFORM = _TARGET_PLATFORM, platform
  try:
    yield
  finally:
    _TARGET_PLATFORM = previous


@dataclasses.dataclass(frozen=True)
class Implementation:
  """What a kernel call runs: `impl` for the kernels' switch ("reference", "xla" or "pallas") and, for
  Pallas, whether the interpreter runs it."""

  impl: str
  interpret: bool = False


def chunk_problem(op: str, target: str, chunk_size: int | None) -> str | None:
  """Why the `target` ("tpu" / "gpu") Pallas kernel of a chunked `op` cannot run chunks of `chunk_size`, or None."""
  if chunk_size is None or op == "attention":
    return None  # attention rounds its blocks to the kernel's tiles itself
  if target == "gpu" and op != "selective_scan" and (chunk_size < 16 or chunk_size & (chunk_size - 1)):
    return "a power of two >= 16 (Triton's tiles)"
  if chunk_size % 8:
    return "a multiple of 8 (the sublane tile)"
  return None


def current_platform() -> str:
  """The platform kernels are chosen for: the one `compiling_for` names, else jax's default backend."""
  return _TARGET_PLATFORM or jax.default_backend()


def resolve(kernel: str, op: str, *, platform: str | None = None, chunk_size: int | None = None) -> Implementation:
  """The implementation `kernel` ("auto", "reference", "xla" or "pallas") means for `op` on `platform`
  (default: the one `compiling_for` names, else jax's default backend). For the chunked ops `chunk_size` is the model's: "auto" keeps XLA where
  the platform's kernel cannot run it, and "pallas" is refused there in one line."""
  if kernel not in KERNELS:
    raise ConfigError(f"model.kernel={kernel!r} is not one of {KERNELS}")
  if op not in OPS:
    raise ValueError(f"op={op!r} is not one of {OPS}")
  platform = platform or current_platform()
  target = platform if platform in TARGETS else "tpu"  # on a CPU the TPU kernel runs in the interpreter
  if kernel == "auto":
    fast = platform in PALLAS_PLATFORMS[op] and platform not in AUTO_KEEPS_XLA.get(op, ())
    kernel = "pallas" if fast and not chunk_problem(op, target, chunk_size) else "xla"
  if kernel != "pallas":
    return Implementation(kernel)
  if platform in TARGETS and platform not in PALLAS_PLATFORMS[op]:
    raise ConfigError(f"model.kernel='pallas': the {op} Pallas kernel is not known to compile on {platform} "
                      f"(it does on: {', '.join(PALLAS_PLATFORMS[op]) or 'none yet'}); use model.kernel=xla (or auto)")
  problem = chunk_problem(op, target, chunk_size)
  if problem:
    raise ConfigError(f"model.kernel='pallas': the {op} {target.upper()} kernel needs model.chunk_size={chunk_size} "
                      f"to be {problem}; set model.chunk_size=64 or model.kernel=xla")
  return Implementation("pallas", interpret=platform not in TARGETS)
