"""RetNet (Sun et al. 2023): multi-scale retention in place of attention.

Per head h, with a fixed decay gamma_h = 1 - 2^(-5 - h) and rotated q, k:

    parallel:   Y = (Q K^T * D) V,   D[n, m] = gamma^(n - m) if n >= m (same document) else 0
    recurrent:  S_n = gamma S_{n-1} + k_n^T v_n,   y_n = q_n S_n
    chunkwise:  the chunked linear recurrence (`longctx.kernels.linear_recurrence`)

The three forms are the same function (tests check it); `retention_impl`
picks one: "parallel" (quadratic in the segment, the paper's training form),
"recurrent" (token scan), "xla" (chunked, the default) or "pallas". The state
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

State (every leaf batch-first):
  s:    [batch, layers, heads, key_dim, value_dim] float32  retention state
  pos:  [batch] int32  position of the next token in its document
  prev_tokens, prev_valid: [batch, K-1]  token history (only with embed_conv > 1)
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from longctx.config import ModelConfig
from longctx.errors import ConfigError
from longctx.layers.recurrence import recurrence
from longctx.layers import GatedMLP, RMSNorm, param, rotary
from longctx.models.base import SegmentLM, reset_rows
from longctx.models.registry import register_model
from longctx.models.transformer import Embedding, segment_doc_ids

RETENTION_IMPLS = ("parallel", "recurrent", "xla", "pallas")


@dataclasses.dataclass
class RetNetConfig(ModelConfig):
  name: str = "retnet"
  value_factor: int = 2  # value_dim = value_factor x head_dim (the paper's 2)
  rope_base: float = 10000.0
  retention_impl: str = "xla"  # "parallel", "recurrent", "xla" (chunked) or "pallas"
  chunk_size: int = 64  # tokens per chunk of the chunked forms
  embed_conv: int = 0  # width of a causal depthwise conv over token embeddings (0 = off)

  def validate(self) -> None:
    super().validate()
    if self.value_factor < 1:
      raise ConfigError(f"model.value_factor={self.value_factor} must be >= 1")
    if self.retention_impl not in RETENTION_IMPLS:
      raise ConfigError(f"model.retention_impl={self.retention_impl!r} is not one of {RETENTION_IMPLS}")
    if self.chunk_size < 1:
      raise ConfigError(f"model.chunk_size={self.chunk_size} must be >= 1")
    if self.resolved_head_dim % 2:
      raise ConfigError(f"head_dim={self.resolved_head_dim} must be even for the rotation")
    if self.embed_conv < 0 or self.embed_conv == 1:
      raise ConfigError(f"model.embed_conv={self.embed_conv} must be 0 (off) or a width >= 2 (e.g. 4)")

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


def positions_in_document(q_doc: jax.Array, first_pos: jax.Array) -> jax.Array:
  """Position of every token in its document `[batch, seq]`; the first document continues from
  `first_pos [batch]`, later ones start at 0 where their id changes."""
  idx = jnp.arange(q_doc.shape[1])[None]
  starts = jnp.concatenate([jnp.ones_like(q_doc[:, :1], bool), q_doc[:, 1:] != q_doc[:, :-1]], axis=1)
  start_idx = lax.cummax(jnp.where(starts, idx, 0), axis=1)
  return jnp.where(q_doc == 0, first_pos[:, None] + idx, idx - start_idx)


class MultiScaleRetention(nnx.Module):
  """`x [batch, seq, d_model]` + state `[batch, heads, key_dim, value_dim]` -> output, new state."""

  def __init__(self, cfg: RetNetConfig, *, rngs: nnx.Rngs):
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

  def __call__(self, x, *, state, positions, q_doc):
    cfg = self.cfg
    dt = x.dtype
    proj = lambda w: jnp.einsum("bsd,dhk->bshk", x, w[...].astype(dt))
    q = rotary(proj(self.wq), positions, base=cfg.rope_base)
    k = rotary(proj(self.wk), positions, base=cfg.rope_base) / math.sqrt(cfg.resolved_head_dim)
    v = proj(self.wv)
    log_decay = retention_log_decay(cfg.num_heads)
    if cfg.retention_impl == "parallel":
      f32 = lambda a: a.astype(jnp.float32)
      y, state = retention_parallel(f32(q), f32(k), f32(v), log_decay=log_decay, segment_ids=q_doc,
                                    initial_state=state)
    else:
      impl = "reference" if cfg.retention_impl == "recurrent" else cfg.retention_impl
      decay = jnp.broadcast_to(log_decay, q.shape[:3])
      y, state = recurrence(q, k, v, log_decay=decay, segment_ids=q_doc, initial_state=state, impl=impl,
                            chunk_size=cfg.chunk_size)
    y = group_norm(y.astype(jnp.float32), self.norm_scale[...], self.norm_bias[...], eps=cfg.norm_eps)
    gated = jax.nn.silu(proj(self.wg)) * y.astype(dt)
    return jnp.einsum("bshv,hvd->bsd", gated, self.wo[...].astype(dt)), state


def group_norm(y: jax.Array, scale: jax.Array, bias: jax.Array, *, eps: float) -> jax.Array:
  """Normalise each head of `y [batch, seq, heads, value_dim]` over its channels; `scale, bias [heads, value_dim]`."""
  mean = jnp.mean(y, axis=-1, keepdims=True)
  var = jnp.var(y, axis=-1, keepdims=True)
  return (y - mean) * lax.rsqrt(var + eps) * scale + bias


class RetNetBlock(nnx.Module):
  def __init__(self, cfg: RetNetConfig, *, rngs: nnx.Rngs):
    self.norm1 = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    self.retention = MultiScaleRetention(cfg, rngs=rngs)
    self.norm2 = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    self.mlp = GatedMLP(cfg.d_model, cfg.resolved_d_ff, rngs=rngs, out_scale=1.0 / (2 * cfg.num_layers))

  def __call__(self, x, **kwargs):
    y, state = self.retention(self.norm1(x), **kwargs)
    x = x + y
    return x + self.mlp(self.norm2(x)), state


@register_model("retnet", config=RetNetConfig,
                description="RetNet: multi-scale retention (parallel / recurrent / chunked forms), O(1) state")
class RetNet(SegmentLM):
  context_parallel = "sequence-parallel linear recurrence (retention_impl xla or pallas)"

  def __init__(self, cfg: RetNetConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embedding = Embedding(cfg, rngs=rngs)
    self.blocks = nnx.List([RetNetBlock(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)

  def init_state(self, batch_size: int):
    cfg = self.cfg
    return {
        "s": jnp.zeros((batch_size, cfg.num_layers, cfg.num_heads, cfg.resolved_head_dim, cfg.value_dim),
                       jnp.float32),
        "pos": jnp.zeros((batch_size,), jnp.int32),
        **self.embedding.init_history(batch_size),
    }

  def __call__(self, tokens, state, *, reset, segment_ids=None):
    self.check_segment_shapes(tokens, reset)
    state = reset_rows(state, self.init_state(tokens.shape[0]), reset)
    q_doc = segment_doc_ids(segment_ids, tokens)
    positions = positions_in_document(q_doc, state["pos"])
    x, history = self.embedding.embed_segment(tokens, state, q_doc, self.embedding.table[...].dtype)
    new_s = []
    for i, block in enumerate(self.blocks):
      x, s = block(x, state=state["s"][:, i], positions=positions, q_doc=q_doc)
      new_s.append(s)
    logits = self.embedding.logits(self.final_norm(x))
    return logits, {"s": jnp.stack(new_s, axis=1), "pos": positions[:, -1] + 1, **history}

  @classmethod
  def flops_per_token(cls, cfg: RetNetConfig, *, seg_len: int) -> float:
    d, h, hd, dv, L = cfg.d_model, cfg.num_heads, cfg.resolved_head_dim, cfg.value_dim, cfg.num_layers
    proj = 2 * d * h * (2 * hd + 3 * dv)  # q, k; v, gate, out
    chunk = seg_len if cfg.retention_impl == "parallel" else min(cfg.chunk_size, seg_len)
    retention = h * (2 * chunk * (hd + dv) / 2 + 4 * hd * dv)  # causal half of the chunk, state read + write
    mlp = 2 * 3 * d * cfg.resolved_d_ff
    return float(L * (proj + retention + mlp) + 2 * d * cfg.vocab_size + 2 * cfg.embed_conv * d)
