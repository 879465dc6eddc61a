"""Recurrent Memory Transformer: the model contract, its masks and its recurrence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import model_contract as contract
from conftest import rel_err
from longctx.errors import ConfigError, LongctxError
from longctx.kernels.ring_attention import visible_mask
from longctx.layers import rotary
from longctx.layers.context import Context
from longctx.models import RMTConfig, create_model, list_models
from longctx.models.rmt import MemoryAttention

VOCAB, WINDOW, BLOCK, MEM = 50, 8, 8, 4


@pytest.fixture(scope="module")
def model():
  cfg = RMTConfig(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, window=WINDOW,
                  block_len=BLOCK, num_memory=MEM)
  cfg.validate()
  return create_model(cfg, seed=0)


@pytest.fixture(scope="module")
def step(model):
  return contract.make_step(model)


def test_registered():
  assert "rmt" in list_models()


class TestTail(contract.BlockwiseTailContract):
  VOCAB, BLOCK = VOCAB, BLOCK
  HORIZON = 2 * WINDOW  # the XL cache: num_layers x window


def test_gradients_flow_through_the_memory(model):
  contract.gradients_reach(model, seg=BLOCK, vocab=VOCAB, names=["memory_init", "memory_out_norm", "wq"])


def test_written_memory_starts_at_the_embedding_scale(model, step):
  """At initialisation the memory a block writes has the per-element RMS of the initial memory and the
  embeddings (1/sqrt(d_model)), not sqrt(d_model) times it. (Issue 22: with the norm's scale at 1 the
  memory's residual stream was 11x the tokens' at d_model 128, and a trained RMT's dependence on tokens
  beyond its window stayed ~1e-3 nats; this check fails on that code: RMS 1.0 against 0.17.)"""
  d = model.cfg.d_model
  tokens = contract.randint(3, (2, BLOCK), VOCAB)
  _, state = step(tokens, model.init_state(2), jnp.ones(2, bool), jnp.zeros_like(tokens))
  rms = lambda x: float(np.sqrt(np.mean(np.square(np.asarray(x)))))
  initial = rms(model.memory_init[...])
  written = rms(state["memory"])
  assert 0.5 * d ** -0.5 < initial < 2 * d ** -0.5
  assert 0.5 * initial < written < 2 * initial, (written, initial)


def rmt_mask(*, q_doc, k_doc, window: int, num_memory: int) -> jax.Array:
  """The visibility of RMT's rows written out as one dense mask `[batch, 2m + L, W + 2m + L]`: queries [read;
  tokens; write] over keys [cache; read; tokens; write] (the model builds it from key blocks instead).

    read slot i   read slots <= i
    token         the read slots, plus the sliding window over [XL cache; block] of its own document
    write slot i  the read slots, the block tokens of the block's last document, and write slots <= i
  """
  b, L = q_doc.shape
  W = k_doc.shape[1] - L
  m = num_memory
  causal_m = jnp.broadcast_to(jnp.tril(jnp.ones((m, m), bool)), (b, m, m))
  none = lambda q, k: jnp.zeros((b, q, k), bool)
  all_ = lambda q, k: jnp.ones((b, q, k), bool)
  pos = jnp.arange(W + L)
  tok = visible_mask(pos[W:], pos, q_doc, k_doc, window=window)  # [b, L, W + L]
  last = jnp.broadcast_to((q_doc == q_doc[:, -1:])[:, None, :], (b, m, L))
  read_rows = jnp.concatenate([none(m, W), causal_m, none(m, L), none(m, m)], axis=2)
  tok_rows = jnp.concatenate([tok[:, :, :W], all_(L, m), tok[:, :, W:], none(L, m)], axis=2)
  write_rows = jnp.concatenate([none(m, W), all_(m, m), last, causal_m], axis=2)
  return jnp.concatenate([read_rows, tok_rows, write_rows], axis=1)


def test_mask_rows():
  q_doc = jnp.array([[0, 0, 1, 1]])
  k_doc = jnp.array([[-1, 0, 0, 0, 1, 1]])  # cache of 2 (one invalid slot), block of 4
  mask = np.asarray(rmt_mask(q_doc=q_doc, k_doc=k_doc, window=2, num_memory=2))[0]
  assert mask.shape == (2 + 4 + 2, 2 + 2 + 4 + 2)
  read, tok, write = mask[:2], mask[2:6], mask[6:]
  np.testing.assert_array_equal(read, [[0, 0, 1, 0, 0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0, 0, 0, 0, 0]])
  # Tokens: read slots, then the baseline's window mask over [cache; block], no write slots.
  np.testing.assert_array_equal(tok[:, 2:4], np.ones((4, 2)))
  np.testing.assert_array_equal(tok[:, 8:], np.zeros((4, 2)))
  np.testing.assert_array_equal(tok[0, [0, 1, 4, 5, 6, 7]], [0, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(tok[3, [0, 1, 4, 5, 6, 7]], [0, 0, 0, 0, 1, 1])  # new document: own tokens only
  # Write slots: read slots, the last document's tokens, causal among themselves.
  np.testing.assert_array_equal(write, [[0, 0, 1, 1, 0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 0, 0, 1, 1, 1, 1]])


def rmt_dense_attention(mixer, h, state, ctx):
  """The memory attention written out densely with `rmt_mask`: the oracle for the key-block form."""
  cfg = mixer.cfg
  m, L, W = cfg.num_memory, ctx.doc.shape[1], cfg.window
  q, k, v = mixer.qkv(h)
  pos = jnp.arange(W + L)
  rot = lambda t, p: rotary(t, p, base=cfg.rope_base)
  q = jnp.concatenate([q[:, :m], rot(q[:, m:m + L], pos[W:]), q[:, m + L:]], axis=1)
  k_all = jnp.concatenate([rot(state["k"], pos[:W]), k[:, :m], rot(k[:, m:m + L], pos[W:]), k[:, m + L:]], axis=1)
  v_all = jnp.concatenate([state["v"], v], axis=1)
  mask = rmt_mask(q_doc=ctx.doc, k_doc=jnp.concatenate([ctx.history_doc(W), ctx.doc], axis=1), window=W,
                  num_memory=m)
  b, s, hq, d = q.shape
  kvh = k.shape[2]
  scores = jnp.einsum("bskgd,btkd->bkgst", q.reshape(b, s, kvh, hq // kvh, d), k_all) * d ** -0.5
  scores = jnp.where(mask[:, None, None], scores, -1e30)
  probs = jnp.where(mask[:, None, None], jax.nn.softmax(scores, axis=-1), 0.0)
  return mixer.out(jnp.einsum("bkgst,btkd->bskgd", probs, v_all).reshape(b, s, hq, d))


@pytest.mark.parametrize("kernel", ["reference", "xla", "pallas"])
def test_memory_attention_matches_the_dense_mask(kernel):
  """The mixer's key blocks (read, tokens, write and the cache) give the rows of `rmt_mask`, with a cache
  that is partly another document's and a document starting inside the block, under every kernel."""
  cfg = RMTConfig(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, window=6, block_len=8,
                  num_memory=3, kernel=kernel, attention_block=4)
  mixer = MemoryAttention(cfg, layer=0, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.normal(size=(2, 2 * 3 + 8, 32)), jnp.float32)
  state = {key: jnp.asarray(rng.normal(size=(2, 6, 2, 8)), jnp.float32) for key in ("k", "v")}
  ctx = Context.of(jnp.asarray([[0] * 5 + [1] * 3, [0] * 8], jnp.int32), jnp.asarray([4, 20], jnp.int32))
  got, _ = mixer(h, state, ctx)
  assert rel_err(got, rmt_dense_attention(mixer, h, state, ctx)) < 1e-5


def test_errors_are_clear(model):
  with pytest.raises(LongctxError, match="not a multiple of model.block_len=8"):
    model(jnp.zeros((2, 12), jnp.int32), model.init_state(2), reset=jnp.ones((2,), bool))
  with pytest.raises(ConfigError, match="num_memory"):
    RMTConfig(num_memory=0).validate()
