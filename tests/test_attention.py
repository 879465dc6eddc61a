"""The one attention entry (layers/attention.py): its dense form against a per-query numpy loop, and the flash
and Pallas kernels against the dense form on several key blocks at once (a cache, the tokens, a
position-free prefix scored by other queries, slots with their own coordinates), values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from longctx.layers import attention as attn
from longctx.layers.attention import Keys, attention


def _inputs(seed, *, batch=2, seg, window, heads=4, kv_heads=2, head_dim=8, doc_rate=0.05, cache_valid_from=3):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((batch, seg, heads, head_dim), np.float32)
  k = rng.standard_normal((batch, window + seg, kv_heads, head_dim), np.float32)
  v = rng.standard_normal((batch, window + seg, kv_heads, head_dim), np.float32)
  q_doc = np.cumsum(rng.random((batch, seg)) < doc_rate, axis=1).astype(np.int32)
  cache_doc = np.where(np.arange(window) >= cache_valid_from, 0, -1)
  k_doc = np.concatenate([np.broadcast_to(cache_doc, (batch, window)), q_doc], axis=1).astype(np.int32)
  return tuple(map(jnp.asarray, (q, k, v, q_doc, k_doc)))


def _window_blocks(k, v, k_doc, *, window, seg):
  """[cache; tokens] as two blocks at positions 0 .. window + seg - 1 (queries at the last seg)."""
  pos = jnp.arange(window + seg)
  cache = Keys(k[:, :window], v[:, :window], pos=pos[:window], doc=k_doc[:, :window], window=window)
  tokens = Keys(k[:, window:], v[:, window:], pos=pos[window:], doc=k_doc[:, window:], window=window, sharded=True)
  return pos[window:], [cache, tokens]


def test_reference_matches_naive_loop():
  """The dense form of the sliding-window rule against a per-query numpy loop (the obvious definition)."""
  q, k, v, q_doc, k_doc = _inputs(3, batch=1, seg=12, window=4, heads=2, kv_heads=1)
  q_pos, blocks = _window_blocks(k, v, k_doc, window=4, seg=12)
  out = np.asarray(attention(q, blocks, q_pos=q_pos, q_doc=q_doc, kernel="reference"))
  q, k, v, q_doc, k_doc = map(np.asarray, (q, k, v, q_doc, k_doc))
  expect = np.zeros_like(out)
  for i in range(12):
    p = 4 + i
    keys = [j for j in range(p - 4, p + 1) if k_doc[0, j] == q_doc[0, i] and k_doc[0, j] >= 0]
    for h in range(2):
      s = np.array([q[0, i, h] @ k[0, j, 0] for j in keys]) / np.sqrt(8)
      w = np.exp(s - s.max())
      w /= w.sum()
      expect[0, i, h] = sum(wj * v[0, j, 0] for wj, j in zip(w, keys))
  assert rel_err(out, expect) < 1e-5


def _mixed(seed, *, seg, window, prefix=3, slots=2):
  """Queries over a cache, the tokens, a position-free prefix scored by other (unrotated) queries, and
  slots seen at the queries' own coordinates (each query at slot position 1 sees slots 0 and 1 only)."""
  q, k, v, q_doc, k_doc = _inputs(seed, seg=seg, window=window)
  rng = np.random.default_rng(seed + 1)
  b = q.shape[0]
  q_raw = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
  pk, pv = (jnp.asarray(rng.standard_normal((b, prefix, 2, 8)), jnp.float32) for _ in range(2))
  sk, sv = (jnp.asarray(rng.standard_normal((b, slots, 2, 8)), jnp.float32) for _ in range(2))
  q_pos, blocks = _window_blocks(k, v, k_doc, window=window, seg=seg)
  blocks = [Keys(pk, pv, q=q_raw), *blocks,
            Keys(sk, sv, pos=jnp.arange(slots), doc=jnp.zeros((b, slots), jnp.int32), q_pos=jnp.ones(seg, jnp.int32),
                 q_doc=jnp.zeros((b, seg), jnp.int32))]
  return q, blocks, q_pos, q_doc


@pytest.mark.parametrize("kernel", ["xla", "pallas"])
@pytest.mark.parametrize("seg,window,block", [(37, 8, 8), (64, 16, 16), (50, 5, 12), (9, 4, 128)])
def test_kernels_match_the_dense_form(kernel, seg, window, block):
  """Four key blocks of three kinds, merged by log-sum-exp, against one dense softmax over their union;
  blocks smaller and larger than the window, lengths that are not multiples of the block."""
  q, blocks, q_pos, q_doc = _mixed(seg + window, seg=seg, window=window)
  ref = attention(q, blocks, q_pos=q_pos, q_doc=q_doc, kernel="reference")
  got = attention(q, blocks, q_pos=q_pos, q_doc=q_doc, kernel=kernel, block_size=block)
  assert got.shape == ref.shape and rel_err(got, ref) < 1e-5


def test_gradients_match_the_dense_form():
  q, blocks, q_pos, q_doc = _mixed(7, seg=40, window=8)
  w = jnp.asarray(np.random.default_rng(99).standard_normal(q.shape), np.float32)

  def loss(kernel, q, ks, vs):
    bs = [Keys(k, v, pos=b.pos, doc=b.doc, window=b.window, q=b.q, q_pos=b.q_pos, q_doc=b.q_doc)
          for b, k, v in zip(blocks, ks, vs)]
    return jnp.sum(attention(q, bs, q_pos=q_pos, q_doc=q_doc, kernel=kernel, block_size=8) * w)

  args = (q, [b.k for b in blocks], [b.v for b in blocks])
  g_ref = jax.jit(jax.grad(lambda *a: loss("reference", *a), argnums=(0, 1, 2)))(*args)
  g_fast = jax.jit(jax.grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2)))(*args)
  for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_ref)):
    assert rel_err(a, b) < 1e-5


def test_a_query_that_sees_nothing_gets_zero():
  q, k, v, q_doc, k_doc = _inputs(5, seg=6, window=2)
  blocks = [Keys(k[:, :2], v[:, :2], pos=jnp.arange(2), doc=jnp.full((2, 2), -1, jnp.int32))]
  for kernel in ("reference", "xla"):
    out, lse = attention(q, blocks, q_pos=jnp.arange(2, 8), q_doc=q_doc, kernel=kernel, return_lse=True)
    assert not np.any(np.asarray(out)) and np.all(np.isneginf(np.asarray(lse))), kernel


def test_rotary_depends_only_on_relative_position():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 2, 1, 16), np.float32))

  def score(pq, pk):
    q = attn.rotary(x[:, :1], jnp.array([pq]))
    k = attn.rotary(x[:, 1:], jnp.array([pk]))
    return float(jnp.sum(q * k))

  assert abs(score(10, 3) - score(1007, 1000)) < 1e-4


def test_default_tile_shrinks_on_the_cpu_xla_path_only():
  """`default_block`: 128 (the Pallas tile), halved on the XLA path on a CPU while a tile's f32 scores
  `[batch, heads, block, block]` exceed 2 MiB, never below 32; the result does not depend on the tile."""
  from longctx.layers.kernel import Implementation
  q = lambda b, h: jnp.zeros((b, 8, h, 16))
  xla, pallas = Implementation("xla"), Implementation("pallas", interpret=True)
  assert attn.default_block(q(16, 8), xla) == 64  # 8 MiB at 128, 2 MiB at 64
  assert attn.default_block(q(4, 8), xla) == 128  # 2 MiB at 128
  assert attn.default_block(q(512, 64), xla) == 32
  assert attn.default_block(q(16, 8), pallas) == 128
  inputs = _inputs(4, batch=2, seg=40, window=24, heads=4, kv_heads=2)
  q_pos, blocks = _window_blocks(inputs[1], inputs[2], inputs[4], window=24, seg=40)
  run = lambda block: attention(inputs[0], blocks, q_pos=q_pos, q_doc=inputs[3], kernel="xla", block_size=block)
  assert rel_err(run(None), run(128)) < 1e-6 and rel_err(run(16), run(128)) < 1e-6
