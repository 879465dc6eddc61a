"""Mamba's fused selective-scan kernels through the real compilers (no accelerator needed): the TPU kernels
(forward, the state-saving forward and the backward) compiled for a v5p chip by Mosaic + XLA:TPU, the GPU ones
lowered to Triton IR. The math is checked in tests/test_selective_scan.py."""

import jax
import jax.numpy as jnp
import pytest

from compile_only import cuda_lower, tpu_compile
from longctx.kernels import selective_scan as ss

# (batch, seq, channels, state, chunk): several channel blocks; a ragged length with one partial block; tiny odd sizes
SHAPES = [(2, 1024, 256, 16, 64), (2, 1000, 96, 16, 64), (1, 37, 24, 4, 8)]


def _train_and_infer(impl, chunk):
  def run(x, dt, a, b, c, segment_ids, h0):
    return ss.selective_scan(x, dt, a, b, c, segment_ids=segment_ids, initial_state=h0, impl=impl, interpret=False,
                             chunk_size=chunk)

  def loss(*args):
    y, h = run(*args)
    return jnp.sum(y**2) + jnp.sum(h)

  return lambda *args: (run(*args), jax.grad(loss, argnums=(0, 1, 2, 3, 4, 6))(*args))


def _shapes(batch, seq, channels, state):
  f32 = jnp.float32
  return [((batch, seq, channels), f32)] * 2 + [((channels, state), f32)] + [((batch, seq, state), f32)] * 2 + [
      ((batch, seq), jnp.int32), ((batch, channels, state), f32)]


@pytest.mark.parametrize("batch,seq,channels,state,chunk", SHAPES)
def test_tpu_compiler_accepts_the_kernels(batch, seq, channels, state, chunk):
  tpu_compile(_train_and_infer("pallas_tpu", chunk), *_shapes(batch, seq, channels, state))


@pytest.mark.parametrize("batch,seq,channels,state,chunk", SHAPES)
def test_gpu_kernels_lower_to_triton(batch, seq, channels, state, chunk):
  text = cuda_lower(_train_and_infer("pallas_gpu", chunk), *_shapes(batch, seq, channels, state))
  assert text.count("__gpu$xla.gpu.triton") == 3, "expected the forward, the saving forward and the backward kernel"
