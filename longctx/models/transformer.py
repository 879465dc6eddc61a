"""Sliding-window Transformer baseline with a Transformer-XL style K/V cache.

Decoder-only, pre-norm: `x += Attn(RMSNorm(x)); x += GatedMLP(RMSNorm(x))`.
Each token attends to itself and the previous `window` tokens of its own
document; the state caches the last `window` (unrotated) keys and values of
every layer, so a stream cut into any segments gives the same logits as one
long pass. Positions are rotary, relative inside [cache; segment].

State (every leaf batch-first):
  k, v:  [batch, layers, window, kv_heads, head_dim]  cached keys / values
  valid: [batch, window] bool  cache slot belongs to the document still open
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from longctx.config import ModelConfig
from longctx.errors import ConfigError
from longctx.layers import GatedMLP, RMSNorm, param, rotary, sliding_window_attention
from longctx.models.base import SegmentLM, reset_rows
from longctx.models.registry import register_model


@dataclasses.dataclass
class TransformerConfig(ModelConfig):
  name: str = "transformer"
  window: int = 128  # tokens visible before each token (the cache length)
  num_kv_heads: int = 0  # 0 = num_heads (multi-head); fewer = grouped-query attention
  rope_base: float = 10000.0
  attention_block: int = 0  # query block of the blockwise path (0 = window)

  def validate(self) -> None:
    super().validate()
    if self.window < 1:
      raise ConfigError(f"model.window={self.window} must be >= 1")
    kv = self.num_kv_heads or self.num_heads
    if kv < 1 or self.num_heads % kv:
      raise ConfigError(f"model.num_heads={self.num_heads} must be a multiple of model.num_kv_heads={kv}")
    if self.resolved_head_dim % 2:
      raise ConfigError(f"head_dim={self.resolved_head_dim} must be even for rotary positions")
    if self.attention_block and self.attention_block < self.window:
      raise ConfigError(f"model.attention_block={self.attention_block} must be 0 or >= model.window={self.window}")


class Attention(nnx.Module):
  """Grouped-query self-attention over [cache; segment] with a sliding window."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    d, h, hd = cfg.d_model, cfg.num_heads, cfg.resolved_head_dim
    kvh = cfg.num_kv_heads or h
    self.cfg = cfg
    self.wq = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), fan_in=d)
    self.wk = param(rngs, (d, kvh, hd), ("embed", "kv_heads", "head_dim"), fan_in=d)
    self.wv = param(rngs, (d, kvh, hd), ("embed", "kv_heads", "head_dim"), fan_in=d)
    self.wo = param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), fan_in=h * hd,
                    scale=1.0 / (2 * cfg.num_layers))

  def __call__(self, x, *, cache_k, cache_v, q_doc, k_doc):
    """x `[batch, seg, d_model]`; cache_k/v `[batch, window, kv_heads, head_dim]`.

    Returns the output `[batch, seg, d_model]` and the new (unrotated) k, v
    of the segment `[batch, seg, kv_heads, head_dim]`.
    """
    out, _, k, v = self.attend(x, cache_k=cache_k, cache_v=cache_v, q_doc=q_doc, k_doc=k_doc)
    return jnp.einsum("bshk,hkd->bsd", out, self.wo[...].astype(x.dtype)), k, v

  def attend(self, x, *, cache_k, cache_v, q_doc, k_doc):
    """The windowed attention before the output projection.

    Returns the per-head output `[batch, seg, heads, head_dim]` and the segment's
    unrotated q `[batch, seg, heads, head_dim]`, k, v `[batch, seg, kv_heads, head_dim]`.
    """
    cfg = self.cfg
    q = jnp.einsum("bsd,dhk->bshk", x, self.wq[...].astype(x.dtype))
    k = jnp.einsum("bsd,dhk->bshk", x, self.wk[...].astype(x.dtype))
    v = jnp.einsum("bsd,dhk->bshk", x, self.wv[...].astype(x.dtype))
    window, seg = cache_k.shape[1], x.shape[1]
    k_all = jnp.concatenate([cache_k.astype(k.dtype), k], axis=1)
    v_all = jnp.concatenate([cache_v.astype(v.dtype), v], axis=1)
    positions = jnp.arange(window + seg)
    q_rot = rotary(q, positions[window:], base=cfg.rope_base)
    k_rot = rotary(k_all, positions, base=cfg.rope_base)
    out = sliding_window_attention(q_rot, k_rot, v_all, q_doc=q_doc, k_doc=k_doc, window=cfg.window,
                                   block=cfg.attention_block or None)
    return out, q, k, v


class Block(nnx.Module):
  """Pre-norm block; memory models pass their own attention (same weights layout, extra inputs)."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs, attention_cls: type = Attention):
    self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    self.attn = attention_cls(cfg, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    self.mlp = GatedMLP(cfg.d_model, cfg.resolved_d_ff, rngs=rngs, out_scale=1.0 / (2 * cfg.num_layers))

  def __call__(self, x, **attn_kwargs):
    a, k, v = self.attn(self.attn_norm(x), **attn_kwargs)
    x = x + a
    x = x + self.mlp(self.mlp_norm(x))
    return x, k, v


class Embedding(nnx.Module):
  """Token embedding `[vocab, d_model]` with an optional untied output head."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.table = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), fan_in=1)
    self.head = None if cfg.tie_embeddings else param(
        rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), fan_in=cfg.d_model)
    self.tied_scale = cfg.d_model ** -0.5

  def embed(self, tokens: jax.Array, dtype) -> jax.Array:
    return jnp.take(self.table[...], tokens, axis=0).astype(dtype)

  def logits(self, x: jax.Array) -> jax.Array:
    """`[batch, seq, d_model] -> [batch, seq, vocab]` in float32."""
    if self.head is None:
      w = self.table[...].astype(x.dtype)
      return jnp.einsum("bsd,vd->bsv", x, w, preferred_element_type=jnp.float32) * self.tied_scale
    return jnp.einsum("bsd,dv->bsv", x, self.head[...].astype(x.dtype), preferred_element_type=jnp.float32)


def segment_doc_ids(segment_ids: jax.Array | None, tokens: jax.Array) -> jax.Array:
  """Document ids `[batch, seg]` normalised so the row's first token has id 0."""
  if segment_ids is None:
    return jnp.zeros(tokens.shape, jnp.int32)
  return (segment_ids - segment_ids[:, :1]).astype(jnp.int32)


def roll_cache(cache: jax.Array, new: jax.Array) -> jax.Array:
  """Keep the last `window` entries of `[cache; new]` along axis 1."""
  window = cache.shape[1]
  return jnp.concatenate([cache, new.astype(cache.dtype)], axis=1)[:, -window:]


def roll_cache_valid(valid: jax.Array, q_doc: jax.Array) -> jax.Array:
  """Cache validity `[batch, window]` after a segment with document ids `q_doc [batch, seg]`.

  The new slots are valid where they belong to the segment's last document;
  older slots stay valid only if the segment never left the cached document.
  """
  window, seg = valid.shape[1], q_doc.shape[1]
  last_doc = q_doc[:, -1:]
  valid = roll_cache(valid, q_doc == last_doc)
  if seg < window:
    old_part = valid[:, : window - seg] & (last_doc == 0)
    valid = jnp.concatenate([old_part, valid[:, window - seg:]], axis=1)
  return valid


@register_model("transformer", config=TransformerConfig,
                description="Sliding-window Transformer with a Transformer-XL K/V cache (the baseline)")
class Transformer(SegmentLM):
  config_class = TransformerConfig
  description = "Sliding-window Transformer with a Transformer-XL K/V cache (the baseline)"

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embedding = Embedding(cfg, rngs=rngs)
    self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)

  def init_state(self, batch_size: int):
    cfg = self.cfg
    kv_shape = (batch_size, cfg.num_layers, cfg.window, cfg.num_kv_heads or cfg.num_heads, cfg.resolved_head_dim)
    return {
        "k": jnp.zeros(kv_shape, jnp.float32),
        "v": jnp.zeros(kv_shape, jnp.float32),
        "valid": jnp.zeros((batch_size, cfg.window), bool),
    }

  def __call__(self, tokens, state, *, reset, segment_ids=None):
    self.check_segment_shapes(tokens, reset)
    state = reset_rows(state, self.init_state(tokens.shape[0]), reset)
    q_doc = segment_doc_ids(segment_ids, tokens)
    # Cache slots are visible only to the document that continues into this segment (id 0).
    k_doc = jnp.concatenate([jnp.where(state["valid"], 0, -1), q_doc], axis=1)
    dtype = self.embedding.table[...].dtype
    x = self.embedding.embed(tokens, dtype)
    new_k, new_v = [], []
    for i, block in enumerate(self.blocks):
      x, k, v = block(x, cache_k=state["k"][:, i], cache_v=state["v"][:, i], q_doc=q_doc, k_doc=k_doc)
      new_k.append(roll_cache(state["k"][:, i], k))
      new_v.append(roll_cache(state["v"][:, i], v))
    logits = self.embedding.logits(self.final_norm(x))
    valid = roll_cache_valid(state["valid"], q_doc)
    return logits, {"k": jnp.stack(new_k, axis=1), "v": jnp.stack(new_v, axis=1), "valid": valid}

  @classmethod
  def flops_per_token(cls, cfg: TransformerConfig, *, seg_len: int) -> float:
    d, h, hd, L = cfg.d_model, cfg.num_heads, cfg.resolved_head_dim, cfg.num_layers
    kvh = cfg.num_kv_heads or h
    proj = 2 * d * hd * (2 * h + 2 * kvh)  # q, o and k, v projections
    mlp = 2 * 3 * d * cfg.resolved_d_ff
    attn = 2 * 2 * h * hd * cfg.window  # QK^T and PV over the visible window
    head = 2 * d * cfg.vocab_size
    return float(L * (proj + mlp + attn) + head)
