"""The linear-recurrence Pallas kernels through the real compilers (no accelerator needed).

TPU: each decay kind's forward kernel and training kernels (the forward that saves chunk states, and the
backward) compiled by Mosaic + XLA:TPU for a v5p chip, f32 and bf16, head dims 64 and 128, a length that is
not a multiple of the chunk, documents. GPU: the same lowered to Triton IR (the last step, Triton's own
compile to PTX, needs a GPU: scripts/check_accelerator.py). The math is checked in
tests/test_linear_recurrence.py; this file checks that the compilers accept it.
"""

import functools

import jax
import jax.numpy as jnp
import pytest

from compile_only import cuda_lower, tpu_compile
from longctx.kernels import linear_recurrence as lr

KINDS = {"none": (None, False), "scalar": ("head", False), "vector": ("channel", False), "delta": (None, True),
         "gated_delta": ("head", True)}


def _shapes(kind, dtype, *, batch=2, seq=1000, heads=4, head_dim=64):
  decay, delta = KINDS[kind]
  shapes = [((batch, seq, heads, head_dim), dtype)] * 3 + [((batch, seq), jnp.int32)]
  if decay:
    shapes.append(((batch, seq, heads) + ((head_dim,) if decay == "channel" else ()), jnp.float32))
  if delta:
    shapes.append(((batch, seq, heads), jnp.float32))
  return shapes


def _train_and_infer(kind, impl):
  """(outputs, gradients of every float input): the inference kernel and both training kernels."""
  decay, delta = KINDS[kind]

  def run(q, k, v, segment_ids, *rest):
    rest = list(rest)
    log_decay = rest.pop(0) if decay else None
    beta = rest.pop(0) if delta else None
    return lr.linear_recurrence(q, k, v, log_decay=log_decay, beta=beta, segment_ids=segment_ids, impl=impl,
                                interpret=False, chunk_size=64)

  def loss(*args):
    out, state = run(*args)
    return jnp.sum(out.astype(jnp.float32) ** 2) + jnp.sum(state)

  def both(*args):
    diff = (0, 1, 2) + tuple(range(4, len(args)))
    return run(*args), jax.grad(loss, argnums=diff)(*args)

  return both


CASES = [(kind, jnp.float32, 64) for kind in KINDS] + [("scalar", jnp.bfloat16, 64), ("gated_delta", jnp.bfloat16, 64),
                                                      ("scalar", jnp.bfloat16, 128), ("vector", jnp.float32, 128)]


@pytest.mark.parametrize("kind,dtype,head_dim", CASES, ids=lambda x: getattr(x, "__name__", str(x)))
def test_tpu_compiler_accepts_the_kernels(kind, dtype, head_dim):
  tpu_compile(_train_and_infer(kind, "pallas_tpu"), *_shapes(kind, dtype, head_dim=head_dim))


@pytest.mark.parametrize("kind,dtype,head_dim", CASES, ids=lambda x: getattr(x, "__name__", str(x)))
def test_gpu_kernels_lower_to_triton(kind, dtype, head_dim):
  text = cuda_lower(_train_and_infer(kind, "pallas_gpu"), *_shapes(kind, dtype, head_dim=head_dim))
  assert text.count("__gpu$xla.gpu.triton") == 3, "expected the forward, the saving forward and the backward kernel"


def test_the_tpu_kernel_accepts_an_odd_head_dim_and_a_short_chunk():
  """Mosaic's tiling is met for any head dim and any chunk that is a multiple of 8."""
  fn = functools.partial(lr.linear_recurrence, impl="pallas_tpu", interpret=False, chunk_size=8)
  tpu_compile(lambda q, k, v, la: fn(q, k, v, log_decay=la), ((1, 37, 2, 24), jnp.float32),
              ((1, 37, 2, 24), jnp.float32), ((1, 37, 2, 40), jnp.float32), ((1, 37, 2), jnp.float32))
