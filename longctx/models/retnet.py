"""RetNet (Sun et al. 2023): multi-scale retention in place of attention.

Per head h, with a fixed decay gamma_h = 1 - 2^(-5 - h) and rotated q, k:

    parallel:   Y = (Q K^T * D) V,   D[n, m] = gamma^(n - m) if n >= m (same document) else 0
    recurrent:  S_n = gamma S_{n-1} + k_n^T v_n,   y_n = q_n S_n
    chunkwise:  the chunked linear recurrence (`longctx.kernels.linear_recurrence`)

The three forms are the same function (tests check it): `retention` picks
"parallel" (quadratic in the segment, the paper's training form) or "chunked"
(the default), whose implementation follows `model.kernel` ("reference" is the
recurrent token scan, "xla" the chunked form, "pallas" its kernel). The state
carried between segments is S, one `[key_dim, value_dim]` matrix per layer
and head, so memory is flat in the stream length.

Multi-scale retention block (paper section 2.2):
    q = R(x W_q),  k = R(x W_k) / sqrt(key_dim),  v = x W_v   (value_dim = value_factor x key_dim)
    Y = GroupNorm_h(Retention(q, k, v))
    MSR(x) = (swish(x W_g) * Y) W_o
R is the xPos-style rotation (rotary with base `rope_base`, here in rotate-half
layout, a fixed permutation of the paper's interleaved pairs) at each token's
position inside its document. As in the paper, and unlike later torchscale
code, there is no extra normalisation of D or of Q K^T: GroupNorm is
invariant to the per-row scales those add, and the chunked kernel is stable
without them. GroupNorm normalises each head's value_dim channels (mean and
variance) with a learned scale and bias per channel.

The rest of the layer follows the zoo's backbone (pre-RMSNorm residual blocks,
gated MLP; the paper used LayerNorm and a GELU FFN), so comparisons against
the baseline change only the token mixer.

State per layer (besides the shell's `pos`, which gives every token its position in its document):
  s:    [batch, heads, key_dim, value_dim] float32  retention state
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

from flax import nnx

from longctx.config import MultiHeadConfig
from longctx.errors import ConfigError
from longctx.layers import Mixer, dense, param, register_mixer
from longctx.layers.attention import project, rotary
from longctx.layers.context import Context
from longctx.layers.recurrence import recurrence
from longctx.models.base import LM
from longctx.models.registry import register_model

RETENTION_FORMS = ("parallel", "chunked")


@dataclasses.dataclass
class RetNetConfig(MultiHeadConfig):
  mixer = "retention"
  tiny = {"chunk_size": 8}

  name: str = "retnet"
  value_factor: int = 2  # value_dim = value_factor x head_dim (the paper's 2)
  rope_base: float = 10000.0
  retention: str = "chunked"  # "parallel" (quadratic in the segment) or "chunked" (by model.kernel)
  chunk_size: int = 64  # tokens per chunk of the chunked form

  def validate(self) -> None:
    super().validate()
    if self.value_factor < 1:
      raise ConfigError(f"model.value_factor={self.value_factor} must be >= 1")
    if self.retention not in RETENTION_FORMS:
      raise ConfigError(f"model.retention={self.retention!r} is not one of {RETENTION_FORMS}")
    if self.chunk_size < 1:
      raise ConfigError(f"model.chunk_size={self.chunk_size} must be >= 1")
    if self.resolved_head_dim % 2:
      raise ConfigError(f"head_dim={self.resolved_head_dim} must be even for the rotation")

  @property
  def value_dim(self) -> int:
    return self.value_factor * self.resolved_head_dim


def retention_log_decay(num_heads: int) -> jax.Array:
  """log gamma_h, gamma_h = 1 - 2^(-5 - h) for h = 0 .. heads-1: `[heads]`."""
  return jnp.log1p(-(2.0 ** (-5.0 - jnp.arange(num_heads, dtype=jnp.float32))))


def retention_parallel(q, k, v, *, log_decay, segment_ids, initial_state):
  """The parallel form over one segment, plus what the carried state adds.

  Args:
    q, k: `[batch, seq, heads, key_dim]`; v `[batch, seq, heads, value_dim]`.
    log_decay: `[heads]` log gamma.
    segment_ids: `[batch, seq]` document ids (the state belongs to the first token's document).
    initial_state: `[batch, heads, key_dim, value_dim]`.
  Returns:
    `y [batch, seq, heads, value_dim]` and the state after the segment.
  """
  t = q.shape[1]
  n = jnp.arange(t)
  same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (n[:, None] >= n[None, :])  # [b, n, m]
  exponent = (n[:, None] - n[None, :])[None, None] * log_decay[None, :, None, None]  # [1, h, n, m]
  d = jnp.exp(jnp.where(same[:, None], exponent, -jnp.inf))  # [b, h, n, m]
  scores = jnp.einsum("bnhk,bmhk->bhnm", q, k) * d
  y = jnp.einsum("bhnm,bmhv->bnhv", scores, v)
  # The carried state reaches the tokens of the first document, decayed by gamma^(n + 1).
  first = (segment_ids == segment_ids[:, :1])[:, :, None]  # [b, n, 1]
  from_state = jnp.exp((n[:, None] + 1) * log_decay[None, :]) * first  # [b, n, h]
  y = y + from_state[..., None] * jnp.einsum("bnhk,bhkv->bnhv", q, initial_state)
  # State after the segment: the last document's tokens, decayed to the end (plus S0 if no document started).
  last = segment_ids == segment_ids[:, -1:]
  to_end = jnp.exp((t - 1 - n)[:, None] * log_decay[None, :]) * last[:, :, None]  # [b, m, h]
  keep = (first[:, -1, 0])[:, None, None, None] * jnp.exp(t * log_decay)[None, :, None, None]
  state = keep * initial_state + jnp.einsum("bmh,bmhk,bmhv->bhkv", to_end, k, v)
  return y, state


def group_norm(y: jax.Array, scale: jax.Array, bias: jax.Array, *, eps: float) -> jax.Array:
  """Normalise each head of `y [batch, seq, heads, value_dim]` over its channels; `scale, bias [heads, value_dim]`."""
  mean = jnp.mean(y, axis=-1, keepdims=True)
  var = jnp.var(y, axis=-1, keepdims=True)
  return (y - mean) * lax.rsqrt(var + eps) * scale + bias


@register_mixer("retention")
class MultiScaleRetention(Mixer):
  """`x [batch, seq, d_model]` + state `{"s": [batch, heads, key_dim, value_dim]}` -> output, new state."""

  def __init__(self, cfg: RetNetConfig, *, layer: int, rngs: nnx.Rngs):
    d, h, hd, dv = cfg.d_model, cfg.num_heads, cfg.resolved_head_dim, cfg.value_dim
    self.cfg = cfg
    self.wq = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), fan_in=d)
    self.wk = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), fan_in=d)
    self.wv = param(rngs, (d, h, dv), ("embed", "heads", "head_dim"), fan_in=d)
    self.wg = param(rngs, (d, h, dv), ("embed", "heads", "head_dim"), fan_in=d)
    self.wo = param(rngs, (h, dv, d), ("heads", "head_dim", "embed"), fan_in=h * dv,
                    scale=1.0 / (2 * cfg.num_layers))
    self.norm_scale = nnx.Param(jnp.ones((h, dv), jnp.float32), logical_axes=("heads", "head_dim"))
    self.norm_bias = nnx.Param(jnp.zeros((h, dv), jnp.float32), logical_axes=("heads", "head_dim"))

  def init_state(self, batch_size: int) -> dict:
    cfg = self.cfg
    return {"s": jnp.zeros((batch_size, cfg.num_heads, cfg.resolved_head_dim, cfg.value_dim), jnp.float32)}

  def __call__(self, x, state, ctx: Context):
    cfg = self.cfg
    q = rotary(project(x, self.wq), ctx.pos, base=cfg.rope_base)
    k = rotary(project(x, self.wk), ctx.pos, base=cfg.rope_base) / math.sqrt(cfg.resolved_head_dim)
    v = project(x, self.wv)
    log_decay = retention_log_decay(cfg.num_heads)
    if cfg.retention == "parallel":
      f32 = lambda a: a.astype(jnp.float32)
      y, s = retention_parallel(f32(q), f32(k), f32(v), log_decay=log_decay, segment_ids=ctx.doc,
                                initial_state=state["s"])
    else:
      y, s = recurrence(q, k, v, log_decay=jnp.broadcast_to(log_decay, q.shape[:3]), segment_ids=ctx.doc,
                        initial_state=state["s"], kernel=cfg.kernel, chunk_size=cfg.chunk_size)
    y = group_norm(y.astype(jnp.float32), self.norm_scale[...], self.norm_bias[...], eps=cfg.norm_eps)
    gated = jax.nn.silu(project(x, self.wg)) * y.astype(x.dtype)
    return dense(gated, self.wo[...], in_dims=2), {"s": s}

  @classmethod
  def flops_per_token(cls, cfg: RetNetConfig, *, seg_len: int) -> float:
    d, h, hd, dv = cfg.d_model, cfg.num_heads, cfg.resolved_head_dim, cfg.value_dim
    proj = 2 * d * h * (2 * hd + 3 * dv)  # q, k; v, gate, out
    chunk = seg_len if cfg.retention == "parallel" else min(cfg.chunk_size, seg_len)
    return float(proj + h * (2 * chunk * (hd + dv) / 2 + 4 * hd * dv))  # causal half of the chunk, state r/w

  @classmethod
  def activation_bytes_per_token(cls, cfg: RetNetConfig, *, dtype_bytes: int) -> float:
    d, h, hd, ff = cfg.d_model, cfg.num_heads, cfg.resolved_head_dim, cfg.resolved_d_ff
    return float((4 * d + 4 * h * hd + 3 * ff) * dtype_bytes)


@register_model("retnet", config=RetNetConfig,
                description="RetNet: multi-scale retention (parallel / recurrent / chunked forms), O(1) state")
class RetNet(LM):
  context_parallel = "sequence-parallel linear recurrence (the chunked form)"
