"""Mamba's selective scan: the chunked XLA form and the fused Pallas kernels against the token scan.

Values and every gradient (x, dt, A, B, C, the initial state) with documents starting inside the sequence,
ragged lengths, channel counts that are and are not multiples of the kernels' blocks; the TPU and GPU kernels
run in the Pallas interpreter here (tests/test_compile_selective_scan.py checks the compilers accept them).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from longctx.kernels import selective_scan as ss


def _inputs(seed, *, batch=2, seq=37, channels=24, state=4, docs=True, initial=True):
  rng = np.random.default_rng(seed)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  return dict(
      x=f32(rng.standard_normal((batch, seq, channels))),
      dt=f32(np.log1p(np.exp(rng.standard_normal((batch, seq, channels)) - 1))),
      a=f32(-np.exp(rng.standard_normal((channels, state)) * 0.5)),
      b=f32(rng.standard_normal((batch, seq, state))), c=f32(rng.standard_normal((batch, seq, state))),
      segment_ids=jnp.asarray(np.cumsum(rng.random((batch, seq)) < 0.1, axis=1), jnp.int32) if docs else None,
      initial_state=f32(rng.standard_normal((batch, channels, state))) if initial else None)


def _associative(x, dt, a, b, c, *, segment_ids, initial_state):
  """The textbook parallel form, independent of the module: every h_t by a prefix over (decay, input)."""
  starts = jnp.concatenate([jnp.zeros_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
  decay = jnp.where(starts[..., None, None], 0.0, jnp.exp(dt[..., None] * a))
  inputs = (dt * x)[..., None] * b[:, :, None, :]
  inputs = inputs.at[:, 0].add(decay[:, 0] * initial_state)
  _, h = jax.lax.associative_scan(lambda l, r: (l[0] * r[0], r[0] * l[1] + r[1]), (decay, inputs), axis=1)
  return jnp.einsum("bsdn,bsn->bsd", h, c), h[:, -1]


def test_reference_is_the_textbook_recurrence():
  inputs = _inputs(0)
  y, h = ss.selective_scan_reference(**inputs)
  y2, h2 = _associative(**inputs)
  assert rel_err(y, y2) < 1e-5 and rel_err(h, h2) < 1e-5


IMPLS = [("xla", 8), ("xla", 64), ("pallas_tpu", 8), ("pallas_gpu", 8), ("pallas_tpu", 16)]


@pytest.mark.parametrize("impl,chunk", IMPLS)
@pytest.mark.parametrize("channels,state,docs,initial", [(24, 4, True, True), (40, 3, False, False)])
def test_matches_reference_values_and_gradients(impl, chunk, channels, state, docs, initial):
  inputs = _inputs(channels + chunk, channels=channels, state=state, docs=docs, initial=initial)
  names = [n for n in ("x", "dt", "a", "b", "c", "initial_state") if inputs[n] is not None]
  rng = np.random.default_rng(1)
  w_y = jnp.asarray(rng.standard_normal(inputs["x"].shape), jnp.float32)
  w_h = jnp.asarray(rng.standard_normal((2, channels, state)), jnp.float32)

  def run(fn, *diff):
    return fn(**{**inputs, **dict(zip(names, diff))})

  def loss(fn, *diff):
    y, h = run(fn, *diff)
    return jnp.sum(y * w_y) + jnp.sum(h * w_h)

  fast = functools.partial(ss.selective_scan, impl=impl, chunk_size=chunk)
  slow = ss.selective_scan_reference
  args = [inputs[n] for n in names]
  (y, h), (ry, rh) = jax.jit(functools.partial(run, fast))(*args), jax.jit(functools.partial(run, slow))(*args)
  assert y.shape == ry.shape and h.shape == rh.shape
  assert rel_err(y, ry) < 1e-5 and rel_err(h, rh) < 1e-5
  grads = jax.jit(jax.grad(functools.partial(loss, fast), argnums=tuple(range(len(names)))))(*args)
  ref = jax.jit(jax.grad(functools.partial(loss, slow), argnums=tuple(range(len(names)))))(*args)
  for name, g, r in zip(names, grads, ref):
    assert rel_err(g, r) < 1e-4, name


def test_xla_form_keeps_one_chunk_of_states_alive():
  """The chunked, rematerialised form never holds the `[batch, seq, channels, N]` states the associative scan
  materialises (what made Mamba's pod recipe overflow HBM): its compiled temporaries (input-sized copies and
  one chunk's states) stay below the size of those states, and far below the associative scan's."""
  inputs = _inputs(3, batch=2, seq=1024, channels=64, state=16, docs=True, initial=True)
  names = ("x", "dt", "b", "c")

  def temp_bytes(fn):
    loss = lambda *diff: jnp.sum(fn(**{**inputs, **dict(zip(names, diff))})[0])
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(*[inputs[n] for n in names]).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  states = 2 * 1024 * 64 * 16 * 4
  chunked = temp_bytes(functools.partial(ss.selective_scan, impl="xla", chunk_size=32))
  associative = temp_bytes(_associative)
  assert associative > states, "the reference form should hold every state"
  assert chunked < states and 4 * chunked < associative, (chunked, associative, states)


def test_bad_shapes_and_chunks_name_the_problem():
  inputs = _inputs(0)
  with pytest.raises(ValueError, match="a must be"):
    ss.selective_scan(**{**inputs, "a": inputs["a"][:3]})
  with pytest.raises(ValueError, match="b must be"):
    ss.selective_scan(**{**inputs, "b": inputs["b"][:, :5]})
  with pytest.raises(ValueError, match="multiple of 8"):
    ss.selective_scan(**inputs, impl="pallas_tpu", chunk_size=12)
  with pytest.raises(ValueError, match="impl='cuda' is not one of"):
    ss.selective_scan(**inputs, impl="cuda")


@pytest.mark.parametrize("shards,impl", [(2, "xla"), (4, "xla"), (2, "pallas_tpu")])
def test_sequence_parallel_matches_one_device(shards, impl, eight_devices):
  """The scan over a sequence split across devices: documents crossing shards, one starting exactly at a shard's
  first token, an initial state; values and every gradient against the token scan on one device."""
  from jax.sharding import Mesh, PartitionSpec as P

  inputs = _inputs(11, seq=16 * shards, channels=16)
  seg = np.asarray(inputs["segment_ids"]).copy()
  seg[0, 16:] += 1  # row 0: a new document at shard 1's first token
  inputs["segment_ids"] = jnp.asarray(seg)
  names = ("x", "dt", "a", "b", "c", "segment_ids", "initial_state")
  mesh = Mesh(np.array(eight_devices[:shards]), ("seq",))
  s = P(None, "seq")
  sharded = jax.shard_map(
      lambda *args: ss.sequence_parallel_selective_scan(**dict(zip(names, args)), axis_name="seq", impl=impl,
                                                        chunk_size=8),
      mesh=mesh, in_specs=(s, s, P(), s, s, s, P()), out_specs=(s, P()), check_vma=False)

  def loss(fn):
    def value(x, dt, a, b, c, h0):
      y, h = fn(x, dt, a, b, c, inputs["segment_ids"], h0)
      return jnp.sum(y * jnp.cos(y)) + jnp.sum(h * h)
    return value

  ref = lambda x, dt, a, b, c, seg, h0: ss.selective_scan_reference(x, dt, a, b, c, segment_ids=seg, initial_state=h0)
  args = [inputs[n] for n in names]
  (y, h), (ref_y, ref_h) = jax.jit(sharded)(*args), ref(*args)
  assert rel_err(y, ref_y) < 1e-5 and rel_err(h, ref_h) < 1e-5
  diff = [a for n, a in zip(names, args) if n != "segment_ids"]
  grads = jax.jit(jax.grad(loss(sharded), argnums=tuple(range(6))))(*diff)
  for name, g, r in zip("x dt a b c h0".split(), grads, jax.grad(loss(ref), argnums=tuple(range(6)))(*diff)):
    assert rel_err(g, r) < 1e-4, name
