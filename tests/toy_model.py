"""A new model in one file: a gated running mean (tests/test_new_model.py shows what it gets for free).

    y_t = W_o (sigmoid(x_t W_g) * mean_{s <= t in x_t's document} x_s W_v)

The mixer's state is the sum of the open document's values `[batch, d]`; how many tokens it holds is the
context's position. Importing this module registers the mixer and the model; nothing else is edited.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from longctx.config import ModelConfig
from longctx.layers import Mixer, param, register_mixer
from longctx.layers.context import Context
from longctx.models import LM, register_model


@dataclasses.dataclass
class ToyConfig(ModelConfig):
  mixer = "running_mean"
  name: str = "toy"


@register_mixer("running_mean")
class RunningMean(Mixer):
  def __init__(self, cfg, *, layer: int, rngs: nnx.Rngs):
    d = cfg.d_model
    self.w_gate = param(rngs, (d, d), ("embed", "mlp"), fan_in=d)
    self.w_value = param(rngs, (d, d), ("embed", "mlp"), fan_in=d)
    self.w_out = param(rngs, (d, d), ("mlp", "embed"), fan_in=d, scale=1.0 / (2 * cfg.num_layers))

  def init_state(self, batch_size: int) -> dict:
    return {"sum": jnp.zeros((batch_size, self.w_value.shape[1]), jnp.float32)}

  def __call__(self, x, state, ctx: Context):
    v = (x @ self.w_value[...].astype(x.dtype)).astype(jnp.float32)  # [b, s, d]
    same = (ctx.doc[:, :, None] == ctx.doc[:, None, :]) & jnp.tril(jnp.ones((x.shape[1],) * 2, bool))
    carried = jnp.where((ctx.doc == 0)[..., None], state["sum"][:, None], 0.0)
    sums = carried + jnp.einsum("bts,bsd->btd", same.astype(jnp.float32), v)
    mean = sums / (ctx.pos + 1)[..., None]
    y = jax.nn.sigmoid(x @ self.w_gate[...].astype(x.dtype)) * mean.astype(x.dtype)
    return y @ self.w_out[...].astype(x.dtype), {"sum": sums[:, -1]}

  @classmethod
  def flops_per_token(cls, cfg, *, seg_len: int) -> float:
    return float(3 * 2 * cfg.d_model ** 2 + 2 * seg_len * cfg.d_model)


@register_model("toy", config=ToyConfig, description="A gated running mean over the document (a test's new model)")
class Toy(LM):
  pass
