"""The one model interface: a segment-recurrent language model.

    state = model.init_state(batch_size)                 # pytree, fixed shapes
    logits, state = model(tokens, state, reset=reset,    # tokens [batch, seg_len] int32
                          segment_ids=segment_ids)       # reset [batch] bool

* `reset[b]` replaces row b's state by the initial state before the segment is
  read, inside the jitted step (`jnp.where`, never by re-tracing).
* `segment_ids [batch, seg_len]` numbers the documents inside a segment row
  (0 for the first token, +1 at every document start); a token never sees a
  token of another document. Omitted = one document per row.
* Every leaf of the state has the batch (lane) dimension first, so the
  training loop shards it like the batch and a lane never migrates.
* Streaming a document = a scan over segments carrying `state`; the logits do
  not depend on how the document was cut.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from longctx.config import ModelConfig
from longctx.errors import LongctxError

State = Any  # a pytree of arrays, each [batch, ...]


class SegmentLM(nnx.Module, abc.ABC):
  """Base class of every model. Subclasses set `config_class` and `description`."""

  config_class: ClassVar[type[ModelConfig]] = ModelConfig
  description: ClassVar[str] = ""
  supports_token_decoding: ClassVar[bool] = True
  # How the model splits a segment over the mesh's `sequence` axis ("" = it has no form of its own:
  # XLA's partitioner runs it, correct but gathering the sequence where the math needs it).
  context_parallel: ClassVar[str] = ""

  @abc.abstractmethod
  def init_state(self, batch_size: int) -> State:
    """The state of `batch_size` fresh lanes.

    Must not read parameters (the trainer calls it on an abstract model); a
    learned initial state is applied inside `__call__` where `reset` is set.
    """

  @abc.abstractmethod
  def __call__(self, tokens: jax.Array, state: State, *, reset: jax.Array,
               segment_ids: jax.Array | None = None) -> tuple[jax.Array, State]:
    """`tokens [batch, seg_len]` -> `logits [batch, seg_len, vocab]` (float32), new state."""

  @classmethod
  def segment_multiple(cls, cfg: ModelConfig) -> int:
    """Segment lengths must be multiples of this (block-recurrent models read whole blocks)."""
    return 1

  @classmethod
  def flops_per_token(cls, cfg: ModelConfig, *, seg_len: int) -> float:
    """Forward matmul FLOPs per token (2 per multiply-add); training is 3x."""
    raise NotImplementedError

  @classmethod
  def activation_bytes_per_token(cls, cfg: ModelConfig, *, dtype_bytes: int) -> float:
    """Activations saved for the backward pass per token (all layers), for memory estimates.

    The default counts a pre-norm Transformer layer: residual/norm inputs,
    q/k/v/o, the gated MLP's hidden and the attention probabilities.
    """
    d, h, hd, ff = cfg.d_model, cfg.num_heads, cfg.resolved_head_dim, cfg.resolved_d_ff
    visible = 2 * getattr(cfg, "attention_block", 0) or 2 * getattr(cfg, "window", 0) or 0
    per_layer = (4 * d + 4 * h * hd + 3 * ff) * dtype_bytes + h * visible * 4
    return float(cfg.num_layers * per_layer)

  def check_segment_shapes(self, tokens: jax.Array, reset: jax.Array) -> None:
    if tokens.ndim != 2:
      raise LongctxError(f"tokens must be [batch, seg_len], got shape {tokens.shape}")
    if reset.shape != tokens.shape[:1]:
      raise LongctxError(f"reset must be [batch]={tokens.shape[:1]}, got shape {reset.shape}")


def reset_rows(state: State, fresh: State, reset: jax.Array) -> State:
  """Rows where `reset [batch]` is set take `fresh`'s values; others keep `state`."""

  def pick(old, new):
    mask = reset.reshape(reset.shape + (1,) * (old.ndim - 1))
    return jnp.where(mask, new.astype(old.dtype), old)

  return jax.tree.map(pick, state, fresh)
