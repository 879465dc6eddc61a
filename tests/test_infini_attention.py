"""Infini-attention: memory read/write and the layer against slow loops, the paper's gate, the tail test,
gradients through the memory (the shared contract, streaming in any cut included: test_contract.py)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import model_contract as contract
from conftest import rel_err
from longctx.errors import ConfigError
from longctx.models import InfiniAttention, InfiniAttentionConfig, create_model, list_models
from longctx.models.infini_attention import (
    EPS, _any_chunk, chunk_layout, chunk_len, feature_map, infini_attention, memory_read, memory_write, whole_block)

VOCAB = 50
BLOCK = 8
CFG = InfiniAttentionConfig(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4, block_len=BLOCK, embed_conv=4)


@pytest.fixture(scope="module")
def model():
  CFG.validate()
  return create_model(CFG, seed=0)


@pytest.fixture(scope="module")
def step(model):
  return contract.make_step(model)


# ---- slow references (numpy, float64, one row, loops) ----

def sigma(x):
  return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))


def read_loop(sq, mem, z):
  """sq [n, h, dk], mem [h, dk, dv], z [h, dk] -> [n, h, dv]."""
  out = np.zeros(sq.shape[:2] + mem.shape[-1:])
  for t in range(sq.shape[0]):
    for h in range(sq.shape[1]):
      out[t, h] = sq[t, h] @ mem[h] / (sq[t, h] @ z[h] + EPS)
  return out


def write_loop(mem, z, sk, v, rule):
  """The block's keys sk [n, h, dk] and values v [n, h, dv] all written against the same mem, z."""
  dmem, dz = np.zeros_like(mem), np.zeros_like(z)
  for t in range(sk.shape[0]):
    for h in range(sk.shape[1]):
      target = v[t, h] - (sk[t, h] @ mem[h] / (sk[t, h] @ z[h] + EPS) if rule == "delta" else 0)
      dmem[h] += np.outer(sk[t, h], target)
      dz[h] += sk[t, h]
  return dmem, dz


def rotate(x, pos, base=10000.0):
  half = x.shape[-1] // 2
  ang = pos * (1.0 / base ** (np.arange(half) / half))
  x1, x2 = x[..., :half], x[..., half:]
  return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], axis=-1)


def layer_reference(q, k, v, doc, *, block, rule):
  """One row, q, k, v [t, h, d], doc [t]: each document cut into blocks from its start; returns the
  memory read and the local attention of every token, [t, h, d] each."""
  t, h, d = q.shape
  a_mem, a_local = np.zeros_like(v), np.zeros_like(v)
  for name in np.unique(doc):
    toks = np.flatnonzero(doc == name)
    mem, z = np.zeros((h, d, d)), np.zeros((h, d))
    for s in range(0, len(toks), block):
      blk = toks[s:s + block]
      a_mem[blk] = read_loop(sigma(q[blk]), mem, z)  # earlier blocks only
      for i, tok in enumerate(blk):
        for hh in range(h):
          qi = rotate(q[tok, hh], i)
          keys = np.stack([rotate(k[j, hh], jj) for jj, j in enumerate(blk[:i + 1])])
          w = np.exp(keys @ qi / np.sqrt(d) - np.max(keys @ qi / np.sqrt(d)))
          a_local[tok, hh] = (w / w.sum()) @ v[blk[:i + 1], hh]
      dmem, dz = write_loop(mem, z, sigma(k[blk]), v[blk], rule)  # then the block's own keys
      mem, z = mem + dmem, z + dz
  return a_mem, a_local


_layer = jax.jit(infini_attention, static_argnames=("rule", "rope_base"))


def run_layer(q, k, v, ids, *, chunk, beta, rule, block=BLOCK):
  """`infini_attention` over `[batch, t]` in chunks of `chunk`, carrying the memory as the model does."""
  b, t, h, d = q.shape
  zeros = lambda *s: jnp.zeros(s, jnp.float32)
  fresh = {"mem": zeros(b, h, d, d), "z": zeros(b, h, d), "dmem": zeros(b, h, d, d), "dz": zeros(b, h, d),
           "buf_k": zeros(b, block, h, d), "buf_v": zeros(b, block, h, d)}
  memory, offset, outs = fresh, jnp.zeros((b,), jnp.int32), []
  for i in range(0, t, chunk):
    c_ids = ids[:, i:i + chunk]
    reset = c_ids[:, 0] != (ids[:, i - 1] if i else c_ids[:, 0] + 1)
    memory = jax.tree.map(lambda m, f: jnp.where(reset.reshape((b,) + (1,) * (m.ndim - 1)), f, m), memory, fresh)
    offset = jnp.where(reset, 0, offset)
    pos, label = chunk_layout(offset, c_ids - c_ids[:, :1], block_len=block)
    out, memory = _layer(q[:, i:i + chunk], k[:, i:i + chunk], v[:, i:i + chunk], memory=memory,
                         offset=offset, pos=pos, label=label, beta=beta, rule=rule, rope_base=10000.0)
    offset = (pos[:, -1] + 1) % block
    outs.append(out)
  return jnp.concatenate(outs, axis=1)


T, H, D = 48, 2, 4
DOC_STARTS = ([3, 13, 40], [16, 21])  # starts inside chunks and at chunk starts; row 0 doc 2 spans 4 blocks


@pytest.fixture(scope="module")
def layer_inputs():
  rng = np.random.default_rng(0)
  q, k, v = (rng.standard_normal((2, T, H, D)) for _ in range(3))
  ids = np.stack([np.searchsorted(np.array(s), np.arange(T), side="right") for s in DOC_STARTS])
  refs = {rule: [layer_reference(q[r], k[r], v[r], ids[r], block=BLOCK, rule=rule) for r in range(2)]
          for rule in ("linear", "delta")}
  refs = {rule: tuple(np.stack([r[i] for r in rows]) for i in range(2)) for rule, rows in refs.items()}
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  return f32(q), f32(k), f32(v), jnp.asarray(ids, jnp.int32), refs


# ---- the math ----

def test_registered_with_a_batch_first_float32_memory(model):
  assert "infini_attention" in list_models()
  state = model.init_state(3)
  layer = state["blocks"][0]
  assert layer["mem"].shape == (3, 4, 8, 8) and layer["mem"].dtype == jnp.float32
  assert layer["buf_k"].shape == (3, BLOCK, 4, 8)
  assert all(leaf.shape[0] == 3 for leaf in jax.tree.leaves(state))


def test_feature_map_is_elu_plus_one():
  x = jnp.linspace(-5, 5, 11)
  np.testing.assert_allclose(feature_map(x), sigma(np.asarray(x, np.float64)), rtol=1e-5)


@pytest.mark.parametrize("rule", ["linear", "delta"])
def test_memory_read_and_write_match_loops(rule):
  rng = np.random.default_rng(1)
  b, n, h, dk, dv = 2, 5, 3, 4, 6
  sq, sk = (sigma(rng.standard_normal((b, n, h, dk))) for _ in range(2))
  v = rng.standard_normal((b, n, h, dv))
  mem, z = rng.standard_normal((b, h, dk, dv)), np.abs(rng.standard_normal((b, h, dk))) * 3
  mask = rng.random((b, n)) < 0.7
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  read = memory_read(f32(sq), f32(mem), f32(z))
  dmem, dz = memory_write(f32(mem), f32(z), f32(sk), f32(v), jnp.asarray(mask), rule=rule)
  for r in range(b):
    assert rel_err(read[r], read_loop(sq[r], mem[r], z[r])) < 1e-5
    ref_m, ref_z = write_loop(mem[r], z[r], sk[r][mask[r]], v[r][mask[r]], rule)
    assert rel_err(dmem[r], ref_m) < 1e-5 and rel_err(dz[r], ref_z) < 1e-5
  assert not np.any(np.asarray(memory_read(f32(sq), jnp.zeros_like(f32(mem)), jnp.zeros_like(f32(z)))))


def test_chunk_layout_counts_blocks_from_each_document_start():
  pos, label = chunk_layout(jnp.array([1, 0]), jnp.array([[0, 0, 0, 0, 1, 1], [0, 0, 1, 1, 1, 2]]), block_len=4)
  np.testing.assert_array_equal(pos, [[1, 2, 3, 0, 0, 1], [0, 1, 0, 1, 2, 0]])
  # Row 0 continues a block at position 1, crosses into the next block, then a document starts at index 4.
  np.testing.assert_array_equal(label, [[0, 0, 0, 1, 6, 6], [0, 0, 4, 4, 4, 7]])
  assert [chunk_len(s, 8) for s in (1, 5, 8, 12, 16, 13)] == [1, 5, 8, 6, 8, 1]


@pytest.mark.parametrize("rule", ["linear", "delta"])
@pytest.mark.parametrize("chunk", [8, 1, 3, 6])
def test_layer_matches_the_per_document_block_loop(layer_inputs, rule, chunk):
  """Any chunking of a stream with documents starting inside chunks and at a chunk start gives the
  loop's A = sigmoid(beta) A_mem + (1 - sigmoid(beta)) A_local, per head."""
  q, k, v, ids, refs = layer_inputs
  beta = jnp.array([-1.0, 0.7])
  out = run_layer(q, k, v, ids, chunk=chunk, beta=beta, rule=rule)
  a_mem, a_local = refs[rule]
  g = 1 / (1 + np.exp(-np.asarray(beta, np.float64)))[None, None, :, None]
  assert rel_err(out, g * a_mem + (1 - g) * a_local) < 1e-5


def test_whole_blocks_match_the_per_document_block_loop():
  """Documents starting at block starts only, chunks of one block: every chunk takes `whole_block`."""
  rng = np.random.default_rng(5)
  q, k, v = (jnp.asarray(rng.standard_normal((2, T, H, D)), jnp.float32) for _ in range(3))
  ids = np.stack([np.searchsorted(np.array(s), np.arange(T), side="right") for s in ([16], [8, 32])])
  beta = jnp.array([0.3, -0.5])
  g = 1 / (1 + np.exp(-np.asarray(beta, np.float64)))[None, None, :, None]
  for rule in ("linear", "delta"):
    rows = [layer_reference(*(np.asarray(a[r], np.float64) for a in (q, k, v)), ids[r], block=BLOCK, rule=rule)
            for r in range(2)]
    a_mem, a_local = (np.stack([row[i] for row in rows]) for i in range(2))
    out = run_layer(q, k, v, jnp.asarray(ids, jnp.int32), chunk=BLOCK, beta=beta, rule=rule)
    assert rel_err(out, g * a_mem + (1 - g) * a_local) < 1e-5


@pytest.mark.parametrize("rule", ["linear", "delta"])
def test_whole_block_equals_the_general_form(rule):
  """On a chunk that is one block in every row, `whole_block` and the general form agree: output, new memory
  and the gradients of both with respect to q, k, v, beta and the incoming memory (random, nonzero)."""
  rng = np.random.default_rng(7)
  b, c, h, d = 2, BLOCK, 3, 4
  f32 = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  q, k, v = f32(b, c, h, d), f32(b, c, h, d), f32(b, c, h, d)
  memory = {"mem": f32(b, h, d, d), "z": jnp.abs(f32(b, h, d)) + 1.0, "dmem": jnp.zeros((b, h, d, d)),
            "dz": jnp.zeros((b, h, d)), "buf_k": f32(b, c, h, d), "buf_v": f32(b, c, h, d)}
  offset = jnp.zeros((b,), jnp.int32)
  pos, label = chunk_layout(offset, jnp.zeros((b, c), jnp.int32), block_len=c)
  beta = f32(h)
  weights = jax.tree.map(lambda x: f32(*x.shape), (q, memory))

  def loss(form, q, k, v, beta, mem, z):
    out, new = form(q, k, v, memory={**memory, "mem": mem, "z": z}, offset=offset, pos=pos, label=label, beta=beta,
                    rule=rule, rope_base=10000.0)
    return jnp.sum(out * weights[0]) + sum(jnp.sum(new[n] * weights[1][n]) for n in new), (out, new)

  args = (q, k, v, beta, memory["mem"], memory["z"])
  (_, (out, new)), grads = jax.value_and_grad(lambda *a: loss(whole_block, *a), argnums=range(6), has_aux=True)(*args)
  (_, (out_ref, new_ref)), grads_ref = jax.value_and_grad(lambda *a: loss(_any_chunk, *a), argnums=range(6),
                                                          has_aux=True)(*args)
  assert rel_err(out, out_ref) < 1e-6
  for n in new_ref:
    assert rel_err(new[n], new_ref[n]) < 1e-6 or float(jnp.max(jnp.abs(new[n] - new_ref[n]))) == 0.0, n
  for got, want in zip(grads, grads_ref):
    assert rel_err(got, want) < 1e-5
  # The dispatcher: this chunk takes `whole_block` (same values), a chunk with a document start the general form.
  out_dispatch, _ = infini_attention(q, k, v, memory=memory, offset=offset, pos=pos, label=label, beta=beta, rule=rule,
                                     rope_base=10000.0)
  assert rel_err(out_dispatch, out) < 1e-6


def test_gate_follows_the_paper(layer_inputs):
  """sigmoid(beta) -> 1 gives the memory read, -> 0 the local attention (lucidrains has it reversed)."""
  q, k, v, ids, refs = layer_inputs
  a_mem, a_local = refs["linear"]
  assert np.linalg.norm(a_mem) > 0.1 * np.linalg.norm(a_local)
  to_memory = run_layer(q, k, v, ids, chunk=8, beta=jnp.full((H,), 40.0), rule="linear")
  to_local = run_layer(q, k, v, ids, chunk=8, beta=jnp.full((H,), -40.0), rule="linear")
  assert rel_err(to_memory, a_mem) < 1e-5 and rel_err(to_local, a_local) < 1e-5


@pytest.mark.parametrize("chunk", [8, 1])
def test_a_block_reads_only_earlier_blocks(layer_inputs, chunk):
  """Changing a value in block s of a document changes the memory read of block s + 1 on, not of block s."""
  q, k, v, ids, _ = layer_inputs
  beta = jnp.full((H,), 40.0)  # the memory read alone
  tok = 13 + BLOCK + 2  # row 0, document 2 (starts at 13), block 1 = tokens 21..28
  other = v.at[0, tok].add(1.0)
  a = np.asarray(run_layer(q, k, v, ids, chunk=chunk, beta=beta, rule="delta")[0])
  b = np.asarray(run_layer(q, k, other, ids, chunk=chunk, beta=beta, rule="delta")[0])
  np.testing.assert_array_equal(a[:13 + 2 * BLOCK], b[:13 + 2 * BLOCK])
  assert np.all(np.abs(a[13 + 2 * BLOCK:40] - b[13 + 2 * BLOCK:40]).max(axis=(1, 2)) > 1e-6)
  np.testing.assert_array_equal(a[40:], b[40:])  # the next document


# ---- the model ----

@pytest.mark.parametrize("where", ["block_start", "inside_block"])
def test_memory_reaches_a_documents_tail(model, step, where):
  """Issue 22's tail test for a token-level reset: local attention reaches back only inside the block (and
  the conv 3 tokens), so the document's head reaches its tail only through the compressive memory."""
  start = 4 * BLOCK if where == "block_start" else 3 * BLOCK + BLOCK // 2 + 1
  contract.memory_reaches_the_tail(model, step, seg=2 * BLOCK, vocab=VOCAB, horizon=BLOCK + CFG.embed_conv - 1,
                                   next_start=start)


def test_gradients_reach_the_projections_through_the_memory(model):
  """The loss of the second block, with the first block run by a separate copy of the parameters: that
  copy's gradient is exactly the part that flows through the memory (the buffer is empty between whole
  blocks, the token history holds no parameters)."""
  graphdef, params = nnx.split(model)
  tokens = contract.randint(8, (1, 2 * BLOCK), VOCAB)

  def loss(first, second):
    m1, m2 = nnx.merge(graphdef, first), nnx.merge(graphdef, second)
    _, state = m1(tokens[:, :BLOCK], m1.init_state(1), reset=jnp.array([True]))
    logits, _ = m2(tokens[:, BLOCK:], state, reset=jnp.array([False]))
    return jnp.sum(jax.nn.log_softmax(logits)[..., 0])

  grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, params)
  flat = [{jax.tree_util.keystr(p): np.asarray(g) for p, g in jax.tree_util.tree_leaves_with_path(
      nnx.to_pure_dict(g))} for g in grads]
  assert all(np.all(np.isfinite(g)) for f in flat for g in f.values())
  via_memory = [p for p in flat[0] if p.endswith("['wk']") or p.endswith("['wv']")]
  assert len(via_memory) == 2 * CFG.num_layers
  for path in via_memory:
    assert np.linalg.norm(flat[0][path]) > 1e-3 * np.linalg.norm(flat[1][path]), f"no gradient through M: {path}"
  for name in ("wq", "wk", "wv", "wo", "beta"):
    hits = [p for p in flat[1] if p.endswith(f"['{name}']")]
    assert hits and all(np.linalg.norm(flat[1][p]) > 0 for p in hits), name


def test_flops_count_the_memory_and_the_local_attention():
  delta = dataclasses.replace(CFG, memory_update="delta")
  f_lin = InfiniAttention.flops_per_token(CFG, seg_len=16)
  f_delta = InfiniAttention.flops_per_token(delta, seg_len=16)
  h, hd, L = 4, 8, 2
  assert f_delta - f_lin == pytest.approx(L * 2 * h * hd * hd)  # whole blocks: one write
  f_lin_12, f_delta_12 = (InfiniAttention.flops_per_token(c, seg_len=12) for c in (CFG, delta))  # chunks of 6
  assert f_delta_12 - f_lin_12 == pytest.approx(L * 2 * 2 * h * hd * hd)  # two masked writes
  assert f_lin_12 > f_lin  # the buffer half of the local attention and the second read
  assert InfiniAttention.flops_per_token(CFG, seg_len=1) < f_lin_12


@pytest.mark.parametrize("change,match", [
    (dict(block_len=0), "block_len"), (dict(memory_update="hebbian"), "memory_update"),
    (dict(head_dim=7), "even"), (dict(embed_conv=1), "embed_conv"),
])
def test_config_errors(change, match):
  with pytest.raises(ConfigError, match=match):
    dataclasses.replace(CFG, **change).validate()
