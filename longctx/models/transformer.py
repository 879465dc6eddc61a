"""Sliding-window Transformer baseline with a Transformer-XL style K/V cache.

Decoder-only, pre-norm: `x += Attn(RMSNorm(x)); x += GatedMLP(RMSNorm(x))`. Each token attends to
itself and the previous `window` tokens of its own document; the state caches the last `window`
(unrotated) keys and values of every layer, so a stream cut into any segments gives the same logits as
one long pass. Positions are rotary, relative inside [cache; segment]. Grouped-query attention with
`num_kv_heads`; optional causal token conv over the embeddings (`embed_conv`, the shell's).

The whole math is the shell (models/base.py: embedding, blocks, head) around the shared
`layers.attention.WindowAttention` mixer, whose `attention` call runs dense, flash or Pallas attention
(`model.kernel`) and ring attention over the mesh's `sequence` axis.

State (besides the shell's `pos` and `history`), per layer:
  k, v:  [batch, window, kv_heads, head_dim]  cached keys / values
"""

from __future__ import annotations

import dataclasses

from longctx.config import MultiHeadConfig
from longctx.errors import ConfigError
from longctx.layers.attention import WindowAttention  # noqa: F401  (registers the "attention" mixer)
from longctx.models.base import LM
from longctx.models.registry import register_model


@dataclasses.dataclass
class TransformerConfig(MultiHeadConfig):
  mixer = "attention"
  tiny = {"num_kv_heads": 2, "window": 8}

  name: str = "transformer"
  window: int = 128  # tokens visible before each token (the cache length)
  num_kv_heads: int = 0  # 0 = num_heads (multi-head); fewer = grouped-query attention
  rope_base: float = 10000.0
  attention_block: int = 0  # query/key block of the flash kernels (0 = layers.attention.default_block)

  def validate(self) -> None:
    super().validate()
    if self.window < 1:
      raise ConfigError(f"model.window={self.window} must be >= 1")
    kv = self.num_kv_heads or self.num_heads
    if kv < 1 or self.num_heads % kv:
      raise ConfigError(f"model.num_heads={self.num_heads} must be a multiple of model.num_kv_heads={kv}")
    if self.resolved_head_dim % 2:
      raise ConfigError(f"head_dim={self.resolved_head_dim} must be even for rotary positions")
    if self.attention_block < 0:
      raise ConfigError(f"model.attention_block={self.attention_block} must be >= 0 (0 = the default tile)")


@register_model("transformer", config=TransformerConfig,
                description="Sliding-window Transformer with a Transformer-XL K/V cache (the baseline)")
class Transformer(LM):
  context_parallel = "ring attention (cache block + segment ring, merged by log-sum-exp)"
  has_memory = False  # it sees `window` tokens back per layer, and nothing beyond
