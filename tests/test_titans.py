"""Titans: the chunked memory update against the obvious token loop (values and gradients), the model contract
for MAC (one pass == segments == token by token, documents, reset; MAG is the shared contract's tiny Titans:
test_contract.py), the tail test for both, gradients."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model_contract as contract
from conftest import rel_err
from longctx.errors import ConfigError
from longctx.models import Titans, TitansConfig, Transformer, TransformerConfig, create_model, list_models
from longctx.layers.neural_memory import checkpoint_group, chunk_update, memory_mlp, memory_segment

VOCAB, WINDOW, CHUNK, HISTORY = 50, 8, 4, 3
CFG = TitansConfig(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4, window=WINDOW, chunk_size=CHUNK,
                   memory_heads=2, memory_hidden=16, num_persistent=2, embed_conv=HISTORY + 1)


@pytest.fixture(scope="module")
def models():
  """One model per variant, built when first asked for."""
  cache = {}

  def get(variant):
    if variant not in cache:
      cfg = dataclasses.replace(CFG, variant=variant)
      cfg.validate()
      cache[variant] = create_model(cfg, seed=0)
    return cache[variant]

  return get


@pytest.fixture(scope="module")
def model(models):
  return models("mac")


@pytest.fixture(scope="module")
def step(model):
  return contract.make_step(model)


def test_registered():
  assert "titans" in list_models()


# ----------------------------------------------------------------------------- the memory update


def token_loop(w0, s0, q, k, v, z, init, *, chunk, start_at, theta_scale):
  """One lane and head, token by token: every gradient at the weights of the chunk start, then
  S = eta S - theta grad, M = (1 - alpha) M + S; a token reads the chunk-start weights. A document
  starting at `start_at` restarts from `init` with zero momentum and its own chunks. With chunk = 1
  this is the fully sequential Titans recurrence (y_t = M_{t-1}(q_t)).

  Returns the reads `[n, dm]` and (M, S) at the last chunk boundary.
  """
  m, s = tuple(w0), tuple(s0)
  start_m, start_s, pos, ys = m, s, 0, []
  for t in range(q.shape[0]):
    if t == start_at:
      m, s, pos = tuple(init), tuple(jnp.zeros_like(w) for w in init), 0
    if pos == 0:
      start_m, start_s = m, s
    ys.append(memory_mlp(start_m, q[t]))
    g = jax.grad(lambda w: jnp.sum((memory_mlp(w, k[t]) - v[t]) ** 2))(start_m)
    eta, theta, alpha = jax.nn.sigmoid(z[t, 0]), theta_scale * jax.nn.sigmoid(z[t, 1]), jax.nn.sigmoid(z[t, 2])
    s = tuple(eta * si - theta * gi for si, gi in zip(s, g))
    m = tuple((1 - alpha) * mi + si for mi, si in zip(m, s))
    pos = (pos + 1) % chunk
  boundary = (m, s) if pos == 0 else (start_m, start_s)
  return jnp.stack(ys), boundary


def random_memory_inputs(seed, *, b=2, n=8, heads=2, dm=4, hidden=8):
  rng = np.random.default_rng(seed)
  f = lambda *shape, scale=1.0: jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  shapes = [(dm, hidden), (hidden, dm)]
  return dict(w0=tuple(f(b, heads, i, o, scale=i ** -0.5) for i, o in shapes),
              s0=tuple(f(b, heads, i, o, scale=0.1) for i, o in shapes),
              q=unit(f(b, n, heads, dm)), k=unit(f(b, n, heads, dm)), v=f(b, n, heads, dm),
              z=f(b, n, heads, 3), init=tuple(f(heads, i, o, scale=i ** -0.5) for i, o in shapes))


def chunked(inp, *, chunk, start_at, theta_scale, checkpoint=0):
  b, n, heads, dm = inp["q"].shape
  carry = {"w": inp["w0"], "s": inp["s0"], "k": jnp.zeros((b, chunk, heads, dm)),
           "v": jnp.zeros((b, chunk, heads, dm)), "z": jnp.zeros((b, chunk, heads, 3)),
           "m": jnp.zeros((b,), jnp.int32)}
  starts = jnp.zeros((b, n), bool) if start_at is None else jnp.zeros((b, n), bool).at[:, start_at].set(True)
  y, carry = memory_segment(carry, inp["q"], inp["k"], inp["v"], inp["z"], starts=starts, init=inp["init"],
                            theta_scale=theta_scale, checkpoint=checkpoint)
  return y, (carry["w"], carry["s"])


def looped(inp, *, chunk, start_at, theta_scale):
  one = lambda w0, s0, q, k, v, z, init: token_loop(w0, s0, q, k, v, z, init, chunk=chunk, start_at=start_at,
                                                     theta_scale=theta_scale)
  per_head = jax.vmap(one, in_axes=(0, 0, 1, 1, 1, 1, 0), out_axes=(1, 0))
  return jax.vmap(per_head, in_axes=(0, 0, 0, 0, 0, 0, None))(
      inp["w0"], inp["s0"], inp["q"], inp["k"], inp["v"], inp["z"], inp["init"])


@pytest.mark.parametrize("chunk,start_at", [(1, None), (8, None), (2, 5)],
                         ids=["1-sequential", "whole-sequence", "2-doc-at-5"])
def test_chunked_update_equals_the_token_loop(chunk, start_at):
  """Reads, the weights and momentum at the last chunk boundary, and the gradients of an outer loss
  w.r.t. every input (weights, momentum, initial weights, gates, q, k, v) agree with the obvious loop."""
  inp = random_memory_inputs(chunk)
  kw = dict(chunk=chunk, start_at=start_at, theta_scale=0.5)
  rng = np.random.default_rng(1)
  shapes = jax.eval_shape(lambda i: looped(i, **kw), inp)
  cot = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), shapes)

  def outer(fn):
    def loss(inp):
      out = fn(inp, **kw)
      return sum(jnp.sum(a * c) for a, c in zip(jax.tree.leaves(out), jax.tree.leaves(cot))), out
    return jax.value_and_grad(loss, has_aux=True)

  (val, out), grads = jax.jit(outer(chunked))(inp)
  (val_ref, out_ref), grads_ref = outer(looped)(inp)  # eager: its per-token ops are compiled once for all cases
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(out_ref)):  # reads, then (M, S) at the boundary
    assert rel_err(a, b) < 1e-5
  assert abs(val - val_ref) < 1e-5 * abs(val_ref)
  for name in inp:
    for g, g_ref in zip(jax.tree.leaves(grads[name]), jax.tree.leaves(grads_ref[name])):
      assert np.linalg.norm(np.asarray(g_ref)) > 0 or (name == "init" and start_at is None), name
      assert rel_err(g, g_ref) < 1e-4, name


def test_inner_update_clip_bounds_each_chunk_and_keeps_the_memory_finite():
  """With `memory_grad_clip` the gradient part of each chunk's update into S and into M has norm <= the
  clip; a huge clip changes nothing; over many chunks with a too-large step the unclipped memory blows up
  and the clipped one stays small."""
  inp = random_memory_inputs(3, b=1, n=16, heads=1)
  one = lambda x: x[0, 0] if x.ndim == 4 else x[0, :, 0]
  w0, s0 = tuple(one(w) for w in inp["w0"]), tuple(one(s) for s in inp["s0"])
  k, v, z = one(inp["k"]), one(inp["v"]), one(inp["z"])
  base_w, base_s = chunk_update(w0, s0, k, v, z, theta_scale=0.0)  # no gradient: decay and momentum only
  flat = lambda ws: jnp.concatenate([w.ravel() for w in ws])
  free_w, free_s = chunk_update(w0, s0, k, v, z, theta_scale=5.0)
  big_w, big_s = chunk_update(w0, s0, k, v, z, theta_scale=5.0, grad_clip=1e9)
  assert rel_err(flat(big_w), flat(free_w)) == 0 and rel_err(flat(big_s), flat(free_s)) == 0
  assert float(jnp.linalg.norm(flat(free_w) - flat(base_w))) > 0.5  # the clip below does bind
  cw, cs = chunk_update(w0, s0, k, v, z, theta_scale=5.0, grad_clip=0.5)
  assert float(jnp.linalg.norm(flat(cw) - flat(base_w))) <= 0.5 + 1e-5
  assert float(jnp.linalg.norm(flat(cs) - flat(base_s))) <= 0.5 + 1e-5

  long = random_memory_inputs(4, b=1, n=256, heads=1)
  long["z"] = long["z"].at[..., 0].set(3.0).at[..., 2].set(-6.0)  # strong momentum, little forgetting
  sizes = {}
  for clip in (0.0, 1.0):
    carry = {"w": long["w0"], "s": long["s0"], "k": jnp.zeros((1, 4, 1, 4)), "v": jnp.zeros((1, 4, 1, 4)),
             "z": jnp.zeros((1, 4, 1, 3)), "m": jnp.zeros((1,), jnp.int32)}
    _, carry = memory_segment(carry, long["q"], long["k"], long["v"], long["z"], starts=jnp.zeros((1, 256), bool),
                              init=long["init"], theta_scale=50.0, grad_clip=clip)
    sizes[clip] = float(jnp.max(jnp.abs(flat(carry["w"]))))
  assert not np.isfinite(sizes[0.0]) or sizes[0.0] > 1e3, sizes
  assert sizes[1.0] < 100, sizes


def test_checkpoint_group_rule():
  # auto: ceil(sqrt(steps)) groups where they keep fewer carries than the steps (from 6 steps on)
  assert [checkpoint_group(n, 0) for n in (1, 2, 4, 5, 6, 64, 65)] == [0, 0, 0, 0, 3, 8, 9]
  assert checkpoint_group(64, 5) == 5 and checkpoint_group(64, -1) == 0


@pytest.mark.parametrize("checkpoint", [1, 3, 0, 100], ids=["every-step", "3-with-tail", "sqrt", "one-group"])
def test_checkpointed_scan_equals_the_plain_scan(checkpoint):
  """Grouped, rematerialised steps (`memory_checkpoint`) give the plain scan's reads, final weights and
  gradients w.r.t. every input, with a document starting mid-segment (10 steps of one token: groups of 3
  leave a tail of 1)."""
  inp = random_memory_inputs(5, n=10)
  kw = dict(chunk=1, start_at=6, theta_scale=0.5)

  def loss(inp, checkpoint):
    y, (w, s) = chunked(inp, checkpoint=checkpoint, **kw)
    return jnp.sum(jnp.sin(y)) + sum(jnp.sum(jnp.cos(a)) for a in (*w, *s))

  grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  (val, g), (val_ref, g_ref) = grad(inp, checkpoint), grad(inp, -1)
  assert abs(val - val_ref) <= 1e-6 * abs(val_ref)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    assert rel_err(a, b) < 1e-5


def test_checkpointed_scan_keeps_less_for_the_backward_pass():
  """The compiled gradient of 64 one-token steps: grouping by ~sqrt(steps) holds a fraction of the plain
  scan's temporaries (at d_model 512 x 8 lanes x 64 chunks the plain scan asked for 73 GB)."""
  inp = random_memory_inputs(6, b=2, n=64, heads=1, dm=32, hidden=64)

  def temp_bytes(checkpoint):
    def loss(inp):
      y, (w, s) = chunked(inp, chunk=1, start_at=None, theta_scale=0.5, checkpoint=checkpoint)
      return jnp.sum(y) + sum(jnp.sum(a) for a in (*w, *s))
    return jax.jit(jax.grad(loss)).lower(inp).compile().memory_analysis().temp_size_in_bytes

  plain, grouped = temp_bytes(-1), temp_bytes(0)
  assert grouped < plain / 3, (grouped, plain)


# ----------------------------------------------------------------------------- the model contract


def test_one_pass_equals_segments_and_token_by_token(model, step):
  """Segments of 1 (token by token) and 5 (every offset inside a chunk); then a document starting
  inside a chunk and a segment (token 6 of 16, chunk 4)."""
  n = 16
  contract.segment_invariance(model, step, n=n, segs=[1, 5], vocab=VOCAB)
  ids = (jnp.arange(n) >= 6).astype(jnp.int32)[None].repeat(2, 0)
  contract.segment_invariance(model, step, n=n, segs=[1, 5], vocab=VOCAB, segment_ids=ids)


def test_a_document_reads_the_same_wherever_it_starts(model, step):
  """A document's logits do not depend on what came before it in its lane (chunks count from its start)."""
  doc = contract.randint(7, (1, 10), VOCAB)
  alone, _ = contract.stream(model, step, jnp.pad(doc, ((0, 0), (0, 6))), 16)
  for lead in (3, 6):
    tokens = jnp.concatenate([contract.randint(lead, (1, lead), VOCAB), doc, jnp.zeros((1, 16 - 10 - lead),
                                                                                     jnp.int32)], axis=1)
    ids = (jnp.arange(16) >= lead).astype(jnp.int32)[None] + (jnp.arange(16) >= lead + 10)[None]
    out, _ = contract.stream(model, step, tokens, 16, segment_ids=ids)
    assert rel_err(out[:, lead:lead + 10], alone[:, :10]) < 1e-5


def test_reset_isolation(model, step):
  contract.reset_isolation(model, step, seg=16, vocab=VOCAB)


@pytest.mark.parametrize("boundary", [8, 6])
def test_no_leak_across_documents(model, step, boundary):
  contract.no_leak_across_documents(model, step, seg=16, boundary=boundary, vocab=VOCAB)


@pytest.mark.parametrize("variant", ["mag", "mac"])
@pytest.mark.parametrize("where", ["chunk_start", "inside_chunk"])
def test_memory_reaches_a_documents_tail(variant, where):
  """Issue 22's tail test (model_contract.memory_reaches_the_tail) for a token-level reset: with a window of
  2 and chunks of 16 the tail lies further into its chunk than attention and conv reach (7 tokens), so
  only the neural memory carries the document's head to it, wherever the next document starts."""
  cfg = dataclasses.replace(CFG, variant=variant, window=2, chunk_size=16)
  cfg.validate()
  tail_model = create_model(cfg, seed=0)
  start = 64 if where == "chunk_start" else 48 + 13
  contract.memory_reaches_the_tail(tail_model, contract.make_step(tail_model), seg=16, vocab=VOCAB,
                                   horizon=2 * 2 + HISTORY, next_start=start)


def test_memory_carries_beyond_the_attention(model, step):
  contract.memory_carries(model, step, seg=16, vocab=VOCAB, horizon=CFG.num_layers * WINDOW + HISTORY)


def test_gradients_reach_memory_init_gates_and_projections(models):
  """MAC (MAG's memory gradients are checked against the token loop above, and trained in the sharded test)."""
  model = models("mac")
  names = ["['memory']['init_weights']", "w_gate", "b_gate", "['memory']['wk']", "['memory']['wv']",
           "['memory']['wq']"]
  contract.gradients_reach(model, seg=8, vocab=VOCAB, names=names, segments=2)


def test_flops_per_token_counts_the_memory():
  """More than the baseline with the same backbone (the memory's projections, reads, gradients, update)."""
  backbone = {f.name: getattr(CFG, f.name) for f in dataclasses.fields(TransformerConfig) if f.name != "name"}
  baseline = Transformer.flops_per_token(TransformerConfig(**backbone), seg_len=16)
  for variant in ("mag", "mac"):
    assert Titans.flops_per_token(dataclasses.replace(CFG, variant=variant), seg_len=16) > 1.2 * baseline


@pytest.mark.parametrize("change,match", [
    (dict(variant="mal"), "variant"), (dict(memory_depth=1), "memory_depth"), (dict(memory_heads=3), "memory_heads"),
    (dict(chunk_size=0), "chunk_size"), (dict(num_persistent=-1), "num_persistent"),
    (dict(memory_hidden=-2), "memory_hidden"), (dict(memory_lr=0.0), "memory_lr"),
    (dict(memory_grad_clip=-1.0), "memory_grad_clip"), (dict(memory_checkpoint=-2), "memory_checkpoint"),
])
def test_config_errors(change, match):
  with pytest.raises(ConfigError, match=match):
    dataclasses.replace(CFG, **change).validate()
