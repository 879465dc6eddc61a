"""Shared machinery of the block-recurrent memory models (RMT, Block-Recurrent, Memorizing, MELODI).

Such a model reads a segment as consecutive *blocks* of `block_len` tokens
(`block_len` divides the segment length). Inside a block, tokens attend to each
other and to a Transformer-XL cache of the previous `window` tokens exactly as
the baseline does; a model's memory is read at the start of a block and written
at its end. A stream therefore gives the same logits for every cut into
segments that are whole blocks, and `lax.scan` over blocks keeps the compiled
step the same size for any segment length.

Documents. The whole state (the learned initial memory included) is
re-initialised at a block whose first token starts a document. In a block in
which a document starts *after* its first token, the tokens before that start
(the previous document's tail) read the carried memory and the tokens after it
read the fresh one, and the memory the block writes is its last document's,
grown from the fresh memory: per token, exactly as if every document had
started at a block. Since tokens never attend across documents, this is the
block run twice, once from each memory, with every token (and its XL-cache
entry) taken from the run of its own memory, and the written memory from the
run of the last document's (`_read_block`); the second run happens only when
some row of the batch has a document starting inside the block. Models mask
their memory writes with `last_doc = q_doc == q_doc[:, -1:]`.
`data.align_documents = block_len` pads every document to whole blocks, which
saves the second run.

State (every leaf batch-first):
  k, v:    [batch, layers, window, kv_heads, head_dim]  the XL cache, as in the baseline
  valid:   [batch, window] bool
  memory:  the model's own pytree (`init_memory`)
"""

from __future__ import annotations

import abc
import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from longctx.errors import ConfigError, LongctxError
from longctx.models.base import SegmentLM, State, reset_rows
from longctx.models.transformer import TransformerConfig, roll_cache, roll_cache_valid


@dataclasses.dataclass
class BlockwiseConfig(TransformerConfig):
  block_len: int = 0  # tokens per memory read/write (0 = window); segments must be whole blocks

  def validate(self) -> None:
    super().validate()
    if self.block_len < 0:
      raise ConfigError(f"model.block_len={self.block_len} must be >= 0 (0 = model.window)")

  @property
  def resolved_block_len(self) -> int:
    return self.block_len or self.window


class BlockwiseLM(SegmentLM):
  """Base class: subclasses build `self.embedding`, `self.final_norm` and implement the three hooks.

  Hooks:
    init_memory(batch_size) -> memory pytree (no parameters read; zeros are fine).
    fresh_memory(memory) -> the memory a new document starts from (may read
      parameters, e.g. a learned initial memory; default: `memory` itself).
    forward_block(x, *, memory, caches, q_doc, k_doc) -> (x, new_kv, memory):
      x `[batch, block, d_model]` embedded tokens; caches: per layer `(k, v)`
      `[batch, window, kv_heads, head_dim]`; q_doc `[batch, block]` document ids
      (0 = the document the memory belongs to); k_doc `[batch, window + block]`.
      With `xl_cache = False` the state holds no cache: caches is None, k_doc
      is q_doc, and new_kv is ignored (return None).
      Returns the last hidden states, per layer the block's new unrotated `(k, v)`
      `[batch, block, kv_heads, head_dim]`, and the memory after the block.
  """

  supports_token_decoding = False
  xl_cache: ClassVar[bool] = True  # False: no K/V cache in the state (the model's memory replaces it)

  @abc.abstractmethod
  def init_memory(self, batch_size: int) -> State:
    ...

  def fresh_memory(self, memory: State) -> State:
    return memory

  @abc.abstractmethod
  def forward_block(self, x, *, memory, caches, q_doc, k_doc):
    ...

  @classmethod
  def segment_multiple(cls, cfg: BlockwiseConfig) -> int:
    return cfg.resolved_block_len

  def _read_block(self, x, carried, fresh, *, caches, q_doc, k_doc):
    """`forward_block` with each token reading its own document's memory (see Documents above).

    carried / fresh: the memory the block's first document has / a document starting inside it gets.
    Returns (x, new_kv, memory written) like `forward_block`.
    """
    run = lambda memory: self.forward_block(x, memory=memory, caches=caches, q_doc=q_doc, k_doc=k_doc)
    x_old, kv_old, mem_old = run(carried)
    later = q_doc > 0  # [batch, block]: tokens of a document that started inside this block

    def with_fresh(_):
      x_new, kv_new, mem_new = run(fresh)
      last_is_new = later[:, -1]  # the row's memory after the block is its last document's
      mem = jax.tree.map(lambda a, b: jnp.where(last_is_new.reshape((-1,) + (1,) * (a.ndim - 1)), a, b.astype(a.dtype)),
                         mem_new, mem_old)
      return _pick_tokens(later, x_new, x_old), _pick_tokens(later, kv_new, kv_old), mem

    return jax.lax.cond(jnp.any(later), with_fresh, lambda _: (x_old, kv_old, mem_old), None)

  def init_state(self, batch_size: int) -> State:
    cfg = self.cfg
    history = self.embedding.init_history(batch_size)
    if not self.xl_cache:
      return {"memory": self.init_memory(batch_size), **history}
    kv_shape = (batch_size, cfg.num_layers, cfg.window, cfg.num_kv_heads or cfg.num_heads, cfg.resolved_head_dim)
    return {"k": jnp.zeros(kv_shape, jnp.float32), "v": jnp.zeros(kv_shape, jnp.float32),
            "valid": jnp.zeros((batch_size, cfg.window), bool), "memory": self.init_memory(batch_size), **history}

  def __call__(self, tokens, state, *, reset, segment_ids=None):
    self.check_segment_shapes(tokens, reset)
    cfg = self.cfg
    b, s = tokens.shape
    block = cfg.resolved_block_len
    if s % block:
      raise LongctxError(f"{type(self).__name__} reads whole blocks: segment length {s} is not a multiple of "
                         f"model.block_len={block}; use a segment length (data.seg_len / --seg-len) that is")
    fresh = self.init_state(b)
    fresh["memory"] = self.fresh_memory(fresh["memory"])
    state = reset_rows(state, fresh, reset)
    ids = jnp.zeros(tokens.shape, jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    dtype = self.embedding.table[...].dtype
    # The token history (embed_conv) is per segment; the scan carries the rest of the state.
    x, history = self.embedding.embed_segment(tokens, state, ids - ids[:, :1], dtype)
    state = {key: val for key, val in state.items() if key not in history}
    fresh = {key: val for key, val in fresh.items() if key not in history}
    x_blocks, id_blocks, block_reset = split_into_blocks(x, ids, block)

    def body(state, inputs):
      x, blk_ids, rst = inputs
      state = reset_rows(state, fresh, rst)
      q_doc = blk_ids - blk_ids[:, :1]
      if not self.xl_cache:
        x, _, new_memory = self._read_block(x, state["memory"], fresh["memory"], caches=None, q_doc=q_doc,
                                            k_doc=q_doc)
        return {"memory": jax.tree.map(lambda new, old: new.astype(old.dtype), new_memory, state["memory"])}, x
      k_doc = jnp.concatenate([jnp.where(state["valid"], 0, -1), q_doc], axis=1)
      caches = [(state["k"][:, i], state["v"][:, i]) for i in range(cfg.num_layers)]
      x, new_kv, new_memory = self._read_block(x, state["memory"], fresh["memory"], caches=caches, q_doc=q_doc,
                                               k_doc=k_doc)
      new_memory = jax.tree.map(lambda new, old: new.astype(old.dtype), new_memory, state["memory"])
      new_state = {
          "k": jnp.stack([roll_cache(state["k"][:, i], k) for i, (k, _) in enumerate(new_kv)], axis=1),
          "v": jnp.stack([roll_cache(state["v"][:, i], v) for i, (_, v) in enumerate(new_kv)], axis=1),
          "valid": roll_cache_valid(state["valid"], q_doc),
          "memory": new_memory,
      }
      return new_state, x

    state, xs = jax.lax.scan(body, state, (x_blocks, id_blocks, block_reset))
    x = xs.swapaxes(0, 1).reshape(b, s, -1)
    return self.embedding.logits(self.final_norm(x)), {**state, **history}


def _pick_tokens(later, new, old):
  """Per token: `new` where `later [batch, block]` is set, else `old` (leaves `[batch, block, ...]`)."""
  return jax.tree.map(lambda a, b: jnp.where(later.reshape(later.shape + (1,) * (a.ndim - 2)), a, b), new, old)


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


def last_doc_mask(q_doc: jax.Array) -> jax.Array:
  """`[batch, block]` bool: the token belongs to the block's last document (the one memory writes may see)."""
  return q_doc == q_doc[:, -1:]
