"""The chunked linear recurrence: xla and the Pallas kernels against the token-scan reference.

Covers every decay kind (none, one per head, one per key channel), the delta
rule (with and without a per-head decay), ragged lengths, several chunk sizes,
documents starting inside a sequence, an initial state, gradients (the Pallas
kernels' own backward), bf16 inputs, and the sequence-parallel form over 2, 4
and 8 CPU devices. The TPU (Mosaic) and GPU (Triton) kernels run here in the
Pallas interpreter, which checks their math; tests/test_compile_linear_recurrence.py
checks that the real compilers accept them.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from conftest import rel_err
from longctx.kernels import linear_recurrence as lr


def _inputs(seed, *, decay, delta, batch=2, seq=45, heads=2, key_dim=8, value_dim=6, docs=True, initial=True,
            decay_scale=1.0):
  """Random inputs; decay in "none" / "scalar" / "vector"; log decays spread over (-inf, 0)."""
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((batch, seq, heads, key_dim), np.float32) / np.sqrt(key_dim)
  k = rng.standard_normal((batch, seq, heads, key_dim), np.float32)
  if delta:  # the delta rule is stable for unit keys and beta in (0, 1)
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
  v = rng.standard_normal((batch, seq, heads, value_dim), np.float32)
  shape = {"none": None, "scalar": (batch, seq, heads), "vector": (batch, seq, heads, key_dim)}[decay]
  log_decay = None if shape is None else -decay_scale * np.logaddexp(0, rng.standard_normal(shape) - 2)
  beta = 1 / (1 + np.exp(-rng.standard_normal((batch, seq, heads)))) if delta else None
  seg = np.cumsum(rng.random((batch, seq)) < 0.06, axis=1) if docs else None
  s0 = rng.standard_normal((batch, heads, key_dim, value_dim)) if initial else None
  as_jnp = lambda x, dt=np.float32: None if x is None else jnp.asarray(x.astype(dt))
  return dict(q=jnp.asarray(q), k=jnp.asarray(k), v=jnp.asarray(v), log_decay=as_jnp(log_decay),
              beta=as_jnp(beta), segment_ids=as_jnp(seg, np.int32), initial_state=as_jnp(s0))


def _run(impl, chunk_size, inputs):
  fn = jax.jit(functools.partial(lr.linear_recurrence, impl=impl, chunk_size=chunk_size))
  return fn(**inputs)


_reference = jax.jit(lr.linear_recurrence_reference)

# (decay, delta, seq, chunk, docs, initial)
XLA_CASES = [
    ("none", False, 45, 16, True, True), ("scalar", False, 45, 8, True, True), ("scalar", False, 64, 64, False, False),
    ("scalar", False, 37, 1, True, False), ("vector", False, 45, 16, True, True), ("vector", False, 50, 64, False, True),
    ("none", True, 45, 16, True, True), ("scalar", True, 45, 8, True, True), ("scalar", True, 70, 32, False, False),
]


@pytest.mark.parametrize("decay,delta,seq,chunk,docs,initial", XLA_CASES)
def test_xla_matches_reference(decay, delta, seq, chunk, docs, initial):
  inputs = _inputs(seq * 7 + chunk, decay=decay, delta=delta, seq=seq, docs=docs, initial=initial)
  out, state = _run("xla", chunk, inputs)
  ref_out, ref_state = _reference(**inputs)
  assert out.shape == ref_out.shape and state.shape == ref_state.shape
  assert rel_err(out, ref_out) < 1e-5
  assert rel_err(state, ref_state) < 1e-5


PALLAS = ["pallas_tpu", "pallas_gpu"]
KINDS = [("none", False), ("scalar", False), ("vector", False), ("none", True), ("scalar", True)]


@pytest.mark.parametrize("impl", PALLAS)
@pytest.mark.parametrize("decay,delta", KINDS)
def test_pallas_interpret_matches_reference(impl, decay, delta):
  inputs = _inputs(11, decay=decay, delta=delta, seq=40, docs=True, initial=True)
  out, state = _run(impl, 16, inputs)
  ref_out, ref_state = _reference(**inputs)
  assert out.shape == ref_out.shape and state.shape == ref_state.shape
  assert rel_err(out, ref_out) < 1e-5
  assert rel_err(state, ref_state) < 1e-5


def test_pallas_means_the_platforms_kernel_and_never_a_silent_interpreter():
  """"pallas" on a CPU is the TPU kernel interpreted; a kernel named for an accelerator this is not runs only
  when asked to (interpret=True / False explicitly), else one line says why."""
  inputs = _inputs(2, decay="scalar", delta=False, seq=20)
  np.testing.assert_array_equal(np.asarray(_run("pallas", 8, inputs)[0]), np.asarray(_run("pallas_tpu", 8, inputs)[0]))
  from longctx.kernels.pallas_target import pallas_target
  assert pallas_target("pallas", None, platform="gpu") == ("gpu", False)
  assert pallas_target("pallas", None, platform="tpu") == ("tpu", False)
  with pytest.raises(ValueError, match="the TPU Pallas kernel does not compile on a gpu backend"):
    pallas_target("pallas_tpu", None, platform="gpu")
  with pytest.raises(ValueError, match="power of two >= 16"):
    lr.linear_recurrence(**inputs, impl="pallas_gpu", chunk_size=24)
  with pytest.raises(ValueError, match="multiple of 8"):
    lr.linear_recurrence(**inputs, impl="pallas_tpu", chunk_size=12)


@pytest.mark.parametrize("impl", PALLAS)
def test_pallas_bf16_inputs(impl):
  """bf16 q, k, v (the matmuls run in bf16 with f32 accumulation, the state in f32) stay close to the f32
  reference; outputs come back in bf16."""
  inputs = _inputs(13, decay="scalar", delta=False, seq=48, docs=True, initial=True)
  half = {n: (x.astype(jnp.bfloat16) if n in ("q", "k", "v") else x) for n, x in inputs.items()}
  out, state = _run(impl, 16, half)
  ref_out, ref_state = _reference(**inputs)
  assert out.dtype == jnp.bfloat16 and state.dtype == jnp.float32
  assert rel_err(out, ref_out) < 3e-2 and rel_err(state, ref_state) < 3e-2


def test_strong_decay_stays_finite():
  """Decays of e^-40 per token: chunk exponents stay <= 0, so nothing overflows to inf or NaN."""
  for impl, decay in (("xla", "scalar"), ("xla", "vector"), ("pallas_tpu", "scalar"), ("pallas_gpu", "vector")):
    inputs = _inputs(5, decay=decay, delta=False, seq=64, decay_scale=40.0)
    out, state = _run(impl, 64 if impl == "xla" else 16, inputs)
    ref_out, ref_state = _reference(**inputs)
    assert rel_err(out, ref_out) < 1e-5 and rel_err(state, ref_state) < 1e-5, impl


def _loss(fn, inputs, w_out, w_state):
  out, state = fn(**inputs)
  return jnp.sum(out * w_out) + jnp.sum(state * w_state)


@pytest.mark.parametrize("impl", ["xla"] + PALLAS)
@pytest.mark.parametrize("decay,delta", [("scalar", False), ("vector", False), ("scalar", True)])
def test_a_document_is_bitwise_independent_of_the_one_before(impl, decay, delta):
  """A document starting mid-chunk (token 13; chunks of 8, or 16 for the GPU kernel) gives the same bits
  whatever came before it, with data-dependent decays: the in-chunk cumulative decay never includes another
  document's terms."""
  chunk = 16 if impl == "pallas_gpu" else 8
  inputs = _inputs(5, decay=decay, delta=delta, batch=1, seq=30, docs=False, initial=True)
  inputs["segment_ids"] = jnp.asarray((np.arange(30) >= 13)[None].astype(np.int32))
  other = dict(inputs)
  for name in ("q", "k", "v", "log_decay", "beta"):
    if inputs[name] is not None:
      other[name] = inputs[name].at[:, :13].set(inputs[name][:, :13] * 1.37 - 0.011)
  other["initial_state"] = inputs["initial_state"] * 3.1
  (out, state), (out2, state2) = _run(impl, chunk, inputs), _run(impl, chunk, other)
  np.testing.assert_array_equal(np.asarray(out[:, 13:]), np.asarray(out2[:, 13:]))
  np.testing.assert_array_equal(np.asarray(state), np.asarray(state2))
  assert not np.allclose(np.asarray(out[:, :13]), np.asarray(out2[:, :13]))


@pytest.mark.parametrize("impl,decay,delta", [("xla", "scalar", False), ("xla", "vector", False), ("xla", "scalar", True)]
                         + [(impl, decay, delta) for impl in PALLAS for decay, delta in KINDS])
def test_gradients_match_reference(impl, decay, delta):
  """Every input's gradient, through the Pallas kernels' own backward (the chunks in reverse from saved
  entering states), the log decays' included."""
  inputs = _inputs(3, decay=decay, delta=delta, seq=30, docs=True, initial=True)
  rng = np.random.default_rng(4)
  w_out = jnp.asarray(rng.standard_normal(inputs["v"].shape[:3] + (inputs["v"].shape[3],)), jnp.float32)
  w_state = jnp.asarray(rng.standard_normal(inputs["initial_state"].shape), jnp.float32)
  names = [n for n in ("q", "k", "v", "log_decay", "beta", "initial_state") if inputs[n] is not None]

  def grads(fn):
    def f(*diff):
      return _loss(fn, {**inputs, **dict(zip(names, diff))}, w_out, w_state)
    return jax.jit(jax.grad(f, argnums=tuple(range(len(names)))))(*[inputs[n] for n in names])

  fast = grads(functools.partial(lr.linear_recurrence, impl=impl, chunk_size=16 if impl == "pallas_gpu" else 8))
  ref = grads(lr.linear_recurrence_reference)
  for name, g, r in zip(names, fast, ref):
    assert rel_err(g, r) < 1e-4, name


@pytest.mark.parametrize("shards,decay,delta,impl", [(s, d, b, "xla") for s in (2, 4, 8) for d, b in
                                                     (("scalar", False), ("vector", False), ("scalar", True))]
                         + [(2, "scalar", True, "pallas_tpu"), (2, "scalar", False, "pallas_gpu")])
def test_sequence_parallel_matches_single_device(shards, decay, delta, impl, eight_devices):
  inputs = _inputs(shards, decay=decay, delta=delta, seq=16 * shards, docs=True, initial=True)
  mesh = Mesh(np.array(eight_devices[:shards]), ("seq",))
  seq_spec = P(None, "seq")
  specs = dict(q=seq_spec, k=seq_spec, v=seq_spec, log_decay=seq_spec, beta=seq_spec, segment_ids=seq_spec,
               initial_state=P())
  names = [n for n in specs if inputs[n] is not None]

  def body(*args):
    return lr.sequence_parallel_linear_recurrence(**dict(zip(names, args)), axis_name="seq", impl=impl,
                                                  chunk_size=16 if impl == "pallas_gpu" else 8)

  fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=tuple(specs[n] for n in names),
                             out_specs=(seq_spec, P()), check_vma=False))
  out, state = fn(*[inputs[n] for n in names])
  ref_out, ref_state = _reference(**inputs)
  assert rel_err(out, ref_out) < 1e-5
  assert rel_err(state, ref_state) < 1e-5


@pytest.mark.parametrize("delta", [False, True])
def test_sequence_parallel_document_starting_at_a_shard_boundary(delta, eight_devices):
  """A document that starts exactly at a shard's first token must not see the state before it."""
  inputs = _inputs(9, decay="scalar", delta=delta, seq=32, docs=False, initial=True)
  seg = np.zeros((2, 32), np.int32)
  seg[0, 16:] = 1  # row 0: new document at shard 1's first token; row 1: one document
  inputs["segment_ids"] = jnp.asarray(seg)
  names = [n for n in ("q", "k", "v", "log_decay", "beta", "segment_ids", "initial_state") if inputs[n] is not None]
  mesh = Mesh(np.array(eight_devices[:2]), ("seq",))
  s = P(None, "seq")
  fn = jax.jit(jax.shard_map(
      lambda *args: lr.sequence_parallel_linear_recurrence(**dict(zip(names, args)), axis_name="seq", chunk_size=8),
      mesh=mesh, in_specs=tuple(P() if n == "initial_state" else s for n in names), out_specs=(s, P()),
      check_vma=False))
  out, state = fn(*(inputs[n] for n in names))
  ref_out, ref_state = _reference(**inputs)
  assert rel_err(out, ref_out) < 1e-5 and rel_err(state, ref_state) < 1e-5


@pytest.mark.parametrize("change,match", [
    (dict(k=jnp.zeros((2, 45, 2, 7))), "q and k"),
    (dict(v=jnp.zeros((2, 44, 2, 6))), "v must be"),
    (dict(log_decay=jnp.zeros((2, 45, 3))), "log_decay must be"),
    (dict(beta=jnp.zeros((2, 45))), "beta must be"),
    (dict(segment_ids=jnp.zeros((2, 40), jnp.int32)), "segment_ids must be"),
    (dict(initial_state=jnp.zeros((2, 2, 6, 8))), "initial_state must be"),
    (dict(log_decay=jnp.zeros((2, 45, 2, 8)), beta=jnp.zeros((2, 45, 2))), "per-channel decay"),
])
def test_bad_shapes_name_the_problem(change, match):
  inputs = {**_inputs(0, decay="scalar", delta=False), **change}
  with pytest.raises(ValueError, match=match):
    lr.linear_recurrence(**inputs)


def test_unknown_impl_is_an_error():
  with pytest.raises(ValueError, match="impl='triton' is not one of"):
    lr.linear_recurrence(**_inputs(0, decay="none", delta=False), impl="triton")
