"""Blockwise (flash) and ring attention against dense causal attention.

Covers ragged lengths (not a multiple of the block), grouped-query heads,
packed documents, sliding windows, the log-sum-exp output and its cotangent,
gradients, the Pallas kernels for TPU and GPU (both interpreted on CPU: their
math; tests/test_compile_attention.py checks that the compilers accept them),
and the ring over 2, 4 and 8 CPU devices in contiguous, zig-zag and striped
layouts, including a ring cut short for a window.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from conftest import rel_err
from longctx.kernels import ring_attention as ra


def _inputs(seed, *, batch=2, seq=37, heads=4, kv_heads=2, head_dim=8, docs=True):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((batch, seq, heads, head_dim), np.float32)
  k = rng.standard_normal((batch, seq, kv_heads, head_dim), np.float32)
  v = rng.standard_normal((batch, seq, kv_heads, head_dim), np.float32)
  doc = np.cumsum(rng.random((batch, seq)) < 0.08, axis=1) if docs else np.zeros((batch, seq))
  return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.arange(seq), jnp.asarray(doc.astype(np.int32))


def _loss(fn):
  """A scalar touching every output element and the lse, so both cotangents are nonzero."""

  def loss(q, k, v):
    out, lse = fn(q, k, v)
    w = jnp.cos(jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape))
    seen = jnp.isfinite(lse)  # where twice: a -inf lse (a row that sees nothing) gets a zero cotangent, not NaN
    return jnp.sum(out * w) + jnp.sum(jnp.where(seen, jnp.sin(jnp.where(seen, lse, 0.0)), 0.0))

  return loss


def _dense(q, k, v, pos, doc, window):
  return ra.flash_attention(q, k, v, q_pos=pos, k_pos=pos, q_doc=doc, k_doc=doc, window=window, impl="reference",
                            return_lse=True)


def _loop_attention(q, k, v, q_pos, k_pos, q_doc, k_doc, window):
  """Attention in float64 numpy with the visibility rule written out key by key in a plain loop (nothing
  shared with `ra.visible_mask`): query i sees key j iff same document, j valid (doc >= 0), and
  0 <= pos_i - pos_j (<= window). Returns (out `[b, sq, h, d]`, lse `[b, h, sq]`; -inf where nothing seen)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  q_pos, k_pos, q_doc, k_doc = (np.asarray(x) for x in (q_pos, k_pos, q_doc, k_doc))
  b, sq, h, d = q.shape
  group = h // k.shape[2]
  out, lse = np.zeros((b, sq, h, d)), np.full((b, h, sq), -np.inf)
  for r in range(b):
    for i in range(sq):
      seen = []
      for j in range(k.shape[1]):
        dist = int(q_pos[i]) - int(k_pos[j])
        if q_doc[r, i] == k_doc[r, j] and k_doc[r, j] >= 0 and dist >= 0 and (window is None or dist <= window):
          seen.append(j)
      if not seen:
        continue
      for head in range(h):
        scores = k[r, seen, head // group] @ q[r, i, head] / np.sqrt(d)
        top = scores.max()
        weights = np.exp(scores - top)
        lse[r, head, i] = top + np.log(weights.sum())
        out[r, i, head] = weights @ v[r, seen, head // group] / weights.sum()
  return out, lse


def _reference_obeys_the_loop(q, k, v, q_pos, k_pos, q_doc, k_doc, window):
  ref_out, ref_lse = ra.flash_attention(q, k, v, q_pos=q_pos, k_pos=k_pos, q_doc=q_doc, k_doc=k_doc, window=window,
                                        impl="reference", return_lse=True)
  loop_out, loop_lse = _loop_attention(q, k, v, q_pos, k_pos, q_doc, k_doc, window)
  assert np.array_equal(np.isneginf(np.asarray(ref_lse)), np.isneginf(loop_lse)), "a different set of rows sees nothing"
  finite = np.isfinite(loop_lse)
  assert rel_err(np.asarray(ref_lse)[finite], loop_lse[finite]) < 1e-6 and rel_err(ref_out, loop_out) < 1e-5


def _matches_dense(fn, q, k, v, pos, doc, window):
  """`fn(q, k, v) -> (out, lse)` equals dense attention: outputs, lse and the gradients of q, k, v (f32, 1e-5);
  and the dense reference itself equals the plain-loop rule (`_loop_attention`), so a bug in the shared
  `visible_mask` cannot hide in both."""
  _reference_obeys_the_loop(q, k, v, pos, pos, doc, doc, window)
  out, lse = jax.jit(fn)(q, k, v)
  ref_out, ref_lse = _dense(q, k, v, pos, doc, window)
  assert out.shape == ref_out.shape and out.dtype == q.dtype
  assert rel_err(out, ref_out) < 1e-5 and rel_err(lse, ref_lse) < 1e-5
  grads = jax.jit(jax.grad(_loss(fn), argnums=(0, 1, 2)))(q, k, v)
  ref = jax.grad(_loss(lambda q, k, v: _dense(q, k, v, pos, doc, window)), argnums=(0, 1, 2))(q, k, v)
  for name, g, r in zip("qkv", grads, ref):
    assert rel_err(g, r) < 1e-5, name


PALLAS = ["pallas_tpu", "pallas_gpu"]


@pytest.mark.parametrize("impl", ["xla", *PALLAS])
@pytest.mark.parametrize("seq,block_q,block_k,window,head_dim", [(37, 8, 16, None, 8), (37, 16, 8, 5, 8),
                                                                 (64, 64, 64, None, 8), (23, 4, 4, 30, 8),
                                                                 (300, 64, 128, 70, 64)])
def test_flash_matches_dense(impl, seq, block_q, block_k, window, head_dim):
  """Grouped-query heads, packed documents, ragged lengths; the Pallas kernels round the blocks (to multiples of
  8 on TPU, powers of 2 >= 16 on GPU), so blocks of 4 and 8 exercise that, and 300 tokens many blocks."""
  q, k, v, pos, doc = _inputs(seq + block_q, seq=seq, head_dim=head_dim)
  flash = functools.partial(ra.flash_attention, q_pos=pos, k_pos=pos, q_doc=doc, k_doc=doc, window=window,
                            block_q=block_q, block_k=block_k, impl=impl, return_lse=True)
  _matches_dense(flash, q, k, v, pos, doc, window)


@pytest.mark.parametrize("impl", PALLAS)
def test_pallas_queries_over_other_keys(impl):
  """Queries that are not the keys: out-of-order (zig-zag) key positions, so the blocks a query block may see
  are not contiguous, invalid keys (document -1), fewer queries than keys, a window; values and gradients
  (the lse cotangent too) against dense attention."""
  rng = np.random.default_rng(3)
  q, k, v, _, _ = _inputs(4, seq=48, heads=4, kv_heads=1, head_dim=16)
  q = q[:, ::3]
  k_pos = jnp.asarray(ra.load_balance_order(48, 2, "zigzag"))
  q_pos = k_pos[::3] + 2
  k_doc = np.cumsum(rng.random((2, 48)) < 0.1, axis=1).astype(np.int32)
  k_doc[0, [3, 20, 21, 40]] = -1
  q_doc = jnp.asarray(k_doc[:, ::3].clip(0))
  k_doc = jnp.asarray(k_doc)
  ids = dict(q_pos=q_pos, k_pos=k_pos, q_doc=q_doc, k_doc=k_doc, window=20, return_lse=True)
  fn = lambda q, k, v: ra.flash_attention(q, k, v, block_q=8, block_k=8, impl=impl, **ids)
  ref = lambda q, k, v: ra.flash_attention(q, k, v, impl="reference", **ids)
  (out, lse), (ref_out, ref_lse) = jax.jit(fn)(q, k, v), ref(q, k, v)
  unseen = np.isneginf(np.asarray(ref_lse))
  assert unseen.any() and np.array_equal(np.isneginf(np.asarray(lse)), unseen), "a different set of rows sees nothing"
  assert rel_err(out, ref_out) < 1e-5 and rel_err(np.asarray(lse)[~unseen], np.asarray(ref_lse)[~unseen]) < 1e-5
  grads = jax.jit(jax.grad(_loss(fn), argnums=(0, 1, 2)))(q, k, v)
  for name, g, r in zip("qkv", grads, jax.grad(_loss(ref), argnums=(0, 1, 2))(q, k, v)):
    assert rel_err(g, r) < 1e-5, name


def test_pallas_means_this_platforms_kernel(monkeypatch):
  """On a CPU "pallas" is the TPU kernel, interpreted. A kernel for another accelerator than the one jax runs on
  is refused in one line (kernels/pallas_target.py), never silently interpreted; `interpret=False` compiles the
  named kernel whatever the backend (how tests/test_compile_attention.py compiles for TPU and GPU), so asked of
  the GPU kernel on a CPU it fails in the Pallas lowering rather than falling back."""
  q, k, v, pos, doc = _inputs(1, seq=12)
  opts = lambda impl: dict(ra._options(axis_name=None, window=None, scale=None, num_steps=None, block_q=8, block_k=8,
                                       impl=impl, interpret=None, q=q, k=k))
  assert (opts("pallas")["target"], opts("pallas")["interpret"]) == ("tpu", True)
  assert (opts("pallas_gpu")["target"], opts("pallas_gpu")["interpret"]) == ("gpu", True)
  assert (opts("xla")["target"], opts("xla")["interpret"]) == (None, False)
  args = dict(q_pos=pos, k_pos=pos, q_doc=doc, k_doc=doc, block_q=8, block_k=8)
  np.testing.assert_array_equal(ra.flash_attention(q, k, v, impl="pallas", **args),
                                ra.flash_attention(q, k, v, impl="pallas_tpu", **args))
  with pytest.raises(ValueError, match="Only interpret mode is supported on CPU"):
    jax.jit(lambda q, k, v: ra.flash_attention(q, k, v, impl="pallas_gpu", interpret=False, **args))(q, k, v)
  for backend, impl in (("gpu", "pallas_tpu"), ("tpu", "pallas_gpu")):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    other = impl[-3:].upper()
    with pytest.raises(ValueError, match=f"impl='{impl}': the {other} Pallas kernel does not compile on a {backend} "
                                         "backend") as err:
      ra.flash_attention(q, k, v, impl=impl, **args)
    assert "\n" not in str(err.value)
    mesh = Mesh(np.array(jax.devices()[:2]), ("seq",))
    ring = jax.shard_map(lambda q, k, v: ra.ring_attention(q, k, v, axis_name="seq", impl=impl, **args), mesh=mesh,
                         in_specs=P(), out_specs=P(), check_vma=False)
    with pytest.raises(ValueError, match=f"the {other} Pallas kernel does not compile"):
      ring(q, k, v)


@pytest.mark.parametrize("window", [None, 0, 3, 9])
def test_the_dense_reference_obeys_the_rule_written_as_a_plain_loop(window):
  """The oracle of every attention test, checked against the rule itself: positions out of order (a zig-zag
  layout), a query set that differs from the key set, invalid keys (document -1), grouped-query heads.

  (Mutation, by hand: `dist <= window` -> `dist < window` in `visible_mask` passed every flash and ring test,
  the reference sharing the mask; it fails here.)"""
  rng = np.random.default_rng(11 if window is None else window)
  q, k, v, _, _ = _inputs(5, seq=24)
  k_pos = jnp.asarray(ra.load_balance_order(24, 4, "zigzag"))
  q_pos = k_pos[::2] + 1
  k_doc = np.cumsum(rng.random((2, 24)) < 0.1, axis=1).astype(np.int32)
  k_doc[0, [3, 7, 8]] = -1
  q_doc = rng.integers(0, 3, (2, 12)).astype(np.int32)
  _reference_obeys_the_loop(q[:, ::2], k, v, q_pos, k_pos, jnp.asarray(q_doc), jnp.asarray(k_doc), window)


@pytest.mark.parametrize("impl", ["xla", *PALLAS])
def test_flash_skips_blocks_but_not_rows_that_see_nothing(impl):
  """Keys of another document, or all invalid: output 0, lse -inf, gradients 0 (no NaN)."""
  q, k, v, pos, _ = _inputs(3, seq=20)
  q_doc = jnp.zeros((2, 20), jnp.int32)
  k_doc = jnp.stack([jnp.full((20,), -1), jnp.ones((20,))]).astype(jnp.int32)  # row 0: invalid; row 1: other doc
  fn = functools.partial(ra.flash_attention, q_pos=pos, k_pos=pos, q_doc=q_doc, k_doc=k_doc, block_q=8, block_k=8,
                         impl=impl, return_lse=True)
  out, lse = fn(q, k, v)
  assert np.all(np.asarray(out) == 0) and np.all(np.isneginf(np.asarray(lse)))
  grads = jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v)[0]), argnums=(0, 1, 2))(q, k, v)
  assert all(np.all(np.asarray(g) == 0) for g in grads)


@pytest.mark.parametrize("impl", ["xla", *PALLAS])
def test_bf16_flash_close_to_float32_dense(impl):
  """bfloat16 in (matmuls in bf16, accumulation in f32): output and gradients within bf16's precision."""
  q, k, v, pos, doc = _inputs(5, seq=40, head_dim=16)
  bf = lambda x: x.astype(jnp.bfloat16)
  fn = lambda q, k, v: ra.flash_attention(q, k, v, q_pos=pos, k_pos=pos, q_doc=doc, k_doc=doc, window=24, block_q=16,
                                          block_k=16, impl=impl, return_lse=True)
  out, lse = jax.jit(fn)(bf(q), bf(k), bf(v))
  ref_out, ref_lse = _dense(q, k, v, pos, doc, 24)
  assert out.dtype == jnp.bfloat16 and lse.dtype == jnp.float32
  assert rel_err(out.astype(jnp.float32), ref_out) < 1e-2 and rel_err(lse, ref_lse) < 1e-2
  f32 = lambda fn: lambda q, k, v: jax.tree.map(lambda x: x.astype(jnp.float32), fn(q, k, v))
  grads = jax.jit(jax.grad(_loss(f32(fn)), argnums=(0, 1, 2)))(bf(q), bf(k), bf(v))
  ref = jax.grad(_loss(lambda q, k, v: _dense(q, k, v, pos, doc, 24)), argnums=(0, 1, 2))(q, k, v)
  for name, g, r in zip("qkv", grads, ref):
    assert g.dtype == jnp.bfloat16 and rel_err(g.astype(jnp.float32), r) < 2e-2, name


def test_merge_of_two_key_sets_is_attention_over_their_union():
  q, k, v, pos, doc = _inputs(11, seq=30)
  cut = 13
  part = lambda lo, hi: ra.flash_attention(q, k[:, lo:hi], v[:, lo:hi], q_pos=pos, k_pos=pos[lo:hi], q_doc=doc,
                                           k_doc=doc[:, lo:hi], block_q=8, block_k=8, return_lse=True)
  out, lse = ra.merge_attention(*part(0, cut), *part(cut, 30))
  ref_out, ref_lse = _dense(q, k, v, pos, doc, None)
  assert rel_err(out, ref_out) < 1e-5 and rel_err(lse, ref_lse) < 1e-5


def _ring(shards, devices, *, layout, window, num_steps, impl, block):
  """jit(shard_map(ring_attention)) taking full-length inputs already in `layout` order."""
  mesh = Mesh(np.array(devices[:shards]), ("seq",))
  s = P(None, "seq")

  def body(q, k, v, pos, doc):
    return ra.ring_attention(q, k, v, axis_name="seq", q_pos=pos, k_pos=pos, q_doc=doc, k_doc=doc, window=window,
                             num_steps=num_steps, block_q=block, block_k=block, impl=impl, return_lse=True)

  return jax.shard_map(body, mesh=mesh, in_specs=(s, s, s, P("seq"), s), out_specs=(s, P(None, None, "seq")),
                       check_vma=False)


@pytest.mark.parametrize("shards", [2, 4, 8])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
def test_ring_matches_dense(shards, layout, eight_devices):
  """Local length 11 or 5 with blocks of 4: never a multiple of the block."""
  seq = {"contiguous": 11, "zigzag": 10, "striped": 11}[layout] * shards
  q, k, v, pos, doc = _inputs(shards * 31 + len(layout), seq=seq)
  order = ra.load_balance_order(seq, shards, layout)
  undo = np.argsort(order)
  ring = _ring(shards, eight_devices, layout=layout, window=None, num_steps=None, impl="xla", block=4)

  def fn(q, k, v):
    out, lse = ring(q[:, order], k[:, order], v[:, order], pos[order], doc[:, order])
    return out[:, undo], lse[..., undo]

  _matches_dense(fn, q, k, v, pos, doc, None)


@pytest.mark.parametrize("impl", ["xla", "pallas", "pallas_gpu"])
def test_windowed_ring_cut_short(impl, eight_devices):
  """A window of 9 over 4 shards of 7 tokens needs 1 + ceil(9/7) = 3 of the 4 ring steps."""
  shards, local, window = 4, 7, 9
  steps = ra.ring_steps_for_window(window, local, shards)
  assert steps == 3
  q, k, v, pos, doc = _inputs(17, seq=shards * local)
  ring = _ring(shards, eight_devices, layout="contiguous", window=window, num_steps=steps, impl=impl, block=4)
  fn = lambda q, k, v: ring(q, k, v, pos, doc)
  _matches_dense(fn, q, k, v, pos, doc, window)


@pytest.mark.parametrize("impl", PALLAS)
def test_pallas_ring_zigzag_matches_dense(impl, eight_devices):
  """The Pallas kernels inside the ring: a zig-zag layout over 4 devices (positions out of order on every device,
  key blocks arriving from every other one), values and gradients."""
  seq = 4 * 12
  q, k, v, pos, doc = _inputs(29, seq=seq, heads=2, kv_heads=1)
  order = ra.load_balance_order(seq, 4, "zigzag")
  undo = np.argsort(order)
  ring = _ring(4, eight_devices, layout="zigzag", window=None, num_steps=None, impl=impl, block=8)

  def fn(q, k, v):
    out, lse = ring(q[:, order], k[:, order], v[:, order], pos[order], doc[:, order])
    return out[:, undo], lse[..., undo]

  _matches_dense(fn, q, k, v, pos, doc, None)


def test_ring_cut_too_short_is_wrong():
  """Mutation check: with one step fewer than the window needs, the result differs."""
  q, k, v, pos, doc = _inputs(17, seq=28, docs=False)
  ring = _ring(4, jax.devices(), layout="contiguous", window=9, num_steps=2, impl="xla", block=4)
  out, _ = jax.jit(ring)(q, k, v, pos, doc)
  assert rel_err(out, _dense(q, k, v, pos, doc, 9)[0]) > 1e-3


def test_load_balance_orders():
  z = ra.load_balance_order(16, 4, "zigzag")
  assert z.reshape(4, 4).tolist() == [[0, 1, 14, 15], [2, 3, 12, 13], [4, 5, 10, 11], [6, 7, 8, 9]]
  s = ra.load_balance_order(8, 4, "striped")
  assert s.reshape(4, 2).tolist() == [[0, 4], [1, 5], [2, 6], [3, 7]]
  for layout in ra.LAYOUTS:
    assert sorted(ra.load_balance_order(24, 4, layout)) == list(range(24))
  with pytest.raises(ValueError, match="multiple of 2"):
    ra.load_balance_order(12, 4, "zigzag")


@pytest.mark.parametrize("kwargs,match", [
    (dict(impl="cuda"), "impl='cuda'"),
    (dict(q_pos=jnp.arange(5)), "q_pos has shape"),
    (dict(k_doc=jnp.zeros((2, 3), jnp.int32)), "k_doc has shape"),
    (dict(block_q=0), "block_q=0"),
])
def test_bad_arguments(kwargs, match):
  q, k, v, pos, doc = _inputs(1, seq=12)
  args = dict(q_pos=pos, k_pos=pos, q_doc=doc, k_doc=doc) | kwargs
  with pytest.raises(ValueError, match=match):
    ra.flash_attention(q, k, v, **args)
