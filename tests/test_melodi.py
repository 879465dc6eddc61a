"""MELODI: the model contract, its masks, the long-term FIFO and the memory footprint."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import model_contract as contract
from conftest import rel_err
from longctx.errors import ConfigError, LongctxError
from longctx.models import create_model, list_models
from longctx.models.melodi import Melodi, MelodiConfig, fifo_append

VOCAB, BLOCK, S, U, M, A = 50, 8, 4, 4, 12, 4


def tiny(**kw):
  cfg = MelodiConfig(**{**dict(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4, block_len=BLOCK,
                               short_memory=S, summary_tokens=U, long_memory_size=M, long_append=A), **kw})
  cfg.validate()
  return cfg


@pytest.fixture(scope="module")
def model():
  return create_model(tiny(), seed=0)


@pytest.fixture(scope="module")
def step(model):
  return contract.make_step(model)


def test_registered(model):
  assert "melodi" in list_models()
  assert model.cfg.resolved_long_layer == 1  # the middle of 2 layers
  state = model.init_state(3)
  shapes = jax.tree.map(lambda x: (x.shape, x.dtype.name), state)
  assert shapes == {"pos": ((3,), "int32"),
                    "blocks": [{"short": ((3, S, 32), "float32")},
                               {"short": ((3, S, 32), "float32"), "long": ((3, M, 32), "float32"),
                                "long_valid": ((3, M), "bool")}]}


class TestTail(contract.BlockwiseTailContract):
  VOCAB, BLOCK = VOCAB, BLOCK
  HORIZON = BLOCK  # no XL cache: all a window knows of earlier ones comes through the memory
  TAIL_CONFIG = {}  # no XL cache to outrun: the module's model


def test_gradients_flow_through_the_memory(model):
  contract.gradients_reach(model, seg=BLOCK, vocab=VOCAB,
                           names=["summary_tokens", "mix_short", "mix_summary", "mix_long", "long_gate"])


def test_long_memory_is_a_fifo(model, step):
  """Window by window, the FIFO drops its oldest A entries and appends the window's A at the end."""
  n = 4  # 16 entries appended into 12 slots: wraps
  tokens = contract.randint(11, (2, n * BLOCK), VOCAB)
  state = model.init_state(2)
  appended = []  # sim_*: a numpy FIFO of (entry, valid) built from each window's appended entries
  sim_mem, sim_valid = np.zeros((2, M, 32), np.float32), np.zeros((2, M), bool)
  for k in range(n):
    _, state = step(tokens[:, k * BLOCK:(k + 1) * BLOCK], state, jnp.array([k == 0] * 2),
                    jnp.zeros((2, BLOCK), jnp.int32))
    mem, valid = np.asarray(state["blocks"][1]["long"]), np.asarray(state["blocks"][1]["long_valid"])
    appended.append(mem[:, -A:])
    sim_mem = np.concatenate([sim_mem[:, A:], appended[-1]], axis=1)
    sim_valid = np.concatenate([sim_valid[:, A:], np.ones((2, A), bool)], axis=1)
    np.testing.assert_array_equal(mem, sim_mem)
    np.testing.assert_array_equal(valid, sim_valid)
    np.testing.assert_array_equal(valid[0], np.arange(M) >= M - min(M, A * (k + 1)))
  np.testing.assert_array_equal(mem, np.concatenate(appended[-(M // A):], axis=1))  # the last 3 windows, in order
  assert all(np.abs(a).sum() > 0 for a in appended) and not np.array_equal(appended[-1], appended[-2])
  # One pass over the 4 windows ends in the same FIFO.
  _, one = step(tokens, model.init_state(2), jnp.array([True, True]), jnp.zeros(tokens.shape, jnp.int32))
  np.testing.assert_allclose(np.asarray(one["blocks"][1]["long"]), mem, rtol=1e-5, atol=1e-6)


def test_fifo_append():
  mem = jnp.arange(2 * 5 * 1, dtype=jnp.float32).reshape(2, 5, 1)
  valid = jnp.array([[False, False, True, True, True]] * 2)
  new = -jnp.ones((2, 2, 1))
  out, out_valid = fifo_append(mem, valid, new)
  np.testing.assert_array_equal(np.asarray(out)[0, :, 0], [2, 3, 4, -1, -1])
  np.testing.assert_array_equal(np.asarray(out_valid)[0], [True, True, True, True, True])


def melodi_mask(q_doc, short_valid, *, short_memory: int, summary_tokens: int):
  """The visibility of MELODI's rows written out as one dense mask `[b, W+U, S+W+U]`: queries [tokens; summary]
  over keys [short memory; tokens; summary] (the model builds it from key blocks instead)."""
  b, W = q_doc.shape
  S, U = short_memory, summary_tokens
  row_doc = jnp.concatenate([q_doc, jnp.broadcast_to(q_doc[:, -1:], (b, U))], axis=1)  # summary = last doc
  mem = jnp.broadcast_to((short_valid[:, None] & (row_doc == 0))[:, :, None], (b, W + U, S))
  tok_tok = jnp.tril(jnp.ones((W, W), bool))[None] & (q_doc[:, :, None] == q_doc[:, None, :])
  sum_tok = jnp.broadcast_to((q_doc == q_doc[:, -1:])[:, None, :], (b, U, W))
  rows_tok = jnp.concatenate([tok_tok, sum_tok], axis=1)
  rows_sum = jnp.concatenate([jnp.zeros((b, W, U), bool), jnp.broadcast_to(jnp.tril(jnp.ones((U, U), bool)),
                                                                            (b, U, U))], axis=1)
  return jnp.concatenate([mem, rows_tok, rows_sum], axis=2)


def long_mask(q_doc, long_valid, *, summary_tokens: int):
  """`[b, W+U, M]`: the FIFO's valid entries, to document 0 only."""
  b = q_doc.shape[0]
  row_doc = jnp.concatenate([q_doc, jnp.broadcast_to(q_doc[:, -1:], (b, summary_tokens))], axis=1)
  return long_valid[:, None, :] & (row_doc == 0)[:, :, None]


def test_masks():
  q_doc = jnp.array([[0, 0, 1, 1]])  # a document starts inside the window
  mask = np.asarray(melodi_mask(q_doc, jnp.array([True]), short_memory=2, summary_tokens=2))[0]
  assert mask.shape == (4 + 2, 2 + 4 + 2)
  tok, summ = mask[:4], mask[4:]
  np.testing.assert_array_equal(tok[:, :2], [[1, 1], [1, 1], [0, 0], [0, 0]])  # memory: document 0 only
  np.testing.assert_array_equal(tok[:, 2:6], [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]])
  np.testing.assert_array_equal(tok[:, 6:], np.zeros((4, 2)))  # tokens never see summary tokens
  # Summary tokens: no memory (they belong to document 1), the last document's tokens, causal among themselves.
  np.testing.assert_array_equal(summ, [[0, 0, 0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 1, 1, 1, 1]])
  lm = np.asarray(long_mask(q_doc, jnp.array([[False, True, True]]), summary_tokens=2))[0]
  np.testing.assert_array_equal(lm, [[0, 1, 1]] * 2 + [[0, 0, 0]] * 4)


def _dense(q, k, v, mask):
  b, s, h, d = q.shape
  kvh = k.shape[2]
  scores = jnp.einsum("bskgd,btkd->bkgst", q.reshape(b, s, kvh, h // kvh, d), k) * d ** -0.5
  scores = jnp.where(mask[:, None, None], scores, -1e30)
  probs = jnp.where(mask[:, None, None], jax.nn.softmax(scores, axis=-1), 0.0)
  return jnp.einsum("bkgst,btkd->bskgd", probs, v).reshape(b, s, h, d)


@pytest.mark.parametrize("kernel", ["reference", "xla", "pallas"])
@pytest.mark.parametrize("start", [0, 5], ids=["new_document", "memory_valid"])
def test_attention_matches_the_dense_masks(kernel, start):
  """The layer's key blocks give the rows of `melodi_mask`, and its FIFO read those of `long_mask`, under every
  kernel: a window with a document starting inside it, short memory valid or not, a partly valid FIFO."""
  from longctx.layers import project, rotary
  from longctx.layers.context import Context
  from longctx.models.melodi import MelodiAttention

  cfg = tiny(kernel=kernel, attention_block=4, block_len=6, long_layer=0)
  mixer = MelodiAttention(cfg, layer=0, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(1)
  W = 6
  xn = jnp.asarray(rng.normal(size=(2, W + U, 32)), jnp.float32)
  memory = jnp.asarray(rng.normal(size=(2, S, 32)), jnp.float32)
  fifo = jnp.asarray(rng.normal(size=(2, M, 32)), jnp.float32)
  valid = jnp.asarray(rng.random((2, M)) < 0.5)
  ctx = Context.of(jnp.asarray([[0, 0, 0, 1, 1, 1], [0] * 6], jnp.int32), jnp.asarray([start, start], jnp.int32))
  got = mixer.attend(xn, memory, ctx, long=(fifo, valid))
  q = project(xn, mixer.wq)
  kv_in = jnp.concatenate([memory, xn], axis=1)
  k, v = project(kv_in, mixer.wk), project(kv_in, mixer.wv)
  pos = jnp.arange(S + W + U)
  mask = melodi_mask(ctx.doc, ctx.start > 0, short_memory=S, summary_tokens=U)
  y_self = _dense(rotary(q, pos[S:]), rotary(k, pos), v, mask)
  y_long = _dense(q, project(fifo, mixer.wk), project(fifo, mixer.wv), long_mask(ctx.doc, valid, summary_tokens=U))
  alpha = jax.nn.sigmoid(mixer.long_gate[...])
  assert rel_err(got, mixer.out(alpha * y_self + (1 - alpha) * y_long)) < 1e-5


class TestEmbedConvContract(contract.BlockwiseContract):
  """With the token conv (its history in the state, beside the memory), MELODI still keeps the contract."""
  VOCAB, BLOCK = VOCAB, BLOCK
  HORIZON = BLOCK + 2  # the block, plus the conv's history of embed_conv - 1 tokens
  TAIL_CONFIG = {}

  @pytest.fixture(scope="class")
  @classmethod
  def model(cls):
    m = create_model(tiny(embed_conv=3), seed=2)
    assert set(m.init_state(2)) == {"pos", "blocks", "history"}
    return m

  @pytest.fixture(scope="class")
  @classmethod
  def step(cls, model):
    return contract.make_step(model)


def test_without_long_memory_and_unequal_short_summary():
  cfg = tiny(long_memory_size=0, short_memory=3, num_layers=1)
  m = create_model(cfg, seed=1)
  state = m.init_state(2)
  assert set(state["blocks"][0]) == {"short"} and m.blocks[0].mix_long is None
  assert m.blocks[0].mix_short.norm_x is None  # S != U: a plain linear mixer, as meliad
  assert m.blocks[0].mix_summary is None  # the last layer's summary would be discarded: none
  logits, state = m(jnp.ones((2, 16), jnp.int32), state, reset=jnp.ones((2,), bool))
  assert logits.shape == (2, 16, VOCAB) and np.all(np.isfinite(np.asarray(logits)))
  assert state["blocks"][0]["short"].shape == (2, 3, 32) and bool((state["pos"] > 0).all())


def state_bytes(model, batch=1):
  state = jax.eval_shape(lambda: model.init_state(batch))
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state))


def test_state_bytes_per_lane(model):
  assert Melodi.state_bytes_per_lane(model.cfg) == state_bytes(model)
  assert Melodi.state_bytes_per_lane(tiny(long_memory_size=0)) == 4 * 2 * S * 32 + 4
  # Reference scale (base_melodi.gin) against a Memorizing Transformer with 64K (key, value) pairs in one layer.
  from longctx.models.memorizing import MemorizingConfig
  from longctx.models import build_model
  ref = MelodiConfig(vocab_size=256, d_model=1024, num_layers=12, num_heads=8, block_len=512, short_memory=64,
                     summary_tokens=64, long_memory_size=4096, long_append=32, long_layer=6)
  mem = MemorizingConfig(vocab_size=256, d_model=1024, num_layers=12, num_heads=8, window=512, block_len=512,
                         memory_size=65536, knn_layers=[6])
  melodi_bytes = Melodi.state_bytes_per_lane(ref)
  memorizing_bytes = state_bytes(nnx.eval_shape(lambda: build_model(mem, rngs=nnx.Rngs(0))))
  assert melodi_bytes == 4 * (12 * 64 + 4096) * 1024 + 4096 + 4
  assert memorizing_bytes / melodi_bytes > 8


def test_flops_per_token(model):
  cfg = model.cfg
  f = Melodi.flops_per_token(cfg, seg_len=32)
  no_long = Melodi.flops_per_token(tiny(long_memory_size=0), seg_len=32)
  assert f > no_long > 2 * cfg.d_model * VOCAB


def test_errors_are_clear(model):
  with pytest.raises(LongctxError, match="not a multiple of model.block_len=8"):
    model(jnp.zeros((2, 12), jnp.int32), model.init_state(2), reset=jnp.ones((2,), bool))
  for kw, key in [(dict(short_memory=0), "model.short_memory"), (dict(summary_tokens=0), "model.summary_tokens"),
                  (dict(long_memory_size=-1), "model.long_memory_size"), (dict(long_append=0), "model.long_append"),
                  (dict(long_append=13), "model.long_append"), (dict(long_layer=2), "model.long_layer"),
                  (dict(long_layer=-2), "model.long_layer")]:
    with pytest.raises(ConfigError, match=key):
      tiny(**kw)
