"""Sliding-window Transformer baseline with a Transformer-XL style K/V cache.

Decoder-only, pre-norm: `x += Attn(RMSNorm(x)); x += GatedMLP(RMSNorm(x))`.
Each token attends to itself and the previous `window` tokens of its own
document; the state caches the last `window` (unrotated) keys and values of
every layer, so a stream cut into any segments gives the same logits as one
long pass. Positions are rotary, relative inside [cache; segment].

With `embed_conv = K > 1` every token's input embedding also mixes in the
K-1 tokens before it (`token_conv`), so the first attention layer can already
match "the token after X" (induction, associative recall) instead of having to
build a previous-token head from rotary positions first; on the synthetic
recall tasks this turns copying from not learned in 1000 steps into learned
in ~500.

State (every leaf batch-first):
  k, v:  [batch, layers, window, kv_heads, head_dim]  cached keys / values
  valid: [batch, window] bool  cache slot belongs to the document still open
  prev_tokens, prev_valid: [batch, K-1]  the last K-1 tokens (only with embed_conv > 1)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from longctx.config import ModelConfig
from longctx.errors import ConfigError
from longctx.layers import ATTENTION_IMPLS, GatedMLP, RMSNorm, cached_window_attention, param
from longctx.models.base import SegmentLM, reset_rows
from longctx.models.registry import register_model


@dataclasses.dataclass
class TransformerConfig(ModelConfig):
  name: str = "transformer"
  window: int = 128  # tokens visible before each token (the cache length)
  num_kv_heads: int = 0  # 0 = num_heads (multi-head); fewer = grouped-query attention
  rope_base: float = 10000.0
  attention_block: int = 0  # block size of the attention (0 = 128 for flash, the window for pairs)
  attention_impl: str = "flash"  # "flash" (blockwise online softmax), "pallas" (its kernels) or "pairs" (dense pairs)
  embed_conv: int = 0  # width of a causal depthwise conv over token embeddings (0 = off; 4 helps recall)

  def validate(self) -> None:
    super().validate()
    if self.window < 1:
      raise ConfigError(f"model.window={self.window} must be >= 1")
    kv = self.num_kv_heads or self.num_heads
    if kv < 1 or self.num_heads % kv:
      raise ConfigError(f"model.num_heads={self.num_heads} must be a multiple of model.num_kv_heads={kv}")
    if self.resolved_head_dim % 2:
      raise ConfigError(f"head_dim={self.resolved_head_dim} must be even for rotary positions")
    if self.embed_conv < 0 or self.embed_conv == 1:
      raise ConfigError(f"model.embed_conv={self.embed_conv} must be 0 (off) or a width >= 2 (e.g. 4)")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ConfigError(f"model.attention_impl={self.attention_impl!r} is not one of {ATTENTION_IMPLS}")
    if self.attention_impl == "pairs" and self.attention_block and self.attention_block < self.window:
      raise ConfigError(f"model.attention_block={self.attention_block} must be 0 or >= model.window={self.window} "
                        "with model.attention_impl='pairs'")


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

  def project(self, x):
    """x `[batch, seg, d_model]` -> unrotated q `[batch, seg, heads, head_dim]`, k, v `[batch, seg, kv_heads, head_dim]`."""
    return tuple(jnp.einsum("bsd,dhk->bshk", x, w[...].astype(x.dtype)) for w in (self.wq, self.wk, self.wv))

  def attend(self, x, *, cache_k, cache_v, q_doc, k_doc):
    """The windowed attention before the output projection.

    Returns the per-head output `[batch, seg, heads, head_dim]` and the segment's
    unrotated q `[batch, seg, heads, head_dim]`, k, v `[batch, seg, kv_heads, head_dim]`.
    """
    cfg = self.cfg
    q, k, v = self.project(x)
    out = cached_window_attention(q, k, v, cache_k=cache_k, cache_v=cache_v, q_doc=q_doc,
                                  cache_doc=k_doc[:, :cache_k.shape[1]], window=cfg.window, rope_base=cfg.rope_base,
                                  impl=cfg.attention_impl, block=cfg.attention_block or None)
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


def token_conv(e: jax.Array, kernel: jax.Array, doc: jax.Array) -> jax.Array:
  """Causal depthwise convolution with a residual, within documents.

      y_t = e_t + sum_{j=0}^{K-1} kernel_j * e_{t-j}   (terms from another document dropped)

  Args:
    e: `[batch, K-1 + seq, d]` embeddings of the K-1 previous tokens, then the segment.
    kernel: `[K, d]`; tap j multiplies the input j steps back.
    doc: `[batch, K-1 + seq]` document ids (-1: no token there).
  Returns:
    `[batch, seq, d]`.
  """
  taps = kernel.shape[0]
  seq = e.shape[1] - (taps - 1)
  x_doc = doc[:, taps - 1:]
  y = e[:, taps - 1:]
  for j in range(taps):
    start = taps - 1 - j
    same = (doc[:, start:start + seq] == x_doc)[..., None]
    y = y + jnp.where(same, e[:, start:start + seq] * kernel[j].astype(e.dtype), 0)
  return y


def token_history(tokens: jax.Array, q_doc: jax.Array, prev_tokens: jax.Array, prev_valid: jax.Array):
  """The last K-1 tokens after a segment, valid where they belong to its last document.

  tokens, q_doc `[batch, seq]`; prev_tokens, prev_valid `[batch, K-1]`.
  """
  n = prev_tokens.shape[1]
  all_tokens = jnp.concatenate([prev_tokens, tokens], axis=1)[:, -n:]
  all_doc = jnp.concatenate([jnp.where(prev_valid, 0, -1), q_doc], axis=1)[:, -n:]
  return all_tokens, all_doc == q_doc[:, -1:]


class Embedding(nnx.Module):
  """Token embedding `[vocab, d_model]`, optional causal token conv, optional untied output head."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.table = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), fan_in=cfg.d_model)
    self.head = None if cfg.tie_embeddings else param(
        rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), fan_in=cfg.d_model)
    taps = getattr(cfg, "embed_conv", 0)
    self.conv = param(rngs, (taps, cfg.d_model), ("conv", "embed"), fan_in=taps) if taps else None

  @property
  def history_len(self) -> int:
    """Previous tokens the embedding of a token depends on (K-1 with a conv of width K)."""
    return 0 if self.conv is None else self.conv.shape[0] - 1

  def init_history(self, batch_size: int) -> dict:
    """State entries for the token history (empty without a conv)."""
    n = self.history_len
    if not n:
      return {}
    return {"prev_tokens": jnp.zeros((batch_size, n), jnp.int32), "prev_valid": jnp.zeros((batch_size, n), bool)}

  def embed(self, tokens: jax.Array, dtype) -> jax.Array:
    """Plain lookup `[batch, seq] -> [batch, seq, d_model]` (no conv)."""
    return jnp.take(self.table[...], tokens, axis=0).astype(dtype)

  def embed_segment(self, tokens: jax.Array, state: dict, q_doc: jax.Array, dtype) -> tuple[jax.Array, dict]:
    """Embed a segment, conv included; returns `[batch, seq, d_model]` and the new history entries.

    state: holds `prev_tokens`, `prev_valid` when there is a conv (`init_history`);
    q_doc `[batch, seq]` document ids (0 = the document the history belongs to).
    """
    if self.conv is None:
      return self.embed(tokens, dtype), {}
    prev_tokens, prev_valid = state["prev_tokens"], state["prev_valid"]
    e = self.embed(jnp.concatenate([prev_tokens, tokens], axis=1), dtype)
    doc = jnp.concatenate([jnp.where(prev_valid, 0, -1), q_doc], axis=1)
    x = token_conv(e, self.conv[...], doc)
    new_tokens, new_valid = token_history(tokens, q_doc, prev_tokens, prev_valid)
    return x, {"prev_tokens": new_tokens, "prev_valid": new_valid}

  def logits(self, x: jax.Array) -> jax.Array:
    """`[batch, seq, d_model] -> [batch, seq, vocab]` in float32."""
    if self.head is None:
      w = self.table[...].astype(x.dtype)
      return jnp.einsum("bsd,vd->bsv", x, w, preferred_element_type=jnp.float32)
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
  context_parallel = "ring attention (cache block + segment ring, merged by log-sum-exp)"
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
        **self.embedding.init_history(batch_size),
    }

  def __call__(self, tokens, state, *, reset, segment_ids=None):
    self.check_segment_shapes(tokens, reset)
    state = reset_rows(state, self.init_state(tokens.shape[0]), reset)
    q_doc = segment_doc_ids(segment_ids, tokens)
    # Cache slots are visible only to the document that continues into this segment (id 0).
    k_doc = jnp.concatenate([jnp.where(state["valid"], 0, -1), q_doc], axis=1)
    dtype = self.embedding.table[...].dtype
    x, history = self.embedding.embed_segment(tokens, state, q_doc, dtype)
    new_k, new_v = [], []
    for i, block in enumerate(self.blocks):
      x, k, v = block(x, cache_k=state["k"][:, i], cache_v=state["v"][:, i], q_doc=q_doc, k_doc=k_doc)
      new_k.append(roll_cache(state["k"][:, i], k))
      new_v.append(roll_cache(state["v"][:, i], v))
    logits = self.embedding.logits(self.final_norm(x))
    valid = roll_cache_valid(state["valid"], q_doc)
    return logits, {"k": jnp.stack(new_k, axis=1), "v": jnp.stack(new_v, axis=1), "valid": valid, **history}

  @classmethod
  def flops_per_token(cls, cfg: TransformerConfig, *, seg_len: int) -> float:
    d, h, hd, L = cfg.d_model, cfg.num_heads, cfg.resolved_head_dim, cfg.num_layers
    kvh = cfg.num_kv_heads or h
    proj = 2 * d * hd * (2 * h + 2 * kvh)  # q, o and k, v projections
    mlp = 2 * 3 * d * cfg.resolved_d_ff
    attn = 2 * 2 * h * hd * cfg.window  # QK^T and PV over the visible window
    head = 2 * d * cfg.vocab_size
    conv = 2 * cfg.embed_conv * d
    return float(L * (proj + mlp + attn) + head + conv)
