"""Context parallelism: the `sequence` mesh axis shards each segment across devices.

Every registered model trains on fsdp 2 x tensor 2 x sequence 2 as on one device, running its own
context-parallel form, in the shared contract (tests/test_contract.py). Here: the baseline's ring cut to
the steps its window reaches, the joint kNN layer, and each memory model's attention layer against its
one-device form on inputs the training runs do not reach (documents starting inside the block, empty or
partly valid memories and buffers), values and gradients. The linear recurrence's sequence-parallel form
is tested on 2, 4 and 8 shards in tests/test_linear_recurrence.py.
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


def test_memorizing_joint_attention_matches_one_device(eight_devices):
  """knn_combine='joint' in every layer: its window is dense attention the SPMD partitioner splits along
  `sequence` (no hand-written ring), with the memory's stream positions on the same clock."""
  from longctx.models import MemorizingConfig

  cfg = MemorizingConfig(vocab_size=259, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, window=8,
                         block_len=16, memory_size=40, top_k=40, knn_combine="joint", knn_layers=[0, 1])
  contract.sharded_matches_one_device(cfg, eight_devices, seg_len=32, mesh=BLOCKWISE_MESH, steps=2)


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


def test_rmt_memory_attention_runs_the_ring(eight_devices, ring_steps):
  """A block of L=16 over 4 devices (4 tokens each), window 6 (3 of the 4 ring steps), m=2 read and write
  slots, a cache of 6 whose first 2 slots are another document's; lane 0 has a document starting at token 5,
  lane 1 one at token 12 (the write slots read only tokens 12..15 of lane 1).

  (Mutation, by hand: write slots that read only their own device's tokens, without the merge over the
  axis, fail here with a relative error of 0.6.)"""
  import jax.numpy as jnp
  from flax import nnx
  from longctx.layers.context import Context
  from longctx.models import RMTConfig
  from longctx.models.rmt import MemoryAttention

  L, m, W = 16, 2, 6
  cfg = RMTConfig(vocab_size=50, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, window=W, block_len=L,
                  num_memory=m, attention_block=4)
  mixer = MemoryAttention(cfg, layer=0, rngs=nnx.Rngs(0))
  doc = jnp.stack([(jnp.arange(L) >= 5), (jnp.arange(L) >= 12)]).astype(jnp.int32)
  ctx = Context.of(doc, jnp.array([4, 9]))  # 4 and 9 tokens of document 0 before the block

  def fn(h, cache_k, cache_v):
    return mixer(h, {"k": cache_k, "v": cache_v}, ctx)[0]

  _layer_matches_one_device(fn, [_normal(1, 2, 2 * m + L, 32), _normal(4, 2, W, 2, 8), _normal(5, 2, W, 2, 8)],
                            eight_devices)
  assert set(ring_steps) == {3}, ring_steps


def test_melodi_window_ring_matches_one_device(eight_devices):
  """W=16 tokens over 4 devices, S=3 memory slots, U=2 summary tokens, a FIFO; lane 0 has valid memory and a
  document starting at token 5, lane 1 an empty memory and one starting at token 12 (its summary reads only
  12..15)."""
  import jax.numpy as jnp
  from flax import nnx
  from longctx.layers.context import Context
  from longctx.models import MelodiConfig
  from longctx.models.melodi import MelodiAttention

  S, W, U, M = 3, 16, 2, 5
  cfg = MelodiConfig(vocab_size=50, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, block_len=W,
                     short_memory=S, summary_tokens=U, long_memory_size=M, long_append=1, long_layer=0,
                     attention_block=4)
  mixer = MelodiAttention(cfg, layer=0, rngs=nnx.Rngs(0))
  doc = jnp.stack([(jnp.arange(W) >= 5), (jnp.arange(W) >= 12)]).astype(jnp.int32)
  ctx = Context.of(doc, jnp.array([20, 0]))  # lane 1 starts a document: its short memory is empty
  valid = jnp.array([[False, True, True, True, True], [False] * M])

  def fn(xn, memory, fifo):
    return mixer.attend(xn, memory, ctx, long=(fifo, valid))

  _layer_matches_one_device(fn, [_normal(1, 2, W + U, 32), _normal(2, 2, S, 32), _normal(3, 2, M, 32)],
                            eight_devices)


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


def test_titans_mag_window_ring_matches_one_device(eight_devices):
  """Segment 16 over 4 devices (4 tokens each), window 6, a cache of 6 with 2 invalid slots, 3 persistent
  (key, value) pairs; a document starts at token 9 of lane 1."""
  import jax.numpy as jnp
  from flax import nnx
  from longctx.layers import Keys
  from longctx.layers.context import Context
  from longctx.models import TitansConfig
  from longctx.models.titans import MemoryAsGate

  seg, w, p = 16, 6, 3
  cfg = TitansConfig(vocab_size=50, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, window=w,
                     chunk_size=4, num_persistent=p, attention_block=4)
  mixer = MemoryAsGate(cfg, layer=0, rngs=nnx.Rngs(0))
  ctx = Context.of(jnp.stack([jnp.zeros(seg, jnp.int32), (jnp.arange(seg) >= 9).astype(jnp.int32)]),
                   jnp.array([4, 30]))

  def fn(q, k, v, cache_k, cache_v, pk, pv):
    wide = lambda t: jnp.broadcast_to(t, (2,) + t.shape)
    prefix = [Keys(wide(pk), wide(pv), q=q)]  # position-free, scored by the unrotated queries
    return mixer.attend(q, k, v, {"k": cache_k, "v": cache_v}, ctx, extra=prefix)

  _layer_matches_one_device(fn, [_normal(1, 2, seg, 4, 8), _normal(2, 2, seg, 2, 8), _normal(3, 2, seg, 2, 8),
                                 _normal(4, 2, w, 2, 8), _normal(5, 2, w, 2, 8), _normal(6, p, 2, 8),
                                 _normal(7, p, 2, 8)], eight_devices)


@pytest.mark.parametrize("name", ["transformer", "mamba", "mamba2"])
def test_pallas_kernels_sharded_match_one_device(name, eight_devices):
  """model.kernel=pallas (the TPU kernels, interpreted here) on fsdp 2 x tensor 2 x sequence 2 against 1 device:
  the kernels run in one shard_map over the whole mesh on each device's batch rows (sharding.over_mesh), as a
  real TPU needs (Mosaic kernels cannot be partitioned by XLA); the ring / sequence-parallel forms inside it."""
  from model_contract import sharded_matches_one_device

  from longctx.config import MeshConfig
  from longctx.models import tiny_config

  cfg = tiny_config(name, vocab_size=259, kernel="pallas")
  results = sharded_matches_one_device(cfg, eight_devices, seg_len=32, mesh=MeshConfig(data=1, fsdp=2, tensor=2,
                                                                                         sequence=2))
  trainer = results["8-trainer"]
  text = trainer._train_step.lower(trainer.abstract_train_state_sharded(), trainer.abstract_batch_sharded()).as_text()
  assert 'manual_axes={"data", "fsdp", "tensor", "sequence"}' in text, "the kernels did not run on per-device arrays"


def test_mamba_bf16_step_compiles_with_context_parallelism(eight_devices):
  """A bfloat16 train step of Mamba on a sequence axis: the parameters it passes whole into the sequence-parallel
  scan (A) have their gradients summed over the axis, which crashed XLA:CPU in bfloat16 ("Invalid binary
  instruction opcode copy"); they enter in float32."""
  from longctx.config import Config, DataConfig, TrainConfig
  from longctx.models import tiny_config
  from longctx.training.trainer import Trainer

  cfg = Config(model=tiny_config("mamba", vocab_size=64), data=DataConfig(source="synthetic", seg_len=32, batch_size=4),
               train=TrainConfig(steps=1, compute_dtype="bfloat16"), mesh=MeshConfig(data=1, fsdp=2, sequence=2))
  trainer = Trainer(cfg, devices=eight_devices[:4])
  assert trainer.compiled_train_step().memory_analysis() is not None
