"""What a layer knows about the tokens it reads: which document each belongs to, and where in it.

Every lane carries one number across segments, `pos` (the position the next token has in its
document: the tokens of the open document seen so far). From it and the segment's document ids the
shell builds a `Context`, and every layer reads its documents and positions from there: rotary and
retention positions, which slots of an XL cache or a conv history still belong to the open document,
where a Titans chunk or an Infini-attention block stands. No layer keeps a validity mask or an offset
of its own.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Context:
  """The tokens of one step (a segment, or one block of it) of every lane.

  doc:   `[batch, seq]` int32 document ids: 0 for the document open before the step (the one the state
         belongs to), +1 at every document start inside the step.
  pos:   `[batch, seq]` int32 each token's position in its document.
  start: `[batch]` int32 tokens of document 0 seen before the step (0 after a reset).
  """

  doc: jax.Array
  pos: jax.Array
  start: jax.Array

  @classmethod
  def of(cls, doc: jax.Array, start: jax.Array) -> "Context":
    """The context of a step with document ids `doc [batch, seq]` (0 = the open document) after `start` tokens of it."""
    doc = doc.astype(jnp.int32)
    start = start.astype(jnp.int32)
    return cls(doc=doc, pos=positions_in_document(doc, start), start=start)

  @property
  def starts(self) -> jax.Array:
    """`[batch, seq]` bool: a document starts at this token inside the step (never at index 0: that is `reset`)."""
    return jnp.concatenate([jnp.zeros_like(self.doc[:, :1], bool), self.doc[:, 1:] != self.doc[:, :-1]], axis=1)

  @property
  def last_doc(self) -> jax.Array:
    """`[batch, seq]` bool: the token belongs to the step's last document (the one the state goes on with)."""
    return self.doc == self.doc[:, -1:]

  @property
  def end(self) -> jax.Array:
    """`[batch]` int32: `start` of the next step (tokens of the step's last document so far)."""
    return self.pos[:, -1] + 1

  def history(self, n: int) -> jax.Array:
    """`[batch, n]` bool: which of the `n` tokens before the step (oldest first) belong to document 0."""
    return jnp.arange(n)[None] >= n - self.start[:, None]

  def history_doc(self, n: int) -> jax.Array:
    """`[batch, n]` int32 document ids of the `n` tokens before the step: 0, or -1 (another document, never seen)."""
    return jnp.where(self.history(n), 0, -1).astype(jnp.int32)


def positions_in_document(doc: jax.Array, start: jax.Array) -> jax.Array:
  """Position of every token in its document `[batch, seq]`: document 0 continues from `start [batch]`,
  every later one starts at 0 where its id changes."""
  idx = jnp.arange(doc.shape[1])[None]
  starts = jnp.concatenate([jnp.ones_like(doc[:, :1], bool), doc[:, 1:] != doc[:, :-1]], axis=1)
  start_idx = lax.cummax(jnp.where(starts, idx, 0), axis=1)
  return jnp.where(doc == 0, start[:, None] + idx, idx - start_idx).astype(jnp.int32)


def segment_doc_ids(segment_ids: jax.Array | None, tokens: jax.Array) -> jax.Array:
  """Document ids `[batch, seg]` normalised so that the row's first token has id 0."""
  if segment_ids is None:
    return jnp.zeros(tokens.shape, jnp.int32)
  return (segment_ids - segment_ids[:, :1]).astype(jnp.int32)
