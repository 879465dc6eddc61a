"""The contract every registered model keeps (docs/contracts.md section 1), run for every model in the registry.

A model registered anywhere (a new file in longctx/models/ is found by itself) gets these tests without a
test file of its own, on a tiny config built from its config class's `tiny` settings
(`models.tiny_config`):

  streams equal one pass     any cut the model accepts (token by token where it decodes), with documents
                             starting inside segments and blocks; logits and final state
  reset isolation            mixed reset patterns, both directions, per row
  no leak across documents   a document starting inside a segment sees nothing of the one before it
  memory or window           with a memory: a change reaches beyond the model's horizon (windows and convs);
                             without one (the baseline): nothing beyond it does
  a document reads the same wherever it starts in its lane (models that decode token by token)
  gradients through the state, finite everywhere
  clear errors for bad shapes; FLOPs, activation bytes and horizon hooks
  sharded == one device      3 train steps on fsdp 2 x tensor 2 x sequence 2 (documents inside blocks), and a
                             model with a context-parallel form of its own runs it there

The model files test their own math (against numpy loops, the papers' recurrences, Hugging Face).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import model_contract as contract
from conftest import rel_err
from longctx.config import MeshConfig
from longctx.errors import LongctxError
from longctx.models import create_model, get_model_class, list_models, tiny_config

MODELS = list(list_models())
DECODING = [name for name in MODELS if get_model_class(name).supports_token_decoding]
VOCAB = 50
_BUILT: dict = {}


def _built(name: str):
  """(model, jitted step) of the tiny config, built once per test process."""
  if name not in _BUILT:
    cfg = tiny_config(name)
    cfg.validate()
    model = create_model(cfg, seed=0)
    _BUILT[name] = (model, contract.make_step(model))
  return _BUILT[name]


@pytest.fixture(params=MODELS)
def model(request):
  return _built(request.param)[0]


@pytest.fixture
def step(model):
  return _built(model.cfg.name)[1]


def _block(model) -> int:
  return type(model).segment_multiple(model.cfg)


def _segment(model) -> int:
  """A segment of two blocks (16 tokens for the models that take any length)."""
  return 2 * _block(model) if _block(model) > 1 else 16


def _cuts(model) -> list[int]:
  block = _block(model)
  if block > 1:
    return [block, 2 * block]
  return [8, 5] + ([1] if type(model).supports_token_decoding else [])


def test_every_model_has_a_tiny_config_and_a_description():
  for name in MODELS:
    cls = get_model_class(name)
    assert cls.description and cls.config_class is type(tiny_config(name))
    tiny_config(name).validate()


def test_streams_equal_one_pass(model, step):
  n = 4 * _segment(model)
  contract.segment_invariance(model, step, n=n, segs=_cuts(model), vocab=VOCAB)
  ids = np.zeros((2, n), np.int32)
  ids[0, n // 3:] += 1  # a document starting inside a segment (and a block)
  ids[0, 2 * n // 3 + 1:] += 1
  ids[1, n // 2:] += 1  # one starting at a segment (and block) boundary
  contract.segment_invariance(model, step, n=n, segs=_cuts(model), vocab=VOCAB, segment_ids=jnp.asarray(ids))


def test_reset_isolation(model, step):
  contract.reset_isolation(model, step, seg=_segment(model), vocab=VOCAB)


@pytest.mark.parametrize("where", ["block_start", "inside"])
def test_no_leak_across_documents(model, step, where):
  seg = _segment(model)
  boundary = seg // 2 if where == "block_start" else seg // 2 + 3
  contract.no_leak_across_documents(model, step, seg=seg, boundary=boundary, vocab=VOCAB)


def test_memory_reaches_beyond_the_horizon_or_nothing_does(model, step):
  cls = type(model)
  horizon = cls.horizon(model.cfg)
  seg = _segment(model)
  segments = max(4, -(-(horizon + 8) // seg))
  if cls.has_memory:
    contract.memory_carries(model, step, seg=seg, vocab=VOCAB, horizon=horizon, segments=segments)
  else:
    with pytest.raises(AssertionError, match="memory carries nothing"):
      contract.memory_carries(model, step, seg=seg, vocab=VOCAB, horizon=horizon, segments=segments)


@pytest.mark.parametrize("name", DECODING)
def test_a_document_reads_the_same_wherever_it_starts(name):
  """The same document alone, and after another one that ends inside a segment: the same logits. (Models that
  read whole blocks count a document's blocks from its lane's: data.align_documents starts it at one.)"""
  model, step = _built(name)
  doc = contract.randint(30, (1, 24), VOCAB)
  alone, _ = contract.stream(model, step, doc, 8)
  prefix = contract.randint(31, (1, 13), VOCAB)
  tokens = jnp.concatenate([prefix, doc, jnp.zeros((1, 3), jnp.int32)], axis=1)
  ids = (jnp.arange(40) >= 13).astype(jnp.int32)[None]
  packed, _ = contract.stream(model, step, tokens, 8, segment_ids=ids)
  assert rel_err(packed[:, 13:37], alone) < 1e-5


def test_gradients_flow_through_the_state(model):
  """The loss of a later segment depends on the state the earlier ones left (a nonzero gradient), and every
  gradient is finite."""
  graphdef, params = nnx.split(model)
  seg = _segment(model)
  tokens = contract.randint(8, (1, 2 * seg), VOCAB)

  def loss(params, scale):
    m = nnx.merge(graphdef, params)
    _, state = m(tokens[:, :seg], m.init_state(1), reset=jnp.array([True]))
    state = jax.tree.map(lambda s: s * scale if jnp.issubdtype(s.dtype, jnp.floating) else s, state)
    logits, _ = m(tokens[:, seg:], state, reset=jnp.array([False]))
    return jnp.sum(jax.nn.log_softmax(logits)[..., 0])

  g_params, g_scale = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, 1.0)
  assert np.isfinite(float(g_scale)) and abs(float(g_scale)) > 0, "the next segment does not read the state"
  assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(g_params))


def test_bad_shapes_are_clear_errors(model):
  seg = _segment(model)
  with pytest.raises(LongctxError, match=r"tokens must be \[batch, seg_len\]"):
    model(jnp.zeros((seg,), jnp.int32), model.init_state(4), reset=jnp.zeros((4,), bool))
  with pytest.raises(LongctxError, match=r"reset must be \[batch\]"):
    model(jnp.zeros((4, seg), jnp.int32), model.init_state(4), reset=jnp.zeros((3,), bool))
  if _block(model) > 1:
    with pytest.raises(LongctxError, match="reads whole blocks"):
      model(jnp.zeros((2, _block(model) + 1), jnp.int32), model.init_state(2), reset=jnp.ones((2,), bool))


def test_cost_hooks(model):
  cls, cfg = type(model), model.cfg
  flops = cls.flops_per_token(cfg, seg_len=_segment(model))
  assert np.isfinite(flops) and flops > 2 * cfg.d_model * cfg.vocab_size  # the head and more
  assert cls.activation_bytes_per_token(cfg, dtype_bytes=2) > 0
  assert cls.horizon(cfg) >= 0


CONTEXT_MESH = MeshConfig(data=1, fsdp=2, tensor=2, sequence=2)


@pytest.mark.parametrize("name", MODELS)
def test_sharded_matches_one_device(name, eight_devices):
  """fsdp 2 x tensor 2 x sequence 2 against 1 device, documents starting inside blocks (align 0)."""
  cfg = tiny_config(name, vocab_size=259)
  seg = 32 if get_model_class(name).segment_multiple(cfg) <= 16 else 2 * get_model_class(name).segment_multiple(cfg)
  results = contract.sharded_matches_one_device(cfg, eight_devices, seg_len=seg, mesh=CONTEXT_MESH)
  if get_model_class(name).context_parallel:
    assert contract.runs_context_parallel_form(results["8-trainer"]), "its context-parallel form did not run"
