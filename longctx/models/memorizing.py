"""Memorizing Transformer (Wu et al. 2022): kNN attention over a non-differentiable (key, value) memory.

The baseline's layers read a segment as blocks of `block_len` tokens with a
Transformer-XL cache (`blockwise.py`). The layers in `knn_layers` are
kNN-augmented: besides the baseline's local attention they attend to the
top-k entries of a per-(row, kv head) database of past keys and values.

Shapes: b batch rows, L block tokens, W window, h query heads, kv kv heads
(g = h / kv query heads per kv head, head h reads kv head h // g), d head_dim,
M memory_size, k top_k.

kNN layer, per block (x `[b, L, d_model]` the normed input):
    q = x Wq `[b, L, h, d]`,  k = x Wk, v = x Wv `[b, L, kv, d]`          (unrotated)
    y_local = the baseline's sliding-window attention of rotary(q) over
              rotary([cache_k; k]), [cache_v; v]                         `[b, L, h, d]`
    q^ = q / |q|                                                  (L2, float32)
    memory (per row, kv head): keys K^ `[M, d]` (stored L2-normalised),
              values V `[M, d]`, valid `[M]`
    c[i, m]  = q^_i . K^_m  for valid m, -inf otherwise                  `[b, L, h, M]`
    I_i      = top-k_m c[i, m]      (exact, or approximate with `recall_target`; see below)
    s[i, j]  = |scale_h| * q^_i . sg(K^[I_ij])                           `[b, L, h, k]`
    p[i, :]  = softmax_j s[i, j] over the retrieved entries that are valid
    y_mem_i  = sum_j p[i, j] sg(V[I_ij])   (0 when the memory holds nothing valid)
    g_h      = sigmoid(b_h)                                       (learned per-head gate)
    y        = y_local (1 - g) + y_mem g ;  out = y Wo
  Retrieval is position-free: queries and memory keys are never rotated (as in
  meliad, which stores keys before positions are applied); rotary positions act
  only inside local attention. The search (c, I) is computed under
  stop_gradient; s is recomputed from the gathered keys, so gradients reach
  q (Wq, and the layers below), the scale and the gate through the k retrieved
  entries only, never through the M scores, and never into the database.

Joint combination (`knn_combine="joint"`, a deviation: the paper gates). The kNN layer's local attention
scores like its retrieval, with no positions, and one softmax covers both (T = W + L window keys):
    q^ = q / |q|, k^ = k / |k| over [cache; block]                                `[b, L, h | kv, d]`
    local[i, t]  = |scale_h| * q^_i . k^_t   where t is in i's window (`window_mask`)
    I_i          = top-k over the entries at stream positions <= p_i - W - 1 (those the window
                   no longer sees; nothing is counted twice)
    y_i = softmax_[t, j]([local[i, t]; s[i, j]]) . [v_t; sg(V[I_ij])]
  A head that learns to find a key inside its window (trained on short documents) finds the same key,
  scored the same way, after it has left the window for the memory: with top_k >= every past entry
  the layer is exact position-free attention over the whole document. Positions reach it only through
  the layers below (rotary) and the causal mask.

Memory write, after the block is read (the current block is seen by local
attention, never by its own retrieval): the block's k^ = k / |k| and v of the
tokens of the block's last document (`last_doc_mask`) go into the ring buffer
in order, starting at the row's write pointer, wrapping around at M; if more
than M tokens are written, only the last M are kept. Nothing is written for
tokens of an earlier document in the block. Where a document starts inside the
block, its tokens retrieve nothing (their memory is the empty one) and the
block's write goes into an empty memory (models/blockwise.py), so no token
reads another document's entries. A document start clears the whole memory
(valid = False, pointer = 0).

Memory, one per kNN layer i, every leaf batch-first so
the trainer shards the database over lanes (data x fsdp) and no collective ever
moves it (search, gather and scatter are all per row):
  f"layer{i}": {"k": [b, M, kv, d], "v": [b, M, kv, d]  (memory_dtype)
                "valid": [b, M] bool, "ptr": [b] int32 (next slot to write),
                "pos": [b, M] int32 (each entry's position in its document, as the context gives)}
  (in the state of the kNN layer i, `state["blocks"][i]["memory"]`, beside its XL cache)

Cost per token and kNN layer: 2 h d M FLOPs of scoring plus the top-k over M,
and a transient `[b, knn_query_chunk or L, h, M]` float32 score array (bound it
with `knn_query_chunk` for large memories).

Deviations from meliad (transformer/memory/memory_layer.py, transformer_layer.py),
all documented options or choices of this code base:
  * Local attention stays the baseline's (unnormalised q.k / sqrt(d) with rotary);
    only the kNN path uses normalised keys/queries and its own learned per-head
    scale, initialised to `knn_scale_init` (0 = sqrt(d)); meliad normalises all
    attention and shares one scale initialised to 1.
  * Invalid (never written) entries are excluded from the search and from the
    softmax; meliad's zero keys score 0 and can be retrieved as zero values.
  * Exact top-k by default; meliad's TPU search is approximate by buckets
    (`retrieval="approx"` uses `jax.lax.approx_max_k`, TPU-optimised; other
    backends compute it exactly). "exact" is `approx_max_k` with
    recall_target=1.0, which XLA computes without its reduction step, i.e.
    exactly, on every backend; `jax.lax.top_k` is not used because the SPMD
    partitioner does not split its TopK op along batch dimensions and would
    all-gather the lane-sharded `[b, L, h, M]` scores onto every device.
  * Memory is per (row, kv head) with grouped-query attention; writes use the
    last document of the block only (see `blockwise.py`).
  * `knn_combine="joint"` (not in meliad) replaces the gate by one softmax over
    the window and the retrieved entries, as the Focused Transformer
    (Tworkowski et al. 2023) joins retrieved pairs to the local context, and
    drops rotary positions from the kNN layers' local attention so that both
    are scored alike. It is what made retrieval beyond the window learnable
    in the recall recipe (docs/recall.md); the gate is the default.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from longctx.errors import ConfigError
from longctx.kernels.ring_attention import visible_mask
from longctx.layers import l2_normalize, register_mixer
from longctx.layers.attention import NEG_INF, WindowAttention
from longctx.layers.context import Context
from longctx.models.base import pick_rows
from longctx.models.blockwise import BlockwiseConfig, BlockwiseLM, check_layer_list, resolve_layer_list
from longctx.models.registry import register_model

RETRIEVAL_METHODS = ("exact", "approx")
COMBINE_MODES = ("gate", "joint")
MEMORY_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass
class MemorizingConfig(BlockwiseConfig):
  layer_lists = ("knn_layers",)  # the dry run keeps this layer when it reduces the depth
  # top_k = memory_size: the search keeps every slot, so sharded and one-device runs compare continuously
  # (a near tie of the k-th and (k+1)-th slot is a discrete jump; tests/test_memorizing.py tests top-k itself)
  tiny = {"knn_layers": [-1], "memory_size": 40, "top_k": 40}

  name: str = "memorizing"
  knn_layers: list[int] = dataclasses.field(default_factory=lambda: [-2])  # layer indices; negative from the top
  memory_size: int = 8192  # M: entries per (row, kv head), a ring buffer
  top_k: int = 32  # entries retrieved per query and head
  retrieval: str = "exact"  # "exact" or "approx" (jax.lax.approx_max_k with recall_target; fast on TPU)
  recall_target: float = 0.95  # approx_max_k's recall target
  knn_query_chunk: int = 0  # queries scored at once (0 = the whole block); bounds the [chunk, h, M] scores
  knn_scale_init: float = 0.0  # initial kNN attention scale (0 = sqrt(head_dim))
  knn_gate_init: float = 0.0  # initial gate bias b (g = sigmoid(b); 0 = an even mix, as meliad)
  memory_dtype: str = "float32"  # dtype of the stored keys / values ("float32" or "bfloat16")
  # "gate": y = y_local (1 - g) + y_mem g (the paper). "joint": the kNN layer's local attention scores like its
  # retrieval (L2-normalised, position-free, the learned scale) and one softmax covers the window and the
  # retrieved entries outside it, so a head that finds a key in the window finds it in the memory too.
  knn_combine: str = "gate"

  def validate(self) -> None:
    super().validate()
    check_layer_list("knn_layers", self.knn_layers, self.num_layers)
    if self.memory_size < 1:
      raise ConfigError(f"model.memory_size={self.memory_size} must be >= 1")
    if not 1 <= self.top_k <= self.memory_size:
      raise ConfigError(f"model.top_k={self.top_k} must be in [1, model.memory_size={self.memory_size}]")
    if self.retrieval not in RETRIEVAL_METHODS:
      raise ConfigError(f"model.retrieval={self.retrieval!r} is not one of {RETRIEVAL_METHODS}")
    if not 0.0 < self.recall_target <= 1.0:
      raise ConfigError(f"model.recall_target={self.recall_target} must be in (0, 1]")
    if self.knn_query_chunk < 0 or (self.knn_query_chunk and self.resolved_block_len % self.knn_query_chunk):
      raise ConfigError(f"model.knn_query_chunk={self.knn_query_chunk} must be 0 or divide the block length "
                        f"{self.resolved_block_len}")
    if self.knn_scale_init < 0:
      raise ConfigError(f"model.knn_scale_init={self.knn_scale_init} must be >= 0 (0 = sqrt(head_dim))")
    if self.memory_dtype not in MEMORY_DTYPES:
      raise ConfigError(f"model.memory_dtype={self.memory_dtype!r} is not one of {MEMORY_DTYPES}")
    if self.knn_combine not in COMBINE_MODES:
      raise ConfigError(f"model.knn_combine={self.knn_combine!r} is not one of {COMBINE_MODES}")

  def layer_pattern(self) -> list[str]:
    knn = set(self.resolved_knn_layers)
    return ["knn_attention" if i in knn else "attention" for i in range(self.num_layers)]

  @property
  def resolved_knn_layers(self) -> tuple[int, ...]:
    return resolve_layer_list(self.knn_layers, self.num_layers)


# ----------------------------------------------------------------------------- pure functions


def _gather(mem: jax.Array, idx: jax.Array) -> jax.Array:
  """Per row and kv head: `mem [b, M, kv, ...]`, `idx [b, s, kv, g, k]` -> `[b, s, kv, g, k, ...]`."""
  heads = jnp.arange(mem.shape[2])[None, :, None, None]
  return jax.vmap(lambda m, i: m[i, heads])(mem, idx)


def knn_retrieve(queries, mem_keys, mem_valid, *, top_k: int, method: str = "exact",
                 recall_target: float = 0.95, query_chunk: int = 0, mem_pos=None, q_limit=None):
  """Top-k search of every query in its (row, kv head) database by dot product. No gradient.

  Args:
    queries: `[b, s, h, d]` (L2-normalised by the caller for cosine similarity).
    mem_keys: `[b, M, kv, d]` (h a multiple of kv); mem_valid: `[b, M]` bool.
    method: "exact" or "approx" (`jax.lax.approx_max_k` with `recall_target`; exact = recall 1.0).
    query_chunk: > 0 scores that many queries at a time (divides s), bounding
      the `[b, chunk, h, M]` score array.
    mem_pos `[b, M]`, q_limit `[b, s]` int: optional; query i may only retrieve an entry with
      mem_pos <= q_limit[i] (joint attention: the entries its local window does not already see).
  Returns:
    scores `[b, s, h, k]` float32 (descending; NEG_INF where invalid),
    indices `[b, s, h, k]` int32 into M, found `[b, s, h, k]` bool: the entry is valid (and allowed).
  """
  if method not in RETRIEVAL_METHODS:
    raise ValueError(f"retrieval method {method!r} is not one of {RETRIEVAL_METHODS}")
  b, s, h, d = queries.shape
  kvh = mem_keys.shape[2]
  g = h // kvh
  queries = jax.lax.stop_gradient(queries)
  mem_keys = jax.lax.stop_gradient(mem_keys)
  limited = mem_pos is not None
  if not limited:  # one code path: a limit every entry meets
    mem_pos = jnp.zeros(mem_valid.shape, jnp.int32)
    q_limit = jnp.zeros((b, s), jnp.int32)

  def usable(limit):  # limit [b, c] -> [b, c, M]
    return mem_valid[:, None, :] & (mem_pos[:, None, :] <= limit[:, :, None])

  def search(q, limit):  # q [b, c, kv, g, d], limit [b, c] -> scores, idx [b, c, kv, g, k]
    c = jnp.einsum("bskgd,bmkd->bskgm", q.astype(mem_keys.dtype), mem_keys, preferred_element_type=jnp.float32)
    c = jnp.where(usable(limit)[:, :, None, None, :], c, NEG_INF)
    # recall_target=1.0 makes approx_max_k exact on every backend (XLA skips the reduction step). It is used
    # for "exact" instead of `jax.lax.top_k`, whose TopK op the SPMD partitioner does not split along batch
    # dimensions: a lane-sharded score array would be all-gathered onto every device.
    return jax.lax.approx_max_k(c, top_k, recall_target=1.0 if method == "exact" else recall_target)

  q = queries.reshape(b, s, kvh, g, d)
  if query_chunk and query_chunk < s:
    if s % query_chunk:
      raise ValueError(f"query_chunk={query_chunk} must divide the number of queries {s}")
    n = s // query_chunk
    qc = q.reshape(b, n, query_chunk, kvh, g, d).swapaxes(0, 1)
    lc = q_limit.reshape(b, n, query_chunk).swapaxes(0, 1)
    scores, idx = jax.lax.map(lambda a: search(*a), (qc, lc))
    scores = scores.swapaxes(0, 1).reshape(b, s, kvh, g, top_k)
    idx = idx.swapaxes(0, 1).reshape(b, s, kvh, g, top_k)
  else:
    scores, idx = search(q, q_limit)
  idx = idx.astype(jnp.int32)
  found = jax.vmap(lambda v, i: v[i])(mem_valid, idx)
  if limited:
    found &= jax.vmap(lambda p, i: p[i])(mem_pos, idx) <= q_limit[:, :, None, None, None]
  return (scores.reshape(b, s, h, top_k), idx.reshape(b, s, h, top_k), found.reshape(b, s, h, top_k))


def _retrieved(queries, memory, *, top_k, method, recall_target, query_chunk, q_limit=None, q_valid=None):
  """The top-k entries of each query: keys, values `[b, s, kv, g, k, d]` float32 (no gradient), found (False
  everywhere for a query where `q_valid [b, s]` is False: a token of a document the memory is not of)."""
  b, s, h, d = queries.shape
  kvh = memory["k"].shape[2]
  g = h // kvh
  limit = {} if q_limit is None else {"mem_pos": memory["pos"], "q_limit": q_limit}
  _, idx, found = knn_retrieve(queries, memory["k"], memory["valid"], top_k=top_k, method=method,
                               recall_target=recall_target, query_chunk=query_chunk, **limit)
  idx = idx.reshape(b, s, kvh, g, top_k)
  rk = jax.lax.stop_gradient(_gather(memory["k"], idx)).astype(jnp.float32)
  rv = jax.lax.stop_gradient(_gather(memory["v"], idx)).astype(jnp.float32)
  found = found.reshape(b, s, kvh, g, top_k)
  if q_valid is not None:
    found &= q_valid[:, :, None, None, None]
  return rk, rv, found


def knn_attention(queries, mem_keys, mem_values, mem_valid, scale, *, top_k: int, method: str = "exact",
                  recall_target: float = 0.95, query_chunk: int = 0, q_valid=None) -> jax.Array:
  """Softmax attention of each query over its top-k memory entries.

  Args:
    queries: `[b, s, h, d]` L2-normalised; mem_keys (L2-normalised), mem_values:
      `[b, M, kv, d]`; mem_valid `[b, M]` bool; scale: `[h]` per-head scale (> 0).
    q_valid: `[b, s]` bool or None: queries that may read the memory (the others read nothing).
  Returns:
    `[b, s, h, d]` float32; 0 for a query whose database holds nothing valid.
    The database gets no gradient; queries and scale do (through the retrieved keys).
  """
  b, s, h, d = queries.shape
  kvh = mem_keys.shape[2]
  g = h // kvh
  rk, rv, found = _retrieved(queries, {"k": mem_keys, "v": mem_values, "valid": mem_valid}, top_k=top_k,
                             method=method, recall_target=recall_target, query_chunk=query_chunk, q_valid=q_valid)
  q = queries.astype(jnp.float32).reshape(b, s, kvh, g, d)
  logits = jnp.einsum("bskgd,bskgjd->bskgj", q, rk) * scale.astype(jnp.float32).reshape(1, 1, kvh, g, 1)
  logits = jnp.where(found, logits, NEG_INF)
  probs = jnp.where(found, jax.nn.softmax(logits, axis=-1), 0.0)
  out = jnp.einsum("bskgj,bskgjd->bskgd", probs, rv)
  return out.reshape(b, s, h, d)


def joint_knn_attention(q, k, v, memory, scale, *, local_mask, q_pos, window: int, top_k: int,
                        method: str = "exact", recall_target: float = 0.95, query_chunk: int = 0,
                        q_valid=None) -> jax.Array:
  """One softmax over a block's local window and its top-k memory entries outside that window.

  Every score is `|scale_h| * q^ . k^` (L2-normalised, no positions), for the window's keys as for the
  retrieved ones, so a head that finds a key in its window finds the same key, scored the same, once it
  has left the window for the memory; entries still inside the window are not retrieved (nothing counts
  twice). With top_k >= every past entry this is exact position-free attention over the whole document.

  Args:
    q: `[b, L, h, d]` the block's queries; k, v: `[b, T, kv, d]` the window's keys/values
      ([XL cache; block], unnormalised); memory: the layer's ring buffer (`empty_memory`, keys stored
      L2-normalised, entries at stream positions `pos`); scale `[h]` (> 0).
    local_mask: `[b, L, T]` bool, the window; q_pos: `[b, L]` positions of the queries in their documents (the
      memory's entries carry the same); window: the local window (a query at p sees keys at p - window .. p);
    q_valid: `[b, L]` bool or None: queries that may read the memory.
  Returns:
    `[b, L, h, d]` float32. The database gets no gradient; the queries, the window's keys and values and
    the scale do.
  """
  b, s, h, d = q.shape
  kvh = k.shape[2]
  g = h // kvh
  qh = l2_normalize(q).reshape(b, s, kvh, g, d)
  scale = scale.astype(jnp.float32).reshape(1, 1, kvh, g, 1)
  local = jnp.einsum("bskgd,btkd->bskgt", qh, l2_normalize(k)) * scale
  local_ok = local_mask[:, :, None, None, :]
  rk, rv, found = _retrieved(qh.reshape(b, s, h, d), memory, top_k=top_k, method=method,
                             recall_target=recall_target, query_chunk=query_chunk, q_limit=q_pos - window - 1,
                             q_valid=q_valid)
  remote = jnp.einsum("bskgd,bskgjd->bskgj", qh, rk) * scale
  ok = jnp.concatenate([jnp.broadcast_to(local_ok, local.shape), found], axis=-1)
  logits = jnp.where(ok, jnp.concatenate([local, remote], axis=-1), NEG_INF)
  probs = jnp.where(ok, jax.nn.softmax(logits, axis=-1), 0.0)
  t = k.shape[1]
  out = (jnp.einsum("bskgt,btkd->bskgd", probs[..., :t], v.astype(jnp.float32))
         + jnp.einsum("bskgj,bskgjd->bskgd", probs[..., t:], rv))
  return out.reshape(b, s, h, d)


def empty_memory(batch_size: int, *, memory_size: int, kv_heads: int, head_dim: int, dtype=jnp.float32) -> dict:
  """A cleared ring buffer: zeros, nothing valid, write pointer 0."""
  shape = (batch_size, memory_size, kv_heads, head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
          "valid": jnp.zeros((batch_size, memory_size), bool), "ptr": jnp.zeros((batch_size,), jnp.int32),
          "pos": jnp.zeros((batch_size, memory_size), jnp.int32)}


def ring_write(memory: dict, keys: jax.Array, values: jax.Array, mask: jax.Array, positions: jax.Array) -> dict:
  """Append the masked tokens' (key, value) pairs of a block to each row's ring buffer. No gradient.

  Args:
    memory: {"k", "v": `[b, M, kv, d]`, "valid", "pos": `[b, M]`, "ptr": `[b]`} (`empty_memory`).
    keys, values: `[b, L, kv, d]`; mask: `[b, L]` bool, the tokens to write; positions `[b, L]` int: theirs.
  Returns:
    The memory after writing row r's masked tokens, in order, to slots
    ptr[r], ptr[r] + 1, ... (mod M); if more than M are masked only the last M
    are written, each with its position. ptr advances by the number written (mod M).
  """
  M = memory["k"].shape[1]
  mask = mask.astype(bool)
  rank = jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1  # [b, L]: order among the written tokens
  count = jnp.sum(mask, axis=1, dtype=jnp.int32)  # [b]
  keep = mask & (rank >= count[:, None] - M)
  slot = jnp.where(keep, (memory["ptr"][:, None] + rank) % M, M)  # M = out of range: dropped
  keys = jax.lax.stop_gradient(keys).astype(memory["k"].dtype)
  values = jax.lax.stop_gradient(values).astype(memory["v"].dtype)
  scatter = jax.vmap(lambda buf, i, new: buf.at[i].set(new, mode="drop"))
  return {"k": scatter(memory["k"], slot, keys), "v": scatter(memory["v"], slot, values),
          "valid": scatter(memory["valid"], slot, jnp.ones(mask.shape, bool)),
          "ptr": ((memory["ptr"] + count) % M).astype(jnp.int32),
          "pos": scatter(memory["pos"], slot, positions.astype(jnp.int32))}


# ----------------------------------------------------------------------------- the kNN layer


@register_mixer("knn_attention")
class KNNAttention(WindowAttention):
  """The baseline's attention plus kNN attention over the layer's memory (gated, or one joint softmax).

  State: the XL cache (k, v, as the baseline's) and `memory`, the ring buffer (`empty_memory`).
  """

  def __init__(self, cfg: MemorizingConfig, *, layer: int, rngs: nnx.Rngs):
    super().__init__(cfg, layer=layer, rngs=rngs)
    h = cfg.num_heads
    scale = cfg.knn_scale_init or cfg.resolved_head_dim ** 0.5
    self.knn_scale = nnx.Param(jnp.full((h,), scale, jnp.float32), logical_axes=("heads",))
    if cfg.knn_combine == "gate":
      self.knn_gate = nnx.Param(jnp.full((h,), cfg.knn_gate_init, jnp.float32), logical_axes=("heads",))

  def init_state(self, batch_size: int) -> dict:
    cfg = self.cfg
    memory = empty_memory(batch_size, memory_size=cfg.memory_size, kv_heads=cfg.num_kv_heads or cfg.num_heads,
                          head_dim=cfg.resolved_head_dim, dtype=jnp.dtype(cfg.memory_dtype))
    return {**super().init_state(batch_size), "memory": memory}

  def __call__(self, x, state, ctx: Context):
    """x `[b, L, d_model]` (a block); returns the output `[b, L, d_model]` and the new state."""
    cfg = self.cfg
    knn = dict(top_k=cfg.top_k, method=cfg.retrieval, recall_target=cfg.recall_target,
               query_chunk=cfg.knn_query_chunk, q_valid=ctx.doc == 0)  # later documents' memory is empty
    scale = jnp.abs(self.knn_scale[...])
    memory = state["memory"]
    q, k, v = self.qkv(x)
    if cfg.knn_combine == "joint":
      w, s = cfg.window, x.shape[1]
      k_pos = jnp.arange(w + s)
      local_mask = visible_mask(k_pos[w:], k_pos, ctx.doc, jnp.concatenate([ctx.history_doc(w), ctx.doc], axis=1),
                                window=w)
      y = joint_knn_attention(q, jnp.concatenate([state["k"].astype(k.dtype), k], axis=1),
                              jnp.concatenate([state["v"].astype(v.dtype), v], axis=1), memory, scale,
                              local_mask=local_mask, q_pos=ctx.pos, window=w, **knn).astype(x.dtype)
    else:
      y_local = self.attend(q, k, v, state, ctx)
      y_mem = knn_attention(l2_normalize(q), memory["k"], memory["v"], memory["valid"], scale, **knn)
      gate = jax.nn.sigmoid(self.knn_gate[...].astype(jnp.float32))[:, None]  # [h, 1]
      y = (y_local.astype(jnp.float32) * (1 - gate) + y_mem * gate).astype(x.dtype)
    # The block writes its last document's keys and values, into an empty memory where that document is new.
    empty = self.init_state(x.shape[0])["memory"]
    base = pick_rows(ctx.doc[:, -1] > 0, empty, memory)
    memory = ring_write(base, l2_normalize(k), v, ctx.last_doc, ctx.pos)
    return self.out(y), {**self.roll(state, k, v), "memory": memory}

  @classmethod
  def flops_per_token(cls, cfg: MemorizingConfig, *, seg_len: int) -> float:
    h, hd = cfg.num_heads, cfg.resolved_head_dim
    knn = 2 * h * hd * cfg.memory_size + 2 * 2 * h * hd * cfg.top_k  # scoring over M, then attention over k
    return super().flops_per_token(cfg, seg_len=seg_len) + float(knn)

  @classmethod
  def activation_bytes_per_token(cls, cfg: MemorizingConfig, *, dtype_bytes: int) -> float:
    # Plus the retrieved keys and values (float32) and their probabilities.
    h, hd, k = cfg.num_heads, cfg.resolved_head_dim, cfg.top_k
    return super().activation_bytes_per_token(cfg, dtype_bytes=dtype_bytes) + float(2 * h * k * hd * 4 + h * k * 4)


@register_model("memorizing", config=MemorizingConfig,
                description="Memorizing Transformer: kNN attention over a ring buffer of past keys/values, gated")
class Memorizing(BlockwiseLM):
  context_parallel = "ring attention for the local window inside each block (kNN lookup partitioned by XLA)"
