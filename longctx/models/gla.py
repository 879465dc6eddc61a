"""GLA, gated linear attention (Yang, Wang, Shen, Panda & Kim 2024): linear attention with a data-dependent
decay per key channel.

Per layer, H heads of dk = key_expand x d_model / H key channels and dv = value_expand x d_model / H value
channels:

    q, k, v  = x W_q, x W_k, x W_v;   q scaled by 1 / sqrt(dk)
    log a_t  = log_sigmoid(x W_a1 W_a2 + b_a) / tau          [H, dk]: a low-rank gate (rank r), tau = 16
    S_t      = diag(a_t) S_{t-1} + k_t^T v_t                  S: [dk, dv] per head (a_t scales S's rows)
    o_t      = q_t S_t
    y        = W_o (RMSNorm(o) * w_norm * swish(x W_r))       per head, w_norm [dv] shared by heads

The recurrence is the chunked linear recurrence (`longctx.kernels.linear_recurrence`) with a per-channel
log decay; `model.kernel` picks "reference" (token scan), "xla" (chunked: per-channel decay ratios, one
chunk at a time) or "pallas". The settings are flash-linear-attention's `GatedLinearAttention` defaults
(key_expand 0.5, value_expand 1, gate rank 16, tau 16, swish output gate, fused gated RMSNorm, no short
conv), which follow the paper (its section 4.4: the gate's low-rank map and the 1/tau temperature that
keeps a_t near 1, so memory fades slowly). A document starting inside a segment starts from a zero state.

The rest of the layer follows the zoo's backbone (pre-RMSNorm residual blocks, then the gated MLP, as the
paper's GLA Transformer: a SwiGLU after each GLA layer).

State per layer (float32):
  s: [batch, H, dk, dv]
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from longctx.config import WidthFactorConfig
from longctx.errors import ConfigError
from longctx.layers import Mixer, dense, param, register_mixer, rms_norm
from longctx.layers.attention import project
from longctx.layers.context import Context
from longctx.layers.recurrence import recurrence
from longctx.models.base import LM
from longctx.models.registry import register_model


@dataclasses.dataclass
class GLAConfig(WidthFactorConfig):
  mixer = "gla"
  tiny = {"num_heads": 2, "gate_rank": 4, "chunk_size": 8}

  name: str = "gla"
  key_expand: float = 0.5  # dk x heads = key_expand x d_model
  value_expand: float = 1.0  # dv x heads = value_expand x d_model
  gate_rank: int = 16  # rank of the decay gate's map x W_a1 W_a2
  gate_temperature: float = 16.0  # tau: log a = log_sigmoid(.) / tau
  chunk_size: int = 64  # tokens per chunk of the chunked form

  def validate(self) -> None:
    super().validate()
    for key in ("gate_rank", "chunk_size"):
      if getattr(self, key) < 1:
        raise ConfigError(f"model.{key}={getattr(self, key)} must be >= 1")
    if not self.gate_temperature > 0:
      raise ConfigError(f"model.gate_temperature={self.gate_temperature} must be > 0")


def gla_log_decay(x, w1, w2, bias, *, temperature: float):
  """`x [batch, seq, d_model]` -> log a `[batch, seq, H, dk]` float32, <= 0: log_sigmoid of a low-rank map / tau."""
  logits = dense(dense(x, w1), w2).astype(jnp.float32) + bias
  return jax.nn.log_sigmoid(logits) / temperature


@register_mixer("gla")
class GatedLinearAttention(Mixer):
  """`x [batch, seq, d_model]` + state `{"s": [batch, H, dk, dv]}` -> output, new state."""

  def __init__(self, cfg: GLAConfig, *, layer: int, rngs: nnx.Rngs):
    d, h, dk, dv, r = cfg.d_model, cfg.num_heads, cfg.key_dim, cfg.value_dim, cfg.gate_rank
    self.cfg = cfg
    self.wq = param(rngs, (d, h, dk), ("embed", "heads", "head_dim"), fan_in=d)
    self.wk = param(rngs, (d, h, dk), ("embed", "heads", "head_dim"), fan_in=d)
    self.wv = param(rngs, (d, h, dv), ("embed", "heads", "head_dim"), fan_in=d)
    self.wr = param(rngs, (d, h, dv), ("embed", "heads", "head_dim"), fan_in=d)
    self.wa1 = param(rngs, (d, r), ("embed", None), fan_in=d)
    self.wa2 = param(rngs, (r, h, dk), (None, "heads", "head_dim"), fan_in=r)
    self.ba = nnx.Param(jnp.zeros((h, dk), jnp.float32), logical_axes=("heads", "head_dim"))
    self.norm = nnx.Param(jnp.ones((dv,), jnp.float32), logical_axes=("head_dim",))
    self.wo = param(rngs, (h, dv, d), ("heads", "head_dim", "embed"), fan_in=h * dv, scale=1.0 / (2 * cfg.num_layers))

  def init_state(self, batch_size: int) -> dict:
    cfg = self.cfg
    return {"s": jnp.zeros((batch_size, cfg.num_heads, cfg.key_dim, cfg.value_dim), jnp.float32)}

  def __call__(self, x, state, ctx: Context):
    cfg = self.cfg
    q = project(x, self.wq) / math.sqrt(cfg.key_dim)
    log_decay = gla_log_decay(x, self.wa1[...], self.wa2[...], self.ba[...], temperature=cfg.gate_temperature)
    o, s = recurrence(q, project(x, self.wk), project(x, self.wv), log_decay=log_decay, segment_ids=ctx.doc,
                      initial_state=state["s"], kernel=cfg.kernel, chunk_size=cfg.chunk_size)
    y = rms_norm(o, self.norm[...], eps=cfg.norm_eps) * jax.nn.silu(project(x, self.wr).astype(jnp.float32))
    return dense(y.astype(x.dtype), self.wo[...], in_dims=2), {"s": s}

  @classmethod
  def flops_per_token(cls, cfg: GLAConfig, *, seg_len: int) -> float:
    d, h, dk, dv, r = cfg.d_model, cfg.num_heads, cfg.key_dim, cfg.value_dim, cfg.gate_rank
    proj = 2 * d * h * (2 * dk + 2 * dv) + 2 * r * (d + h * dk) + 2 * h * dv * d
    chunk = 1 if cfg.kernel == "reference" else min(cfg.chunk_size, seg_len)
    return float(proj + h * (2 * chunk * (dk + dv) / 2 + 4 * dk * dv))  # causal half of the chunk, state r/w

  @classmethod
  def activation_bytes_per_token(cls, cfg: GLAConfig, *, dtype_bytes: int) -> float:
    h, dk, dv = cfg.num_heads, cfg.key_dim, cfg.value_dim
    return super().activation_bytes_per_token(cfg, dtype_bytes=dtype_bytes) + float(
        (2 * h * dk + 2 * h * dv) * dtype_bytes + (h * dk + 2 * h * dv) * 4)


@register_model("gla", config=GLAConfig,
                description="GLA: gated linear attention (a data-dependent decay per key channel), O(1) state")
class GLA(LM):
  context_parallel = "sequence-parallel linear recurrence (per-channel decays)"
