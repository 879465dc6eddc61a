"""The blockwise sliding-window attention against the dense reference, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from longctx.layers import attention as attn


def _inputs(seed, *, batch=2, seg, window, heads=4, kv_heads=2, head_dim=8, doc_rate=0.05, cache_valid_from=3):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((batch, seg, heads, head_dim), np.float32)
  k = rng.standard_normal((batch, window + seg, kv_heads, head_dim), np.float32)
  v = rng.standard_normal((batch, window + seg, kv_heads, head_dim), np.float32)
  q_doc = np.cumsum(rng.random((batch, seg)) < doc_rate, axis=1).astype(np.int32)
  cache_doc = np.where(np.arange(window) >= cache_valid_from, 0, -1)
  k_doc = np.concatenate([np.broadcast_to(cache_doc, (batch, window)), q_doc], axis=1).astype(np.int32)
  return tuple(map(jnp.asarray, (q, k, v, q_doc, k_doc)))


@pytest.mark.parametrize("seg,window,block", [(37, 8, 8), (64, 16, 16), (50, 5, 12), (33, 16, 32), (9, 4, None)])
def test_blockwise_matches_dense(seg, window, block):
  q, k, v, q_doc, k_doc = _inputs(seg + window, seg=seg, window=window)
  fast = jax.jit(attn.sliding_window_attention, static_argnames=("window", "block"))(
      q, k, v, q_doc=q_doc, k_doc=k_doc, window=window, block=block)
  ref = jax.jit(attn.sliding_window_attention_reference, static_argnames=("window",))(
      q, k, v, q_doc=q_doc, k_doc=k_doc, window=window)
  assert fast.shape == ref.shape
  assert rel_err(fast, ref) < 1e-6


def test_blockwise_gradients_match_dense():
  q, k, v, q_doc, k_doc = _inputs(7, seg=40, window=8)
  w = jnp.asarray(np.random.default_rng(99).standard_normal(q.shape, np.float32))

  def loss(fn, q, k, v):
    return jnp.sum(fn(q, k, v, q_doc=q_doc, k_doc=k_doc, window=8) * w)

  g_fast = jax.jit(jax.grad(lambda *a: loss(lambda *b, **kw: attn.sliding_window_attention(*b, block=8, **kw), *a),
                    argnums=(0, 1, 2)))(q, k, v)
  g_ref = jax.jit(jax.grad(lambda *a: loss(attn.sliding_window_attention_reference, *a), argnums=(0, 1, 2)))(q, k, v)
  for a, b in zip(g_fast, g_ref):
    assert rel_err(a, b) < 1e-5


def test_reference_matches_naive_loop():
  """The dense reference against a per-query numpy loop (the obvious definition)."""
  q, k, v, q_doc, k_doc = _inputs(3, batch=1, seg=12, window=4, heads=2, kv_heads=1)
  out = np.asarray(jax.jit(attn.sliding_window_attention_reference, static_argnames=("window",))(
      q, k, v, q_doc=q_doc, k_doc=k_doc, window=4))
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


def test_rotary_depends_only_on_relative_position():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 2, 1, 16), np.float32))
  def score(pq, pk):
    q = attn.rotary(x[:, :1], jnp.array([pq]))
    k = attn.rotary(x[:, 1:], jnp.array([pk]))
    return float(jnp.sum(q * k))
  assert abs(score(10, 3) - score(1007, 1000)) < 1e-4


def test_kv_len_mismatch_is_a_clear_error():
  q, k, v, q_doc, k_doc = _inputs(0, seg=16, window=4)
  with pytest.raises(ValueError, match="kv_len = window \\+ q_len"):
    attn.sliding_window_attention(q, k, v, q_doc=q_doc, k_doc=k_doc, window=5)
