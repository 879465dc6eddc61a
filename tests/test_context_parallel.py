"""Context parallelism: the `sequence` mesh axis shards each segment across devices.

For every model with a context-parallel form, three train steps on a mesh with
sequence > 1 give the same losses, gradients, updated parameters and carried
state as one device (`model_contract.sharded_matches_one_device`), and the
compiled step really runs the sharded form (its collectives are in the HLO),
not XLA gathering the segment onto every device. The blockwise memory models
run on fsdp 2 x tensor 2 x sequence 2 with documents starting inside blocks.
"""

import jax
import pytest

import model_contract as contract
from longctx.config import MeshConfig
from longctx.models import TransformerConfig


_runs_sharded_form = contract.runs_context_parallel_form


BLOCKWISE_MESH = MeshConfig(data=1, fsdp=2, tensor=2, sequence=2)


@pytest.fixture
def ring_steps(monkeypatch):
  """The `num_steps` of every ring the traced step runs (recorded at trace time)."""
  from longctx.kernels import ring_attention as ra

  seen, ring = [], ra.ring_attention

  def recording(*args, num_steps=None, **kwargs):
    seen.append(num_steps)
    return ring(*args, num_steps=num_steps, **kwargs)

  monkeypatch.setattr(ra, "ring_attention", recording)
  return seen


@pytest.mark.parametrize("window,seq_devices,steps", [(20, 4, 4), (12, 8, 4)],
                         ids=["4-shards-full-ring", "8-shards-cut-ring"])
def test_transformer_ring_matches_one_device(window, seq_devices, steps, eight_devices, ring_steps):
  """Segments of 32: over 4 devices (8 tokens each) a window of 20 needs all 4 ring steps; over 8 devices
  (4 tokens each) a window of 12 needs 4 of the 8, and the ring is cut to those 4 (checked: every ring
  traced runs 4 steps; a full ring would also pass the comparison, only slower)."""
  cfg = TransformerConfig(vocab_size=259, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, window=window,
                          attention_block=4)
  mesh = MeshConfig(data=8 // seq_devices, sequence=seq_devices)
  results = contract.sharded_matches_one_device(cfg, eight_devices, seg_len=32, mesh=mesh)
  assert _runs_sharded_form(results["8-trainer"])
  assert ring_steps and set(ring_steps) == {steps}, ring_steps


def test_memorizing_local_attention_runs_the_ring(eight_devices):
  """fsdp 2 x tensor 2 x sequence 2, documents starting inside blocks (align 0).

  top_k = memory_size: the kNN search keeps every slot, so the comparison is continuous in the inputs.
  With top_k=4 step 1 matched (every gradient leaf within 9e-7) but at step 2 every leaf was off by ~1e-4
  (knn_gate 3e-4): the ring's different rounding (~1e-7 in the parameters after one update) swapped a
  near-tied 4th and 5th memory slot somewhere, a discrete jump no tolerance should hide; with top_k=40
  every leaf stays within 1.5e-6 at all three steps. The top-k search itself is compared on identical
  inputs, sharded and not, in tests/test_memorizing.py."""
  from longctx.models import MemorizingConfig

  cfg = MemorizingConfig(vocab_size=259, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, window=8,
                         block_len=16, memory_size=40, top_k=40, attention_block=4)
  results = contract.sharded_matches_one_device(cfg, eight_devices, seg_len=32, mesh=BLOCKWISE_MESH)
  assert _runs_sharded_form(results["8-trainer"])


def test_memorizing_joint_attention_matches_one_device(eight_devices):
  """knn_combine='joint' in every layer: its window is dense attention the SPMD partitioner splits along
  `sequence` (no hand-written ring), with the memory's stream positions on the same clock."""
  from longctx.models import MemorizingConfig

  cfg = MemorizingConfig(vocab_size=259, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, window=8,
                         block_len=16, memory_size=40, top_k=40, knn_combine="joint", knn_layers=[0, 1])
  contract.sharded_matches_one_device(cfg, eight_devices, seg_len=32, mesh=BLOCKWISE_MESH, steps=2)


def _recurrent_configs():
  from longctx.models import Mamba2Config, MambaConfig, RetNetConfig

  return {
      "retnet": RetNetConfig(vocab_size=259, d_model=32, num_layers=2, num_heads=4, chunk_size=4),
      "mamba2": Mamba2Config(vocab_size=259, d_model=32, num_layers=2, head_dim=16, state_size=8, chunk_size=4),
      "mamba": MambaConfig(vocab_size=259, d_model=32, num_layers=2, state_size=8, chunk_size=4),
  }


@pytest.mark.parametrize("name", ["retnet", "mamba2", "mamba"])
def test_linear_recurrence_models_run_sequence_parallel(name, eight_devices):
  """Segments of 32 over 4 devices, with documents starting inside segments (real lanes)."""
  results = contract.sharded_matches_one_device(_recurrent_configs()[name], eight_devices, seg_len=32,
                                                mesh=MeshConfig(data=2, sequence=4))
  assert _runs_sharded_form(results["8-trainer"])


def test_rmt_block_tokens_run_the_ring(eight_devices):
  """Blocks of 16 over fsdp 2 x tensor 2 x sequence 2 (8 tokens each), a window of 6, 4 memory slots,
  documents starting inside blocks (align 0). The ring cut short is the layer test below."""
  from longctx.models import RMTConfig

  cfg = RMTConfig(vocab_size=259, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, window=6, block_len=16,
                  num_memory=4, attention_block=4)
  results = contract.sharded_matches_one_device(cfg, eight_devices, seg_len=32, mesh=BLOCKWISE_MESH)
  assert _runs_sharded_form(results["8-trainer"])


# ----------------------------------------------------------------------------- memory models' attention layers
# Each context-parallel attention layer against its own one-device form, on inputs the training tests above
# do not reach: documents starting inside the block, empty or partly valid memories and buffers. Values and
# the gradients of every float input.


def _layer_matches_one_device(fn, floats, devices, *, n=4, tol=1e-5):
  """fn(*floats) -> array; run without a mesh and on a `sequence` mesh of n devices, compare values and grads."""
  import numpy as np
  import jax.numpy as jnp
  from jax.sharding import Mesh

  out_shape = jax.eval_shape(fn, *floats)
  cot = jax.random.normal(jax.random.key(7), out_shape.shape, jnp.float32)
  loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * cot)
  both = lambda *a: (fn(*a), jax.grad(loss, argnums=tuple(range(len(a))))(*a))
  ref = jax.jit(both)(*floats)
  with jax.set_mesh(Mesh(np.array(devices[:n]), ("sequence",))):
    lowered = jax.jit(both).lower(*floats)
    assert "manual_computation" in lowered.as_text(), "the context-parallel form did not run"
    got = lowered.compile()(*floats)
  for name, r, g in zip(["out"] + [f"grad {i}" for i in range(len(floats))], jax.tree.leaves(ref),
                        jax.tree.leaves(got)):
    r, g = np.asarray(r), np.asarray(g)
    err = np.max(np.abs(r - g)) / max(np.max(np.abs(r)), 1e-30)
    assert err < tol, f"{name}: relative error {err:.2e}"


def _normal(key, *shape):
  return jax.random.normal(jax.random.key(key), shape)


def test_rmt_ring_attention_matches_dense(eight_devices, ring_steps):
  """A block of L=16 over 4 devices (4 tokens each), window 6 (3 of the 4 ring steps), m=2 read and write
  slots, a cache of 6 whose first 2 slots are empty; lane 0 has a document starting at token 5, lane 1 one
  at token 12 (the write slots read only tokens 12..15 of lane 1).

  (Mutation, by hand: write slots that read only their own device's tokens, without `merge_over_sequence`,
  fail here with a relative error of 0.6.)"""
  import jax.numpy as jnp
  from longctx.layers import masked_attention, rotary
  from longctx.models.rmt import rmt_mask, rmt_ring_attention

  L, m, W, h, kvh, dh = 16, 2, 6, 4, 2, 8
  q_doc = jnp.stack([(jnp.arange(L) >= 5), (jnp.arange(L) >= 12)]).astype(jnp.int32)
  cache_doc = jnp.where(jnp.arange(W)[None] >= 2, 0, -1).repeat(2, 0)

  def fn(q, k, v, cache_k, cache_v):
    if jax.sharding.get_abstract_mesh().empty:
      pos = jnp.arange(W + L)
      rot = jnp.concatenate([q[:, :m], rotary(q[:, m:m + L], pos[W:]), q[:, m + L:]], axis=1)
      k_all = jnp.concatenate([rotary(cache_k, pos[:W]), k[:, :m], rotary(k[:, m:m + L], pos[W:]), k[:, m + L:]],
                              axis=1)
      mask = rmt_mask(q_doc=q_doc, k_doc=jnp.concatenate([cache_doc, q_doc], axis=1), window=W, num_memory=m)
      return masked_attention(rot, k_all, jnp.concatenate([cache_v, v], axis=1), mask)
    return rmt_ring_attention(q, k, v, cache_k=cache_k, cache_v=cache_v, q_doc=q_doc, cache_doc=cache_doc, window=W,
                              num_memory=m, rope_base=10000.0, block=4)

  _layer_matches_one_device(fn, [_normal(1, 2, 2 * m + L, h, dh), _normal(2, 2, 2 * m + L, kvh, dh),
                                 _normal(3, 2, 2 * m + L, kvh, dh), _normal(4, 2, W, kvh, dh),
                                 _normal(5, 2, W, kvh, dh)], eight_devices)
  assert set(ring_steps) == {3}, ring_steps


def test_melodi_window_ring_matches_dense(eight_devices):
  """W=16 tokens over 4 devices, S=3 memory slots, U=2 summary tokens; lane 0 has valid memory and a document
  starting at token 5, lane 1 an empty memory and one starting at token 12 (its summary reads only 12..15)."""
  import jax.numpy as jnp
  from longctx.layers import masked_attention, rotary
  from longctx.models.melodi import melodi_mask, melodi_ring_attention

  S, W, U, h, kvh, dh = 3, 16, 2, 4, 2, 8
  q_doc = jnp.stack([(jnp.arange(W) >= 5), (jnp.arange(W) >= 12)]).astype(jnp.int32)
  short_valid = jnp.array([True, False])

  def fn(q, k, v):
    if jax.sharding.get_abstract_mesh().empty:
      pos = jnp.arange(S + W + U)
      mask = melodi_mask(q_doc, short_valid, short_memory=S, summary_tokens=U)
      return masked_attention(rotary(q, pos[S:]), rotary(k, pos), v, mask)
    return melodi_ring_attention(q, k, v, q_doc=q_doc, short_valid=short_valid, short_memory=S, rope_base=10000.0,
                                 block=4)

  _layer_matches_one_device(fn, [_normal(1, 2, W + U, h, dh), _normal(2, 2, S + W + U, kvh, dh),
                                 _normal(3, 2, S + W + U, kvh, dh)], eight_devices)


def test_infini_local_attention_ring_matches_dense(eight_devices):
  """A chunk of 8 over 4 devices after a partly filled buffer (offset 5 of a block of 8): lane 0 completes the
  block at chunk index 3 (labels 0 then 1), lane 1 starts a new document at index 6 (label 8)."""
  import jax.numpy as jnp
  from longctx.models.infini_attention import chunk_layout, local_attention

  block, c, h, dh = 8, 8, 4, 8
  offset = jnp.array([5, 2])
  q_doc = jnp.stack([jnp.zeros(c, jnp.int32), (jnp.arange(c) >= 6).astype(jnp.int32)])
  pos, label = chunk_layout(offset, q_doc, block_len=block)
  buf_valid = jnp.arange(block)[None] < offset[:, None]

  def fn(q, k, v, buf_k, buf_v):
    return local_attention(q, k, v, buf_k=buf_k, buf_v=buf_v, buf_valid=buf_valid, pos=pos, label=label,
                           rope_base=10000.0, block=4)

  _layer_matches_one_device(fn, [_normal(1, 2, c, h, dh), _normal(2, 2, c, h, dh), _normal(3, 2, c, h, dh),
                                 _normal(4, 2, block, h, dh), _normal(5, 2, block, h, dh)], eight_devices)


def test_titans_mag_window_ring_matches_dense(eight_devices):
  """Segment 16 over 4 devices (4 tokens each), window 6, a cache of 6 with 2 invalid slots, 3 persistent
  (key, value) pairs; a document starts at token 9 of lane 1."""
  import jax.numpy as jnp
  from longctx.layers import rotary
  from longctx.models.titans import window_prefix_attention, window_prefix_ring_attention

  seg, w, h, kvh, dh, p = 16, 6, 4, 2, 8, 3
  q_doc = jnp.stack([jnp.zeros(seg, jnp.int32), (jnp.arange(seg) >= 9).astype(jnp.int32)])
  cache_doc = jnp.where(jnp.arange(w)[None] >= 2, 0, -1).repeat(2, 0)

  def fn(q, k, v, cache_k, cache_v, pk, pv):
    if jax.sharding.get_abstract_mesh().empty:
      pos = jnp.arange(w + seg)
      k_all = rotary(jnp.concatenate([cache_k, k], axis=1), pos)
      return window_prefix_attention(rotary(q, pos[w:]), q, k_all, jnp.concatenate([cache_v, v], axis=1), pk, pv,
                                     q_doc=q_doc, k_doc=jnp.concatenate([cache_doc, q_doc], axis=1), window=w,
                                     block=None)
    return window_prefix_ring_attention(q, k, v, pk, pv, cache_k=cache_k, cache_v=cache_v, q_doc=q_doc,
                                        cache_doc=cache_doc, window=w, rope_base=10000.0, block=4)

  _layer_matches_one_device(fn, [_normal(1, 2, seg, h, dh), _normal(2, 2, seg, kvh, dh), _normal(3, 2, seg, kvh, dh),
                                 _normal(4, 2, w, kvh, dh), _normal(5, 2, w, kvh, dh), _normal(6, p, kvh, dh),
                                 _normal(7, p, kvh, dh)], eight_devices)
