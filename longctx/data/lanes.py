"""Dynamic batching: documents of any length packed into fixed-shape lanes.

Each batch row is a *lane*: one document after another, cut into segments of
`seg_len` tokens. Documents are assigned to lanes statically, the j-th document
of the (epoch-concatenated) stream to lane `j % num_lanes`, so a lane never
migrates between data-parallel shards and a host (`lane_range`) only reads its
own lanes' documents when the source has random access.

A batch holds K = `segments_per_step` consecutive segments of every lane:

    tokens       int32   [K, lanes, seg_len]
    labels       int32   [K, lanes, seg_len]  next token of the lane stream
    loss_mask    float32 [K, lanes, seg_len]  the label's loss weight: its document's `loss_weight`
                                              (default `target_mask`), 0 across a document boundary
    segment_ids  int32   [K, lanes, seg_len]  document index inside the row (0 at the first token)
    reset        bool    [K, lanes]           the row's first token starts a document (or padding)

With `align > 1` every document is padded (pad tokens, loss 0, same document)
to a multiple of `align` tokens, so documents start on `align` boundaries of
the lane: block-recurrent models (`model.block_len`) then never see a document
start inside a block.

With `repeat=False` (evaluation) exhausted lanes are padded (loss 0) and the
iterator stops after the batch holding the last real token.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Iterator

import numpy as np

from longctx.data.document import Document
from longctx.data.sources import DocumentSource
from longctx.errors import DataError

PAD_DOC = -1  # lane position of a lane with no documents left


@dataclasses.dataclass
class _Lane:
  k: int = 0  # index of the current document among this lane's documents (global j = lane + k * num_lanes)
  offset: int = 0  # next token of that document


class _SequentialReader:
  """Reads a sequential source once, keeping documents of the wanted lanes until they are used."""

  def __init__(self, source: DocumentSource, *, num_lanes: int, lanes: range, repeat: bool):
    self.source, self.num_lanes, self.lanes, self.repeat = source, num_lanes, lanes, repeat
    self.pending: dict[int, Document] = {}
    self.next_j = 0
    self._epoch = 0
    self._it = iter(source.documents(0))
    self.exhausted = False

  def get(self, j: int) -> Document | None:
    while j not in self.pending:
      if j < self.next_j or self.exhausted:
        return None
      doc = self._next_doc()
      if doc is None:
        return None
      jj = self.next_j
      self.next_j += 1
      if jj % self.num_lanes in self.lanes:
        self.pending[jj] = doc
    return self.pending[j]

  def release(self, j: int) -> None:
    self.pending.pop(j, None)

  def _next_doc(self) -> Document | None:
    while True:
      try:
        return next(self._it)
      except StopIteration:
        if not self.repeat:
          self.exhausted = True
          return None
        self._epoch += 1
        self._it = iter(self.source.documents(self._epoch))

  def seek(self, j: int) -> None:
    """Restart and skip to global document `j` (used when restoring a saved position)."""
    self.pending.clear()
    self._epoch, self.next_j, self.exhausted = 0, 0, False
    self._it = iter(self.source.documents(0))
    while self.next_j < j:
      if self._next_doc() is None:
        return
      self.next_j += 1


class LaneBatcher:

  def __init__(self, source: DocumentSource, *, num_lanes: int, seg_len: int, segments_per_step: int,
               pad_id: int, lane_range: tuple[int, int] | None = None, repeat: bool = True, align: int = 1):
    if num_lanes < 1 or seg_len < 1 or segments_per_step < 1 or align < 1:
      raise DataError("num_lanes, seg_len, segments_per_step and align must be >= 1")
    if seg_len % align and align % seg_len:
      raise DataError(f"the document alignment {align} must divide seg_len={seg_len} or be a multiple of it")
    lo, hi = lane_range or (0, num_lanes)
    if not 0 <= lo < hi <= num_lanes:
      raise DataError(f"lane_range {lane_range} is not inside [0, {num_lanes})")
    self.source, self.num_lanes, self.seg_len, self.k_segments = source, num_lanes, seg_len, segments_per_step
    self.pad_id, self.repeat, self.lanes, self.align = pad_id, repeat, range(lo, hi), align
    self._state = [_Lane() for _ in self.lanes]
    self._cache: collections.OrderedDict[int, Document] = collections.OrderedDict()
    self._reader = None if source.random_access else _SequentialReader(
        source, num_lanes=num_lanes, lanes=self.lanes, repeat=repeat)

  # ------------------------------------------------------------------ documents of a lane

  def _doc(self, lane: int, k: int) -> Document | None:
    """The k-th document of `lane`, or None once the (non-repeating) stream is exhausted."""
    j = lane + k * self.num_lanes
    if self._reader is not None:
      return self._reader.get(j)
    n = self.source.num_docs
    epoch, i = divmod(j, n)
    if epoch > 0 and not self.repeat:
      return None
    if j not in self._cache:
      self._cache[j] = self.source.get(epoch, i)
      while len(self._cache) > 2 * len(self.lanes) + 4:
        self._cache.popitem(last=False)
    return self._cache[j]

  def _release(self, lane: int, k: int) -> None:
    j = lane + k * self.num_lanes
    if self._reader is not None:
      self._reader.release(j)
    else:
      self._cache.pop(j, None)

  # ------------------------------------------------------------------ one lane's tokens

  def _read(self, lane: int, pos: _Lane, n: int):
    """The next `n` tokens of a lane from `pos` (not consumed).

    Returns tokens, target weights, doc_key (k of the document; -1 for padding),
    starts (token opens a document or the padding), and the position after them.
    """
    tokens = np.full(n, self.pad_id, np.int32)
    target = np.zeros(n, np.float32)
    doc_key = np.full(n, PAD_DOC, np.int64)
    starts = np.zeros(n, bool)
    k, offset, filled = pos.k, pos.offset, 0
    while filled < n:
      doc = self._doc(lane, k)
      if doc is None:  # padding to the end of the request; it counts as a document of its own
        starts[filled] = True
        break
      real = len(doc["tokens"])
      length = -(-real // self.align) * self.align  # padded to whole alignment units
      take = min(n - filled, length - offset)
      stop = min(offset + take, real)
      if stop > offset:
        tokens[filled:filled + stop - offset] = doc["tokens"][offset:stop]
        weight = doc.get("loss_weight", doc["target_mask"])
        target[filled:filled + stop - offset] = weight[offset:stop]
      doc_key[filled:filled + take] = k
      if offset == 0:
        starts[filled] = True
      filled += take
      offset += take
      if offset == length:
        k, offset = k + 1, 0
    return tokens, target, doc_key, starts, _Lane(k, offset)

  def _segment(self, idx: int, lane: int):
    pos = self._state[idx]
    tokens, target, doc_key, starts, after = self._read(lane, pos, self.seg_len)
    nxt_tok, nxt_target, nxt_key, nxt_start, _ = self._read(lane, after, 1)
    labels = np.concatenate([tokens[1:], nxt_tok])
    label_key = np.concatenate([doc_key[1:], nxt_key])
    label_target = np.concatenate([target[1:], nxt_target])
    loss = ((label_key == doc_key) & (doc_key != PAD_DOC)) * label_target
    segment_ids = np.concatenate([[0], np.cumsum(starts[1:])]).astype(np.int32)
    reset = bool(starts[0])
    for k in range(pos.k, after.k):
      self._release(lane, k)
    self._state[idx] = after
    return tokens, labels, loss.astype(np.float32), segment_ids, reset

  # ------------------------------------------------------------------ batches

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.exhausted():
      raise StopIteration
    K, B, S = self.k_segments, len(self.lanes), self.seg_len
    out = {"tokens": np.empty((K, B, S), np.int32), "labels": np.empty((K, B, S), np.int32),
           "loss_mask": np.empty((K, B, S), np.float32), "segment_ids": np.empty((K, B, S), np.int32),
           "reset": np.empty((K, B), bool)}
    for s in range(K):
      for idx, lane in enumerate(self.lanes):
        tokens, labels, loss, seg_ids, reset = self._segment(idx, lane)
        out["tokens"][s, idx], out["labels"][s, idx], out["loss_mask"][s, idx] = tokens, labels, loss
        out["segment_ids"][s, idx], out["reset"][s, idx] = seg_ids, reset
    return out

  def documents_read(self) -> int:
    """How many documents of this batcher's lanes have had tokens in a batch so far (whole or in part)."""
    return sum(s.k + (s.offset > 0) for s in self._state)

  def exhausted(self) -> bool:
    """Every lane has run out of documents (only a non-repeating batcher can)."""
    return not self.repeat and all(self._doc(lane, s.k) is None for lane, s in zip(self.lanes, self._state))

  # ------------------------------------------------------------------ save / restore

  def state_dict(self) -> dict:
    return {"num_lanes": self.num_lanes, "lanes": [self.lanes.start, self.lanes.stop], "seg_len": self.seg_len,
            "positions": [[s.k, s.offset] for s in self._state]}

  def load_state_dict(self, d: dict) -> None:
    """Restore positions from a `state_dict()` whose lane range covers this batcher's lanes.

    A state of all lanes (what a multi-host checkpoint holds) restores any
    sub-range, so a run may resume on a different number of hosts.
    """
    try:
      lo, hi = (int(x) for x in d["lanes"])
      ok = (d["num_lanes"] == self.num_lanes and lo <= self.lanes.start and self.lanes.stop <= hi
            and len(d["positions"]) == hi - lo)
    except (KeyError, TypeError, ValueError):
      ok = False
    if not ok:
      raise DataError(f"saved data position is for a different lane layout ({d.get('num_lanes')} lanes, range "
                      f"{d.get('lanes')}); resume with the same data.batch_size and mesh, or use a new run dir")
    mine = d["positions"][self.lanes.start - lo:self.lanes.stop - lo]
    self._state = [_Lane(int(k), int(o)) for k, o in mine]
    self._cache.clear()
    if self._reader is not None:
      first = min(lane + s.k * self.num_lanes for lane, s in zip(self.lanes, self._state))
      self._reader.seek(first)
