"""Gated DeltaNet (Yang, Kautz & Hatamizadeh 2025) and DeltaNet (Yang et al. 2024): the delta rule, gated.

Per layer, Hk query/key heads of dk channels and Hv value heads of dv channels (Hv a multiple of Hk; each
query/key head serves Hv / Hk consecutive value heads, as in Qwen3-Next):

    q, k, v = silu(causal_conv1d(x W_q), (x W_k), (x W_v))      depthwise, K taps, no bias, history carried
    q, k    = l2norm(q) / sqrt(dk), l2norm(k)
    beta_t  = sigmoid(x W_b)                                     one per value head
    log a_t = -exp(A_log) softplus(x W_a + dt_bias)              one per value head (DeltaNet: a_t = 1)
    S_t     = a_t (S_{t-1} - beta_t k_t^T (k_t S_{t-1})) + beta_t k_t^T v_t        S: [dk, dv] per value head
    o_t     = q_t S_t
    y       = W_o (RMSNorm(o) * w_norm * silu(x W_z))            per value head, w_norm [dv] shared by heads

S_t moves k_t S toward v_t by a step beta_t (the delta rule: a key's old value is replaced, not summed
over, which is what makes the state an associative memory that can be overwritten) after forgetting by
a_t (the gate: Mamba-2's data-dependent scalar decay). The recurrence is the chunked linear recurrence
(`longctx.kernels.linear_recurrence`, its delta-rule form: the WY / UT chunk solve of DeltaNet);
`model.kernel` picks "reference" (token scan), "xla" (chunked) or "pallas". A document starting inside a
segment starts from a zero state and a conv that reads zeros before it.

Variants (`model.variant`):
  "gated"  Gated DeltaNet as Qwen3-Next's layer (Hugging Face `Qwen3NextGatedDeltaNet`: tested against it,
           tests/test_gated_deltanet.py): the decay gate and the gated output norm.
  "delta"  DeltaNet as flash-linear-attention's `DeltaNet` defaults: no decay, no output gate (a plain
           RMSNorm per head), the same convs, L2-normalised q and k and beta.

The rest of the layer follows the zoo's backbone (pre-RMSNorm residual blocks, then the gated MLP; Qwen3-Next
has a mixture of experts there and full-attention layers every fourth layer: a hybrid stack is a layer
pattern, not this file). Initialisation as flash-linear-attention's Gated DeltaNet: A = U(0.01, 16)
(Hugging Face's floor), dt_bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max] (Mamba-2's).

State per layer (float32):
  conv_q, conv_k: [batch, K-1, Hk, dk]; conv_v: [batch, K-1, Hv, dv]   the last K-1 conv inputs
  s:              [batch, Hv, dk, dv]                                    the delta-rule state
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from longctx.config import MultiHeadConfig
from longctx.errors import ConfigError
from longctx.layers import Mixer, dense, l2_normalize, param, register_mixer, rms_norm
from longctx.layers.attention import project
from longctx.layers.context import Context
from longctx.layers.recurrence import recurrence
from longctx.layers.ssm import causal_conv1d, init_dt_bias
from longctx.models.base import LM
from longctx.models.registry import register_model

VARIANTS = ("gated", "delta")


@dataclasses.dataclass
class GatedDeltaNetConfig(MultiHeadConfig):
  mixer = "gated_delta"
  tiny = {"num_heads": 2, "num_value_heads": 4, "chunk_size": 8}

  name: str = "gated_deltanet"
  variant: str = "gated"  # "gated" (Gated DeltaNet, Qwen3-Next's layer) or "delta" (DeltaNet: no decay, no gate)
  num_value_heads: int = 0  # Hv (0 = num_heads); a multiple of num_heads
  value_head_dim: int = 0  # dv (0 = head_dim)
  conv_kernel: int = 4
  chunk_size: int = 64  # tokens per chunk of the chunked delta rule
  dt_min: float = 0.001
  dt_max: float = 0.1

  def validate(self) -> None:
    super().validate()
    if self.variant not in VARIANTS:
      raise ConfigError(f"model.variant={self.variant!r} is not one of {VARIANTS}")
    for key in ("conv_kernel", "chunk_size"):
      if getattr(self, key) < 1:
        raise ConfigError(f"model.{key}={getattr(self, key)} must be >= 1")
    if self.num_value_heads < 0 or self.value_head_dim < 0:
      raise ConfigError("model.num_value_heads and model.value_head_dim must be >= 0 (0 = as the key heads)")
    if self.resolved_value_heads % self.num_heads:
      raise ConfigError(f"model.num_value_heads={self.num_value_heads} must be a multiple of "
                        f"model.num_heads={self.num_heads} (each key head serves a group of value heads)")
    if not 0 < self.dt_min <= self.dt_max:
      raise ConfigError(f"need 0 < model.dt_min={self.dt_min} <= model.dt_max={self.dt_max}")

  @property
  def resolved_value_heads(self) -> int:
    return self.num_value_heads or self.num_heads

  @property
  def resolved_value_dim(self) -> int:
    return self.value_head_dim or self.resolved_head_dim


def gated_delta_rule(q, k, v, a, b, *, a_log, dt_bias, segment_ids, initial_state, kernel, chunk_size):
  """The layer's recurrence from its (convolved, activated) projections.

  Args:
    q, k: `[batch, seq, Hk, dk]`; v `[batch, seq, Hv, dv]`; a, b `[batch, seq, Hv]` gate logits.
    a_log, dt_bias: `[Hv]`, or a_log None for no decay (DeltaNet).
    segment_ids: `[batch, seq]`; initial_state `[batch, Hv, dk, dv]`.
  Returns:
    `o [batch, seq, Hv, dv]` float32 and the final state.
  """
  group = v.shape[2] // q.shape[2]
  q = jnp.repeat(l2_normalize(q), group, axis=2) / math.sqrt(q.shape[-1])
  k = jnp.repeat(l2_normalize(k), group, axis=2)
  beta = jax.nn.sigmoid(b.astype(jnp.float32))
  log_decay = None
  if a_log is not None:
    log_decay = -jnp.exp(a_log) * jax.nn.softplus(a.astype(jnp.float32) + dt_bias)
  return recurrence(q, k, v.astype(jnp.float32), log_decay=log_decay, beta=beta, segment_ids=segment_ids,
                    initial_state=initial_state, kernel=kernel, chunk_size=chunk_size)


@register_mixer("gated_delta")
class GatedDeltaMixer(Mixer):
  """`x [batch, seq, d_model]` + {conv histories, delta-rule state} -> output, new state."""

  def __init__(self, cfg: GatedDeltaNetConfig, *, layer: int, rngs: nnx.Rngs):
    d, hk, dk, hv, dv, kk = (cfg.d_model, cfg.num_heads, cfg.resolved_head_dim, cfg.resolved_value_heads,
                             cfg.resolved_value_dim, cfg.conv_kernel)
    self.cfg = cfg
    self.wq = param(rngs, (d, hk, dk), ("embed", "heads", "head_dim"), fan_in=d)
    self.wk = param(rngs, (d, hk, dk), ("embed", "heads", "head_dim"), fan_in=d)
    self.wv = param(rngs, (d, hv, dv), ("embed", "heads", "head_dim"), fan_in=d)
    self.wb = param(rngs, (d, hv), ("embed", "heads"), fan_in=d)
    # Depthwise convs: PyTorch's default bound 1/sqrt(K), as a normal of the same variance (as Mamba-2 here).
    self.conv_q = param(rngs, (kk, hk, dk), ("conv", "heads", "head_dim"), fan_in=3 * kk)
    self.conv_k = param(rngs, (kk, hk, dk), ("conv", "heads", "head_dim"), fan_in=3 * kk)
    self.conv_v = param(rngs, (kk, hv, dv), ("conv", "heads", "head_dim"), fan_in=3 * kk)
    if cfg.variant == "gated":
      self.wa = param(rngs, (d, hv), ("embed", "heads"), fan_in=d)
      self.wz = param(rngs, (d, hv, dv), ("embed", "heads", "head_dim"), fan_in=d)
      a = jax.random.uniform(rngs.params(), (hv,), jnp.float32, 0.01, 16.0)
      self.A_log = nnx.Param(jnp.log(a), logical_axes=("heads",))
      self.dt_bias = nnx.Param(init_dt_bias(rngs.params(), (hv,), dt_min=cfg.dt_min, dt_max=cfg.dt_max),
                               logical_axes=("heads",))
    else:
      self.wa = self.wz = self.A_log = self.dt_bias = None
    self.norm = nnx.Param(jnp.ones((dv,), jnp.float32), logical_axes=("head_dim",))
    self.wo = param(rngs, (hv, dv, d), ("heads", "head_dim", "embed"), fan_in=hv * dv, scale=1.0 / (2 * cfg.num_layers))

  def init_state(self, batch_size: int) -> dict:
    cfg = self.cfg
    hist = lambda h, dh: jnp.zeros((batch_size, cfg.conv_kernel - 1, h, dh), jnp.float32)
    return {"conv_q": hist(cfg.num_heads, cfg.resolved_head_dim), "conv_k": hist(cfg.num_heads, cfg.resolved_head_dim),
            "conv_v": hist(cfg.resolved_value_heads, cfg.resolved_value_dim),
            "s": jnp.zeros((batch_size, cfg.resolved_value_heads, cfg.resolved_head_dim, cfg.resolved_value_dim),
                           jnp.float32)}

  def __call__(self, x, state, ctx: Context):
    cfg = self.cfg
    history_doc = ctx.history_doc(cfg.conv_kernel - 1)
    new_state = {}

    def conv(name, w):
      y, new_state[name] = causal_conv1d(project(x, w), getattr(self, name)[...], None, history=state[name],
                                         history_doc=history_doc, doc=ctx.doc)
      return jax.nn.silu(y)

    q, k, v = conv("conv_q", self.wq), conv("conv_k", self.wk), conv("conv_v", self.wv)
    gated = cfg.variant == "gated"
    a = dense(x, self.wa[...]) if gated else None
    o, new_state["s"] = gated_delta_rule(
        q, k, v, a, dense(x, self.wb[...]), a_log=self.A_log[...] if gated else None,
        dt_bias=self.dt_bias[...] if gated else None, segment_ids=ctx.doc, initial_state=state["s"],
        kernel=cfg.kernel, chunk_size=cfg.chunk_size)
    y = rms_norm(o, self.norm[...], eps=cfg.norm_eps)
    if gated:
      y = y * jax.nn.silu(project(x, self.wz).astype(jnp.float32))
    return dense(y.astype(x.dtype), self.wo[...], in_dims=2), new_state

  @classmethod
  def reach(cls, cfg) -> int:
    return cfg.conv_kernel - 1

  @classmethod
  def flops_per_token(cls, cfg: GatedDeltaNetConfig, *, seg_len: int) -> float:
    d, hk, dk, hv, dv = (cfg.d_model, cfg.num_heads, cfg.resolved_head_dim, cfg.resolved_value_heads,
                         cfg.resolved_value_dim)
    gated = cfg.variant == "gated"
    proj = 2 * d * (2 * hk * dk + hv * dv * (2 if gated else 1) + hv * (2 if gated else 1)) + 2 * hv * dv * d
    conv = 2 * cfg.conv_kernel * (2 * hk * dk + hv * dv)
    chunk = 1 if cfg.kernel == "reference" else min(cfg.chunk_size, seg_len)
    # Per value head: the chunk's causal q k^T and k k^T, the solve's products with k and v, then
    # q S, w S (the delta correction) and the state update k^T u.
    scan = hv * (2 * chunk * (2 * dk + dv) / 2 + 2 * chunk * (dk + dv) / 2 + 6 * dk * dv)
    return float(proj + conv + scan)

  @classmethod
  def activation_bytes_per_token(cls, cfg: GatedDeltaNetConfig, *, dtype_bytes: int) -> float:
    qkv = 2 * cfg.num_heads * cfg.resolved_head_dim + cfg.resolved_value_heads * cfg.resolved_value_dim
    return super().activation_bytes_per_token(cfg, dtype_bytes=dtype_bytes) + float(
        2 * qkv * dtype_bytes + 3 * cfg.resolved_value_heads * cfg.resolved_value_dim * 4)


@register_model("gated_deltanet", config=GatedDeltaNetConfig,
                description="Gated DeltaNet / DeltaNet: the (gated) delta rule through the chunked kernel, O(1) state")
class GatedDeltaNet(LM):
  context_parallel = "sequence-parallel linear recurrence (the delta rule: each shard re-runs from its true state)"
