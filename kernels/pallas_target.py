"""Which Pallas kernel a call runs, and whether the Pallas interpreter runs it: one rule for every kernel.

Each op with Pallas kernels has one written for TPUs (Mosaic TPU: VMEM scratch, a sequential grid axis,
8 x 128 tiles) and one for NVIDIA GPUs (the Triton backend: a grid of independent programs, `pl.load` /
`pl.store`, loops inside the program). The op's `impl` names one:

    "pallas"      the kernel for the platform the call runs on: TPU on a TPU, GPU on a GPU; on a CPU,
                  where neither compiles, the TPU kernel in the interpreter (the tests' way to check it)
    "pallas_tpu"  the TPU kernel        "pallas_gpu"  the GPU kernel

`interpret=None` interprets only on a CPU. A kernel is never interpreted on an accelerator unless the
caller asks for it (`interpret=True`), and with `interpret=None` a kernel for another accelerator is refused
with one line, so a slow fallback is never silent. `interpret=False` always compiles the named kernel: that
is how a CPU machine compiles the TPU kernel with the real TPU compiler (`lowering_platforms=("tpu",)`,
tests/compile_only.py) or lowers the GPU kernel to Triton IR.
"""

from __future__ import annotations

import jax

TARGETS = ("tpu", "gpu")
PALLAS_IMPLS = ("pallas", "pallas_tpu", "pallas_gpu")


def pallas_target(impl: str, interpret: bool | None, *, platform: str | None = None) -> tuple[str, bool]:
  """`(target, interpret)` for a Pallas `impl` (one of PALLAS_IMPLS) on `platform` (default: jax's backend)."""
  if impl not in PALLAS_IMPLS:
    raise ValueError(f"impl={impl!r} is not a Pallas impl {PALLAS_IMPLS}")
  platform = platform or jax.default_backend()
  if impl == "pallas":
    target = platform if platform in TARGETS else "tpu"
  else:
    target = impl[len("pallas_"):]
  if interpret is not None:
    return target, interpret
  interpret = platform not in TARGETS
  if not interpret and platform != target:
    raise ValueError(f"impl={impl!r}: the {target.upper()} Pallas kernel does not compile on a {platform} "
                     f"backend; use impl='xla', the kernel for this platform, or interpret=True (slow)")
  return target, interpret


__all__ = ["PALLAS_IMPLS", "TARGETS", "pallas_target"]
