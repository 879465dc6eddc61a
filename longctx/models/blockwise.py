"""What the block-recurrent memory models share (RMT, Block-Recurrent, Memorizing, MELODI): they read a segment
as consecutive blocks of `block_len` tokens.

Inside a block, tokens attend to each other and to a Transformer-XL cache of the previous `window` tokens
exactly as the baseline does; a model's memory is read at the start of a block and written at its end.
The shell (models/base.py) runs the blocks in a `lax.scan`, so a stream gives the same logits for every
cut into segments that are whole blocks and the compiled step is the same size for any segment length;
token-by-token decoding is refused (`supports_token_decoding`).

Documents. The whole state (the learned initial memory included) is re-initialised at a block whose first
token starts a document. In a block in which a document starts *after* its first token, the tokens before
that start (the previous document's tail, `ctx.doc == 0`) read the carried memory and the tokens after it
read the fresh one, and the memory the block writes is its last document's (`ctx.last_doc`), grown from
the fresh memory: per token, exactly as if every document had started at a block. Each memory layer does
this itself (its reads pick per token, its write per row); RMT, whose memory tokens run through every
layer, runs the block a second time from the fresh memory. `data.align_documents = block_len` pads
every document to whole blocks, which saves that work.
"""

from __future__ import annotations

import dataclasses

from longctx.errors import ConfigError
from longctx.models.base import LM
from longctx.models.transformer import TransformerConfig


@dataclasses.dataclass
class BlockwiseConfig(TransformerConfig):
  tiny = {"block_len": 16}

  block_len: int = 0  # tokens per memory read/write (0 = window); segments must be whole blocks

  def validate(self) -> None:
    super().validate()
    if self.block_len < 0:
      raise ConfigError(f"model.block_len={self.block_len} must be >= 0 (0 = model.window)")

  @property
  def resolved_block_len(self) -> int:
    return self.block_len or self.window


class BlockwiseLM(LM):
  """A model that reads whole blocks (module docstring)."""

  supports_token_decoding = False

  @classmethod
  def segment_multiple(cls, cfg: BlockwiseConfig) -> int:
    return cfg.resolved_block_len

  def step_length(self, seg_len: int) -> int:
    return self.cfg.resolved_block_len


def check_layer_list(key: str, layers: list[int], num_layers: int) -> None:
  """Validate `model.<key>`, a non-empty list of distinct layer indices (negative counts from the top)."""
  n = num_layers
  if not layers:
    raise ConfigError(f"model.{key} must name at least one layer (e.g. [-2], the second-to-last)")
  bad = [i for i in layers if not -n <= i < n]
  if bad:
    raise ConfigError(f"model.{key}={layers}: layer index {bad[0]} is out of range for model.num_layers={n} "
                      f"(valid: {-n}..{n - 1})")
  if len(set(resolve_layer_list(layers, n))) != len(layers):
    raise ConfigError(f"model.{key}={layers} names a layer twice")


def resolve_layer_list(layers: list[int], num_layers: int) -> tuple[int, ...]:
  """Layer indices made non-negative and sorted."""
  return tuple(sorted(i % num_layers for i in layers))
