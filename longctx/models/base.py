"""The one model interface, and the shell every model is built in.

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

The shell (`LM`) is that interface once for every model: the embedding (its token conv and history
included), the per-lane document position, resets, the document ids and positions every layer reads
(`Context`), the stack of blocks, the final norm and the head, and the loop over a segment. A model is a
config class naming the mixer of each layer (`ModelConfig.layer_pattern`) plus mixers
(`layers.block.Mixer`): usually one file, registered with `@register_model`.

State of every model:
    pos      [batch] int32   tokens of the open document seen so far (the next token's position in it)
    blocks   one dict per layer, the state of its mixer (an XL cache, a recurrent state, a memory)
    history  [batch, K-1] int32  the last K-1 tokens (only with a token conv, `embed_conv` = K > 1)
  and whatever the model keeps beside its layers (`init_extra_state`, e.g. RMT's memory tokens).

A model reads a segment in one step, or, if it reads whole blocks (`step_length`), in a `lax.scan` over
blocks: the memory models read a block and write their memory at its end, so a stream gives the same
logits for any cut into whole blocks. At a block whose first token starts a document the whole state is
reset, as `reset` does for a segment.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from longctx.config import ModelConfig
from longctx.errors import LongctxError
from longctx.layers.block import Block, build_block, get_mixer
from longctx.layers.context import Context, segment_doc_ids
from longctx.layers.embedding import Embedding
from longctx.layers.norms import RMSNorm

State = Any  # a pytree of arrays, each [batch, ...]


class SegmentLM(nnx.Module, abc.ABC):
  """The interface every model keeps (module docstring). Registration sets `config_class` and `description`."""

  config_class: ClassVar[type[ModelConfig]] = ModelConfig
  description: ClassVar[str] = ""
  supports_token_decoding: ClassVar[bool] = True
  # How the model splits a segment over the mesh's `sequence` axis ("" = it has no form of its own:
  # XLA's partitioner runs it, correct but gathering the sequence where the math needs it).
  context_parallel: ClassVar[str] = ""
  # Whether the state carries information further back than `horizon` (False: a window it cannot see past).
  has_memory: ClassVar[bool] = True

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
    """Activations saved for the backward pass per token (all layers), for memory estimates."""
    raise NotImplementedError

  @classmethod
  def horizon(cls, cfg: ModelConfig) -> int:
    """How many tokens back the logits see without the model's memory (windows and convs; the contract tests
    check that dependence beyond it goes through the memory, or, without one, that there is none)."""
    raise NotImplementedError

  def check_segment_shapes(self, tokens: jax.Array, reset: jax.Array) -> None:
    if tokens.ndim != 2:
      raise LongctxError(f"tokens must be [batch, seg_len], got shape {tokens.shape}")
    if reset.shape != tokens.shape[:1]:
      raise LongctxError(f"reset must be [batch]={tokens.shape[:1]}, got shape {reset.shape}")


class LM(SegmentLM):
  """The shell: embedding, the blocks of `cfg.layer_configs()`, final RMSNorm, head; the segment loop.

  A model overrides what its math needs and nothing else:
    step_length(seg_len)            tokens per step of the segment loop (default: the whole segment)
    forward_step(x, state, ctx)     one step through the blocks (default: each block in order)
    init_extra_state / fresh_extra_state   state the model keeps beside its layers
    segment_multiple, supports_token_decoding, context_parallel, flops and memory hooks
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embedding = Embedding(cfg, rngs=rngs)
    self.blocks = nnx.List([build_block(name, layer_cfg, layer=i, rngs=rngs)
                            for i, (name, layer_cfg) in enumerate(cfg.layer_configs())])
    self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)

  # ------------------------------------------------------------------------- hooks

  def step_length(self, seg_len: int) -> int:
    """Tokens per step of the segment loop; a divisor of every segment length the model accepts."""
    return seg_len

  def init_extra_state(self, batch_size: int) -> dict:
    """State kept beside the layers (no parameter read)."""
    return {}

  def fresh_extra_state(self, batch_size: int) -> dict:
    """What `init_extra_state` holds for a new document (may read parameters)."""
    return self.init_extra_state(batch_size)

  def forward_step(self, x: jax.Array, state: dict, ctx: Context) -> tuple[jax.Array, dict]:
    """One step: `x [batch, step, d_model]` through every block; returns the hidden states and the state."""
    blocks = list(state["blocks"])
    for i, block in enumerate(self.blocks):
      x, blocks[i] = block(x, blocks[i], ctx)
    return x, {**state, "blocks": blocks}

  # ------------------------------------------------------------------------- the interface

  def init_state(self, batch_size: int) -> State:
    state = {"pos": jnp.zeros((batch_size,), jnp.int32),
             "blocks": [block.init_state(batch_size) for block in self.blocks],
             **self.init_extra_state(batch_size)}
    history = self.embedding.init_history(batch_size)
    return state if history is None else {**state, "history": history}

  def fresh_state(self, batch_size: int) -> State:
    """`init_state` as a new document starts it: learned initial memories written in (reads parameters)."""
    state = {"pos": jnp.zeros((batch_size,), jnp.int32),
             "blocks": [block.fresh_state(batch_size) for block in self.blocks],
             **self.fresh_extra_state(batch_size)}
    history = self.embedding.init_history(batch_size)
    return state if history is None else {**state, "history": history}

  def __call__(self, tokens, state, *, reset, segment_ids=None):
    self.check_segment_shapes(tokens, reset)
    b, s = tokens.shape
    multiple = self.segment_multiple(self.cfg)
    if s % multiple:
      raise LongctxError(f"{type(self).__name__} reads whole blocks: segment length {s} is not a multiple of "
                         f"model.block_len={multiple}; use a segment length (data.seg_len / --seg-len) that is")
    fresh = self.fresh_state(b)
    state = reset_rows(state, fresh, reset)
    ids = jnp.zeros(tokens.shape, jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    ctx = Context.of(segment_doc_ids(ids, tokens), state["pos"])
    dtype = self.embedding.table[...].dtype
    x, history = self.embedding.embed_segment(tokens, state.get("history"), ctx, dtype)
    carried = {key: value for key, value in state.items() if key != "history"}
    step = self.step_length(s)
    if step == s:
      x, new = self.forward_step(x, carried, ctx)
      new = {**new, "pos": ctx.end}
    else:
      x, new = self._scan_steps(x, ids, carried, {k: v for k, v in fresh.items() if k != "history"}, step)
    new = jax.tree.map(lambda a, old: a.astype(old.dtype), new, carried)  # the state keeps its dtypes
    logits = self.embedding.logits(self.final_norm(x))
    return logits, new if history is None else {**new, "history": history}

  def _scan_steps(self, x, ids, state, fresh, step: int):
    """`forward_step` over consecutive blocks of `step` tokens in a `lax.scan` (module docstring)."""
    b, s = ids.shape
    x_blocks, id_blocks, block_reset = split_into_blocks(x, ids, step)

    def body(state, inputs):
      xb, ib, rst = inputs
      state = reset_rows(state, fresh, rst)
      ctx = Context.of(ib - ib[:, :1], state["pos"])
      xb, new = self.forward_step(xb, state, ctx)
      new = jax.tree.map(lambda a, old: a.astype(old.dtype), {**new, "pos": ctx.end}, state)
      return new, xb

    state, xs = jax.lax.scan(body, state, (x_blocks, id_blocks, block_reset))
    return xs.swapaxes(0, 1).reshape(b, s, -1), state

  # ------------------------------------------------------------------------- FLOPs and memory

  @classmethod
  def flops_per_token(cls, cfg: ModelConfig, *, seg_len: int) -> float:
    """The head, the token conv, and per layer its mixer and (if it has one) the gated MLP."""
    head = 2 * cfg.d_model * cfg.vocab_size
    conv = 2 * cfg.embed_conv * cfg.d_model
    layers = 0.0
    for name, layer_cfg in cfg.layer_configs():
      mixer = get_mixer(name)
      layers += (mixer.flops_per_token(layer_cfg, seg_len=seg_len)
                 + (Block.mlp_flops_per_token(layer_cfg) if mixer.mlp else 0))
    return float(layers + head + conv)

  @classmethod
  def activation_bytes_per_token(cls, cfg: ModelConfig, *, dtype_bytes: int) -> float:
    return float(sum(get_mixer(name).activation_bytes_per_token(layer_cfg, dtype_bytes=dtype_bytes)
                     for name, layer_cfg in cfg.layer_configs()))

  @classmethod
  def horizon(cls, cfg: ModelConfig) -> int:
    """The layers' reaches added up, and the token conv's."""
    return (sum(get_mixer(name).reach(layer_cfg) for name, layer_cfg in cfg.layer_configs())
            + max(cfg.embed_conv - 1, 0))


def reset_rows(state: State, fresh: State, reset: jax.Array) -> State:
  """Rows where `reset [batch]` is set take `fresh`'s values; others keep `state`."""

  def pick(old, new):
    mask = reset.reshape(reset.shape + (1,) * (old.ndim - 1))
    return jnp.where(mask, new.astype(old.dtype), old)

  return jax.tree.map(pick, state, fresh)


def split_into_blocks(x: jax.Array, ids: jax.Array, block: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Cut a segment into blocks for a `lax.scan`, block axis first.

  x `[batch, seg, d]`, ids `[batch, seg]` document ids; seg a multiple of `block`. Returns
  `x [n, batch, block, d]`, `ids [n, batch, block]` and `starts [n, batch]`: a document starts at the
  block's first token (the block's id differs from the last id of the block before it).
  """
  b, s = ids.shape
  n = s // block
  x_blocks = x.reshape(b, n, block, -1).swapaxes(0, 1)
  id_blocks = ids.reshape(b, n, block).swapaxes(0, 1)
  prev_last = jnp.concatenate([id_blocks[:1, :, 0], id_blocks[:-1, :, -1]], axis=0)
  return x_blocks, id_blocks, id_blocks[:, :, 0] != prev_last


def pick_rows(mask: jax.Array, a: State, b: State) -> State:
  """Per row: `a` where `mask [batch]` is set, else `b` (any pytrees of batch-first leaves)."""
  return jax.tree.map(lambda x, y: jnp.where(mask.reshape(mask.shape + (1,) * (x.ndim - 1)), x, y.astype(x.dtype)),
                      a, b)
