"""Token embedding, the optional causal token conv over it, and the output head.

With `embed_conv = K > 1` every token's input embedding also mixes in the K-1 tokens before it of its
own document (`token_conv`), so the first layer can already match "the token after X" (induction,
associative recall) instead of having to build a previous-token head first; on the synthetic recall
tasks this turns copying from not learned in 1000 steps into learned in ~500. The lane's last K-1
tokens are state (`history`); which of them belong to the open document follows from the context.
"""

from __future__ import annotations

import jax
import ml_dtypes
import jax.numpy as jnp
from flax import nnx

from longctx.layers.context import Context
from longctx.layers.linear import dense, param, soft_cap


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


class Embedding(nnx.Module):
  """Token embedding `[vocab, d_model]`, optional causal token conv, tied or untied output head."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.table = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), fan_in=cfg.d_model)
    self.head = None if cfg.tie_embeddings else param(
        rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), fan_in=cfg.d_model)
    self.logit_cap = cfg.logit_cap
    # Gemma's sqrt(d_model), as its checkpoints were trained and transformers computes it: rounded to bfloat16
    self.scale = float(ml_dtypes.bfloat16(cfg.d_model ** 0.5)) if cfg.embed_scale else None
    taps = cfg.embed_conv
    self.conv = param(rngs, (taps, cfg.d_model), ("conv", "embed"), fan_in=taps) if taps else None

  @property
  def history_len(self) -> int:
    """Previous tokens the embedding of a token depends on (K-1 with a conv of width K)."""
    return 0 if self.conv is None else self.conv.shape[0] - 1

  def init_history(self, batch_size: int) -> jax.Array | None:
    """The state of the token history: the lane's last K-1 tokens `[batch, K-1]` (None without a conv)."""
    n = self.history_len
    return jnp.zeros((batch_size, n), jnp.int32) if n else None

  def embed(self, tokens: jax.Array, dtype) -> jax.Array:
    """Plain lookup `[batch, seq] -> [batch, seq, d_model]` (no conv), times `scale` where `model.embed_scale`."""
    e = jnp.take(self.table[...], tokens, axis=0).astype(dtype)
    return e if self.scale is None else e * jnp.asarray(self.scale, dtype)

  def embed_segment(self, tokens: jax.Array, history: jax.Array | None, ctx: Context,
                    dtype) -> tuple[jax.Array, jax.Array | None]:
    """Embed a segment, conv included: `[batch, seq, d_model]` and the new history `[batch, K-1]` (or None)."""
    if self.conv is None:
      return self.embed(tokens, dtype), None
    n = self.history_len
    all_tokens = jnp.concatenate([history, tokens], axis=1)
    doc = jnp.concatenate([ctx.history_doc(n), ctx.doc], axis=1)
    return token_conv(self.embed(all_tokens, dtype), self.conv[...], doc), all_tokens[:, -n:]

  def logits(self, x: jax.Array) -> jax.Array:
    """`[batch, seq, d_model] -> [batch, seq, vocab]` in float32 (soft-capped where `model.logit_cap` > 0)."""
    w = self.table[...].T if self.head is None else self.head[...]
    logits = dense(x, w, preferred_element_type=jnp.float32)
    if self.logit_cap:
      logits = soft_cap(logits, self.logit_cap)
    return logits
