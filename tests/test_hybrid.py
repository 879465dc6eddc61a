"""Hybrid stacks: each layer is exactly a layer of the model it names (same parameters, same logits), the kinds'
configs share the hybrid's sizes and take their own settings, the config's refusals, the CLI's list syntax.
The streaming contract (any cut, reset, no leak, sharded with each layer's context-parallel form) is
tests/test_contract.py's, on the tiny mamba2 + transformer stack."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from longctx.config import Config, apply_overrides
from longctx.errors import ConfigError
from longctx.layers.context import Context
from longctx.models import HybridConfig, Mamba2Config, TransformerConfig, create_model
from longctx.models.hybrid import stackable_models

SIZES = dict(vocab_size=50, d_model=32, num_heads=2, window=8, kernel="xla")
MAMBA2 = ["mamba2.head_dim=16", "mamba2.state_size=8", "mamba2.chunk_size=8"]


def test_layers_repeat_and_kinds_share_the_hybrids_sizes():
  cfg = HybridConfig(**SIZES, num_layers=5, layers="mamba2,mamba2,transformer", d_ff=96,
                     settings=[*MAMBA2, "transformer.num_kv_heads=1"])
  cfg.validate()
  assert cfg.kinds() == ["mamba2", "mamba2", "transformer", "mamba2", "mamba2"]
  assert cfg.layer_pattern() == ["mamba2", "mamba2", "attention", "mamba2", "mamba2"]
  attention = cfg.kind_config("transformer")
  assert attention == TransformerConfig(**SIZES, num_layers=5, d_ff=96, num_kv_heads=1)
  mamba2 = cfg.kind_config("mamba2")
  assert (mamba2.d_model, mamba2.num_layers, mamba2.head_dim, mamba2.state_size, mamba2.num_heads) == (32, 5, 16, 8, 0)


def _copy_into(target, source):
  """`target` with `source`'s parameters (the same tree of the same shapes)."""
  graphdef, state = nnx.split(target)
  src = nnx.state(source)
  assert jax.tree.structure(state) == jax.tree.structure(src)
  return nnx.merge(graphdef, src)


@pytest.mark.parametrize("kind,settings,config", [
    ("transformer", [], TransformerConfig(**SIZES, num_layers=2)),
    ("mamba2", MAMBA2, Mamba2Config(**{k: v for k, v in SIZES.items() if k not in ("num_heads", "window")},
                                    num_layers=2, head_dim=16, state_size=8, chunk_size=8, norm_eps=1e-6)),
])
def test_a_one_kind_hybrid_is_that_model(kind, settings, config):
  """Same parameter tree, and with the model's parameters the same logits and state (bitwise)."""
  hybrid = create_model(HybridConfig(**SIZES, num_layers=2, layers=kind, settings=settings), seed=1)
  model = create_model(config, seed=0)
  hybrid = _copy_into(hybrid, model)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 50, (2, 24)), jnp.int32)
  reset = jnp.ones((2,), bool)
  a, sa = hybrid(tokens, hybrid.init_state(2), reset=reset)
  b, sb = model(tokens, model.init_state(2), reset=reset)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for x, y in zip(jax.tree.leaves(sa), jax.tree.leaves(sb)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_mixed_stack_runs_each_layer_as_its_own_model_does():
  """mamba2 then transformer, with block 0 taken from a mamba2 model and block 1 from a transformer: the hybrid's
  logits equal its embedding, then those two models' own blocks, its final norm and head."""
  cfg = HybridConfig(**SIZES, num_layers=2, layers="mamba2,transformer", settings=MAMBA2)
  hybrid = create_model(cfg, seed=2)
  m2_model = create_model(cfg.kind_config("mamba2"), seed=3)
  tf_model = create_model(cfg.kind_config("transformer"), seed=4)
  graphdef, state = nnx.split(hybrid)
  state["blocks"][0] = nnx.state(m2_model)["blocks"][0]
  state["blocks"][1] = nnx.state(tf_model)["blocks"][1]
  hybrid = nnx.merge(graphdef, state)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 50, (2, 24)), jnp.int32)
  logits, _ = hybrid(tokens, hybrid.init_state(2), reset=jnp.ones((2,), bool))
  ctx = Context.of(jnp.zeros((2, 24), jnp.int32), jnp.zeros((2,), jnp.int32))
  x = hybrid.embedding.embed(tokens, jnp.float32)
  x, _ = m2_model.blocks[0](x, m2_model.blocks[0].init_state(2), ctx)
  x, _ = tf_model.blocks[1](x, tf_model.blocks[1].init_state(2), ctx)
  expected = hybrid.embedding.logits(hybrid.final_norm(x))
  np.testing.assert_array_equal(np.asarray(logits), np.asarray(expected))


def test_settings_from_the_command_line():
  cfg = Config(model=HybridConfig(**SIZES, layers="mamba2,transformer"))
  cfg = apply_overrides(cfg, ["model.settings=mamba2.head_dim=16,mamba2.state_size=8,transformer.num_kv_heads=1"])
  assert cfg.model.settings == ["mamba2.head_dim=16", "mamba2.state_size=8", "transformer.num_kv_heads=1"]
  cfg.model.validate()
  assert cfg.model.kind_config("transformer").num_kv_heads == 1 and cfg.model.kind_config("mamba2").state_size == 8


def test_stackable_models_are_the_one_mixer_models():
  assert stackable_models() == ["gated_deltanet", "gla", "mamba", "mamba2", "mlstm", "retnet", "transformer"]


@pytest.mark.parametrize("change,match", [
    (dict(layers="mamba2,rmt"), "rmt cannot be a hybrid's layer .* stackable: gated_deltanet, gla, mamba"),
    (dict(layers="mamba2,griffin"), "griffin cannot be a hybrid's layer"),
    (dict(layers="mamba2,llama"), "unknown model 'llama'; registered models:"),
    (dict(layers=","), "names no layer"),
    (dict(settings=["mamba2.d_model=64"]), "d_model is the hybrid's own; set model.d_model"),
    (dict(settings=["retnet.chunk_size=8"]), "'retnet' is not one of model.layers"),
    (dict(settings=["mamba2.nope=1"]), "mamba2 has no field 'nope'"),
    (dict(settings=["mamba2.head_dim"]), "must read kind.field=value"),
    (dict(settings=["mamba2.head_dim=7"]), "the mamba2 layers of model.layers: expand x d_model = 256"),
    (dict(settings=["mamba2.head_dim=x"]), "expected an int"),
])
def test_config_refuses(change, match):
  with pytest.raises(ConfigError, match=match):
    HybridConfig(**{**dict(layers="mamba2,transformer", d_model=128), **change}).validate()
