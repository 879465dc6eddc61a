"""The flash attention Pallas kernels through the real compilers (no accelerator needed).

TPU: forward, dq and dk/dv kernels (a forward plus `jax.grad` through the output and the lse) compiled by Mosaic
+ XLA:TPU for a v5p chip: float32 and bfloat16, head dims 64 and 128, grouped-query heads (4 over 2), with and
without a window, documents, ragged lengths (not a multiple of the block), blocks smaller than a vreg row; and
ring attention in `jax.shard_map` over the 4 chips of a v5p 2x2x1 slice. GPU: the same kernels lowered to
Triton IR (the last step, Triton's own compile to PTX, needs a GPU). The math is checked in
tests/test_ring_attention.py; this file checks that the compilers accept it.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import compile_only
from compile_only import cuda_lower
from longctx.kernels import ring_attention as ra


def _shapes(dtype, *, batch=2, seq=1000, heads=4, kv_heads=2, head_dim=64):
  return [((batch, seq, heads, head_dim), dtype), ((batch, seq, kv_heads, head_dim), dtype),
          ((batch, seq, kv_heads, head_dim), dtype), ((seq,), jnp.int32), ((batch, seq), jnp.int32)]


def _forward_and_grad(impl, *, window, block_q=128, block_k=128):
  """(out, lse) and the gradients of q, k, v through both: the forward, dq and dk/dv kernels."""

  def run(q, k, v, pos, doc):
    return ra.flash_attention(q, k, v, q_pos=pos, k_pos=pos, q_doc=doc, k_doc=doc, window=window, block_q=block_q,
                              block_k=block_k, impl=impl, interpret=False, return_lse=True)

  def loss(q, k, v, pos, doc):
    out, lse = run(q, k, v, pos, doc)
    return jnp.sum(out.astype(jnp.float32) ** 2) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

  return lambda *args: (run(*args), jax.grad(loss, argnums=(0, 1, 2))(*args))


KERNELS = {"flash_attention_forward", "flash_attention_dq", "flash_attention_dkv"}


def _kernels(text):
  """Names of the Pallas kernels in a lowered module (TPU custom calls and Triton calls both carry them)."""
  return set(re.findall(r'name = \\?"(flash_attention_\w+)', text))


def _tpu_lowered(fn, shapes):
  return jax.jit(fn).trace(*compile_only.on_tpu(*shapes)).lower(lowering_platforms=("tpu",))


# (dtype, head_dim, window, seq, block_q, block_k)
TPU_CASES = [(jnp.float32, 128, None, 1000, 128, 128), (jnp.bfloat16, 64, 200, 1000, 128, 256),
             (jnp.bfloat16, 128, None, 300, 64, 128), (jnp.float32, 64, 48, 77, 16, 8)]


@pytest.mark.parametrize("dtype,head_dim,window,seq,block_q,block_k", TPU_CASES,
                         ids=lambda x: getattr(x, "__name__", str(x)))
def test_tpu_compiler_accepts_the_kernels(dtype, head_dim, window, seq, block_q, block_k):
  fn = _forward_and_grad("pallas_tpu", window=window, block_q=block_q, block_k=block_k)
  lowered = _tpu_lowered(fn, _shapes(dtype, seq=seq, head_dim=head_dim))
  assert _kernels(lowered.as_text()) == KERNELS
  lowered.compile()


def test_tpu_compiler_accepts_the_ring_over_four_chips():
  """`ring_attention` with the TPU kernels in `jax.shard_map` over a v5p 2x2x1 slice: the kernels, the
  ppermutes of the key/value blocks and their gradients, compiled for 4 chips."""
  compile_only.tpu_device()  # fails, with the reason, where libtpu is missing
  from jax.experimental import topologies

  devices = topologies.get_topology_desc(platform="tpu", topology_name=compile_only.TOPOLOGY).devices
  assert len(devices) == 4
  mesh = Mesh(np.array(devices), ("seq",))
  seq = P(None, "seq")

  def ring(q, k, v, pos, doc):
    return ra.ring_attention(q, k, v, axis_name="seq", q_pos=pos, k_pos=pos, q_doc=doc, k_doc=doc, window=300,
                             num_steps=ra.ring_steps_for_window(300, 256, 4), impl="pallas_tpu", interpret=False,
                             return_lse=True)

  sharded = jax.shard_map(ring, mesh=mesh, in_specs=(seq, seq, seq, P("seq"), seq),
                          out_specs=(seq, P(None, None, "seq")), check_vma=False)

  def loss(*args):
    out, lse = sharded(*args)
    return jnp.sum(out.astype(jnp.float32) ** 2) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

  specs = (seq, seq, seq, P("seq"), seq)
  args = [jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))
          for (shape, dtype), spec in zip(_shapes(jnp.bfloat16, seq=1024, head_dim=128), specs)]
  fn = lambda *args: (sharded(*args), jax.grad(loss, argnums=(0, 1, 2))(*args))
  lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",))
  text = lowered.as_text()
  assert _kernels(text) == KERNELS and "collective_permute" in text
  lowered.compile()


# (dtype, head_dim, window, seq)
GPU_CASES = [(jnp.float32, 64, None, 1000), (jnp.bfloat16, 128, 200, 1000), (jnp.float16, 80, 32, 77)]


@pytest.mark.parametrize("dtype,head_dim,window,seq", GPU_CASES, ids=lambda x: getattr(x, "__name__", str(x)))
def test_gpu_kernels_lower_to_triton(dtype, head_dim, window, seq):
  text = cuda_lower(_forward_and_grad("pallas_gpu", window=window), *_shapes(dtype, seq=seq, head_dim=head_dim))
  assert _kernels(text) == KERNELS
