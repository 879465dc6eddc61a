"""Titans (Behrouz et al. 2025): a neural long-term memory that learns at test time.

Neural memory (one per layer, `memory_heads` heads of dim dm = d_model / memory_heads). The memory
is an MLP M (depth D >= 2, hidden width `memory_hidden`, SiLU, no bias) whose *weights* are the state:

    q_t, k_t, v_t = SiLU(x_t W_q), SiLU(x_t W_k), SiLU(x_t W_v);  q_t, k_t L2-normalised (paper sec. 4.4)
    eta_t, theta_t, alpha_t = sigmoid(x_t W_g + b_g)  (theta_t further times memory_lr / memory_hidden)
    loss      l(M; x_t) = ||M(k_t) - v_t||^2
    surprise  S_t = eta_t S_{t-1} - theta_t grad l(M_{t-1}; x_t)
    forget    M_t = (1 - alpha_t) M_{t-1} + S_t
    retrieve  y_t = M*(q_t)   (a forward pass, no update); the heads' retrievals are combined by a
              projection W_o [H, dm, d_model] (as lucidrains' combine_heads)

Chunked update (paper sec. 3.2). Tokens are grouped in chunks of C = `chunk_size`, counted from
the start of each document. The gradients of a chunk's tokens are all taken at the weights M_0
(and momentum S_0) of the chunk start; then momentum and decay are a linear recurrence over the
chunk's tokens, whose end is, with P_t = prod_{j<=t} eta_j and E_t = prod_{t<j<=C} (1 - alpha_j):

    S_C = P_C S_0 - sum_i theta_i (P_C / P_i) g_i
    M_C = E_0 M_0 + (sum_t E_t P_t) S_0 - sum_i theta_i (sum_{t>=i} E_t P_t / P_i) g_i,   g_i = grad l(M_0; x_i)

Both sums are one backward pass each (`jax.vjp` of the per-token losses with those weights as
cotangents); products are exponentials of differences of cumulative log-gates, all <= 0. The inner
gradients are ordinary JAX ops, so the outer loss differentiates through them (second order) into
the projections, the gate maps and the initial weights (tested against the token loop). A token
reads the weights at the start of its chunk: y_t = M_{chunk start}*(q_t). With C = 1 this is the
sequential recurrence with y_t = M_{t-1}*(q_t) (tested). The paper leaves open whether token t
reads M_{t-1} or M_t; reading the weights before the token's own write is what MAC's
h_t = M*_{t-1}(q_t) does, and it is what chunking needs: a token never reads writes of tokens
after it in its chunk.

Streaming. The state carries, per layer, the weights M and momentum S at the last chunk boundary of
the open document plus the open chunk's inputs (k, v and gate logits of the last C tokens, of which
the last `offset` belong to the open chunk). A segment is read in steps of C slots; in each step the
open chunk completes at slot C - offset (if the document goes on that far): the buffered tokens and
the step's first C - offset tokens are folded into M, S; tokens before that read the old weights,
tokens after it the new ones, and tokens of a document that starts inside the step read the learned
initial weights (a new document starts from fresh memory, its chunks counted from its start). So a
document gives the same logits however it is cut: one segment, segments of any length, or token by
token, and wherever it starts in its lane (tested). The extra reads run under `lax.cond` only when
some lane needs them: a segment of whole chunks at offset 0 with documents starting at chunk
boundaries (training with `data.align_documents` = chunk_size, or documents that fill segments)
takes the fast path of one read and one fold per chunk; token-by-token decoding folds every C-th
token.

Variants (each layer: pre-RMSNorm, then the token mixer below, then the baseline's gated MLP):
  MAG (memory as gate): sliding-window attention over [persistent; XL cache; segment] (the baseline's
      window and cache) and the neural memory over the layer input x, combined as
      o = Attn(x) * sigmoid(N(M*(q) W_o)), N an RMSNorm with a learned scale ("normalised with learnable
      vector-valued weights, then a non-linearity"); the attention branch keeps its residual scale
      (Wo initialised small) instead of being normalised too.
  MAC (memory as context): the MAC segment is the memory chunk (the paper updates the memory once
      per segment). Per token t of a segment: h_t = M*_{segment start}(q_t) W_o, q_t from x_t; attention
      over [persistent; h_j, x_j for j <= t in the segment]; M is written with k, v from the
      attention output y (RMS-normalised); o_t = y_t * sigmoid(N(M*(q'_t) W_o)), q' from y_t, read at the
      segment start too. No attention across segments (`window` is unused): the memory is the only way back.
  MAL (memory as layer) is not implemented.

Context parallelism (mesh `sequence` axis n > 1 dividing the segment): MAG's sliding-window attention
runs the ring over the segment's shards with the XL cache and the persistent prefix as local blocks
(`window_prefix_ring_attention`). The neural memory has no such form: each chunk's gradients are taken
at the weights the previous chunk left, a non-linear recurrence, so its scan over chunks runs on
inputs XLA gathers along `sequence`. MAC's attention spans one chunk inside that scan; it has no
context-parallel form either.

Deviations from the paper, and why:
  * MAC: the paper puts the whole segment's retrieval h in front of the segment; in a causal LM
    h_j (a read with x_j's query) would leak x_j to tokens before j, so token t sees h_j for j <= t
    only. The paper's final read M*_t(y_t) uses the memory after the segment's own update, which
    would leak later tokens of the segment; we read at the segment start. With these two changes MAC
    is causal and decodes token by token like MAG.
  * Persistent memory is a learned (key, value) prefix per layer, visible to every token and
    position-free (the all-attention memory the paper cites), not tokens prepended to the input:
    prepended tokens would be written into the neural memory at every document start.
  * The short depthwise conv after the q, k, v projections is left out; `embed_conv` (a causal
    conv over token embeddings, as in the other models) gives the first layer the same local view.
  * theta_t is scaled by memory_lr / memory_hidden: ||grad|| of the squared loss grows with the hidden
    width, and a step of theta ~ 1 would overshoot (||h||^2 ~ hidden); the outer training tunes the
    gates from there. The gates are per token and per head, as in the paper (lucidrains/titans-pytorch
    shares them across a chunk, averaged).
  * `memory_grad_clip` > 0 caps the norm of each chunk's two gradient sums (into S and into M) per lane
    and head, as lucidrains' `max_grad_norm` caps per-token gradients. On by default (1.0); 0 is the
    paper's unclipped update, which diverges: in a recall run within 15 outer steps (memory weights
    ~5e3 after one 256-token segment, then NaN), and even at initialisation on random tokens (the
    tests' 2-layer MAC model: max |W| 39 after one 16-token segment, 1.5e13 after the second, NaN
    after the third), a positive feedback of the MLP's curvature growing with its weights. With
    decay, a bounded update keeps the weights bounded (tested).

State (every leaf batch-first, float32 unless said; L layers, H memory heads, dm memory head dim):
  weights: list of D arrays [batch, L, H, in_j, out_j]   memory weights at the last chunk boundary
  momentum: list of D arrays, same shapes                 the surprise S at that boundary
  mem_k, mem_v: [batch, L, C, H, dm]; mem_z: [batch, L, C, H, 3]   k, v, gate logits of the last C tokens
  offset: [batch] int32                                  tokens of the open chunk (the last ones buffered)
  MAG: k, v [batch, L, window, kv_heads, head_dim], valid [batch, window]   the XL cache
  MAC: h_k, h_v, x_k, x_v [batch, L, C, kv_heads, head_dim]   attention keys/values of the last C tokens
  prev_tokens, prev_valid: [batch, K-1]  token history (only with embed_conv > 1)
The learned initial weights are parameters; `init_state` holds zeros and `__call__` writes the
initial weights into the rows where `reset` is set.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jax.sharding import PartitionSpec as P

from longctx import sharding as shd
from longctx.errors import ConfigError
from longctx.kernels import ring_attention as ra
from longctx.layers import GatedMLP, RMSNorm, l2_normalize, param, rotary, window_mask, window_ring_attention
from longctx.layers.attention import NEG_INF
from longctx.models.base import SegmentLM, reset_rows
from longctx.models.registry import register_model
from longctx.models.transformer import (
    Attention, Embedding, TransformerConfig, roll_cache, roll_cache_valid, segment_doc_ids)

VARIANTS = ("mag", "mac")
GATE_BIAS = (1.0, 0.0, -4.0)  # initial eta ~ 0.73, theta ~ 0.5 x lr / hidden, alpha ~ 0.018


@dataclasses.dataclass
class TitansConfig(TransformerConfig):
  name: str = "titans"
  variant: str = "mag"  # "mag" (memory as gate) or "mac" (memory as context)
  memory_depth: int = 2  # layers of the memory MLP (>= 2)
  memory_heads: int = 1  # independent memories per layer, each of dim d_model / memory_heads
  memory_hidden: int = 0  # hidden width of the memory MLP (0 = 2 x the memory head dim)
  chunk_size: int = 16  # tokens per memory update (MAC: also the attention segment)
  num_persistent: int = 4  # learned (key, value) pairs every token attends to
  memory_lr: float = 1.0  # theta_t = memory_lr * sigmoid(.) / memory_hidden
  memory_grad_clip: float = 1.0  # > 0: cap the norm of each chunk's inner update (0 = off, the paper; diverges)

  def validate(self) -> None:
    super().validate()
    if self.variant not in VARIANTS:
      raise ConfigError(f"model.variant={self.variant!r} is not one of {VARIANTS}")
    if self.memory_depth < 2:
      raise ConfigError(f"model.memory_depth={self.memory_depth} must be >= 2 (a deep memory, as in the paper)")
    if self.memory_heads < 1 or self.d_model % self.memory_heads:
      raise ConfigError(f"model.memory_heads={self.memory_heads} must be >= 1 and divide model.d_model={self.d_model}")
    if self.memory_hidden < 0:
      raise ConfigError(f"model.memory_hidden={self.memory_hidden} must be >= 0 (0 = 2 x memory head dim)")
    if self.chunk_size < 1:
      raise ConfigError(f"model.chunk_size={self.chunk_size} must be >= 1")
    if self.num_persistent < 0:
      raise ConfigError(f"model.num_persistent={self.num_persistent} must be >= 0")
    if self.memory_grad_clip < 0:
      raise ConfigError(f"model.memory_grad_clip={self.memory_grad_clip} must be >= 0 (0 = off)")
    if not self.memory_lr > 0:
      raise ConfigError(f"model.memory_lr={self.memory_lr} must be > 0")

  @property
  def memory_dim(self) -> int:
    return self.d_model // self.memory_heads

  @property
  def resolved_memory_hidden(self) -> int:
    return self.memory_hidden or 2 * self.memory_dim

  @property
  def memory_shapes(self) -> list[tuple[int, int]]:
    """(in, out) of each memory layer."""
    dims = [self.memory_dim] + [self.resolved_memory_hidden] * (self.memory_depth - 1) + [self.memory_dim]
    return list(zip(dims[:-1], dims[1:]))

  @property
  def theta_scale(self) -> float:
    return self.memory_lr / self.resolved_memory_hidden


# ----------------------------------------------------------------------------- the memory's math


def memory_mlp(ws, x):
  """M(x): `x [..., dm]` through weights `ws = (W_1 [dm, hidden], ..., W_D [hidden, dm])`."""
  for w in ws[:-1]:
    x = jax.nn.silu(x @ w)
  return x @ ws[-1]


def read_memory(ws, x):
  """Per-lane retrieval: ws each `[batch, H, in, out]`, x `[batch, n, H, dm]` -> `[batch, n, H, dm]`."""
  return jax.vmap(jax.vmap(memory_mlp, in_axes=(0, 1), out_axes=1))(ws, x)


def read_shared(ws, x):
  """Retrieval from weights shared by every lane (the initial weights `[H, in, out]`)."""
  return jax.vmap(jax.vmap(memory_mlp, in_axes=(0, 1), out_axes=1), in_axes=(None, 0))(ws, x)


def chunk_update(ws, ss, k, v, z, *, theta_scale: float, grad_clip: float = 0.0):
  """One chunk of one lane and head: weights and momentum at the chunk start -> at its end.

  Args:
    ws, ss: tuples of `[in, out]` (M_0 and S_0).
    k, v: `[C, dm]`; z: `[C, 3]` gate logits (eta, theta, alpha).
    grad_clip: if > 0, each of the chunk's two weighted gradient sums (into S and into M) is scaled
      down to at most this global norm (module docstring, "Deviations").
  Returns:
    (M_C, S_C), every gradient taken at M_0 (module docstring).
  """
  log_eta = jax.nn.log_sigmoid(z[:, 0])
  theta = theta_scale * jax.nn.sigmoid(z[:, 1])
  log_keep = jax.nn.log_sigmoid(-z[:, 2])  # log(1 - alpha)
  lp = jnp.cumsum(log_eta)  # log P_t
  la = jnp.cumsum(log_keep)  # log prod_{j<=t} (1 - alpha_j); log E_t = la[-1] - la[t]
  t_ge_i = jnp.arange(k.shape[0])[:, None] >= jnp.arange(k.shape[0])[None, :]
  expo = jnp.where(t_ge_i, (la[-1] - la + lp)[:, None] - lp[None, :], -jnp.inf)  # [t, i]
  coef_s = theta * jnp.exp(lp[-1] - lp)
  coef_m = theta * jnp.sum(jnp.exp(expo), axis=0)
  losses = lambda w: jnp.sum((memory_mlp(w, k) - v) ** 2, axis=-1)
  _, vjp = jax.vjp(losses, tuple(ws))
  g_s, = vjp(coef_s)
  g_m, = vjp(coef_m)
  if grad_clip > 0:
    g_s, g_m = clip_by_global_norm(g_s, grad_clip), clip_by_global_norm(g_m, grad_clip)
  carry_s = jnp.sum(jnp.exp(la[-1] - la + lp))
  new_s = tuple(jnp.exp(lp[-1]) * s - g for s, g in zip(ss, g_s))
  new_w = tuple(jnp.exp(la[-1]) * w + carry_s * s - g for w, s, g in zip(ws, ss, g_m))
  return new_w, new_s


def clip_by_global_norm(grads: tuple, max_norm: float) -> tuple:
  """Scale a tuple of arrays so their joint L2 norm is at most `max_norm` (safe at zero)."""
  norm = jnp.sqrt(sum(jnp.sum(g * g) for g in grads) + 1e-12)
  scale = jnp.minimum(1.0, max_norm / norm)
  return tuple(g * scale for g in grads)


def chunk_update_batched(ws, ss, k, v, z, *, theta_scale: float, grad_clip: float = 0.0):
  """`chunk_update` over lanes and heads: ws, ss `[batch, H, in, out]`; k, v `[batch, C, H, dm]`;
  z `[batch, C, H, 3]`."""
  fn = lambda w, s, k, v, z: chunk_update(w, s, k, v, z, theta_scale=theta_scale, grad_clip=grad_clip)
  return jax.vmap(jax.vmap(fn, in_axes=(0, 0, 1, 1, 1)))(ws, ss, k, v, z)


def _rows(mask, x):
  """Broadcast a per-row mask `[batch]` or per-token mask `[batch, n]` against x."""
  return mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim))


def _pick(mask, a, b):
  return jax.tree.map(lambda x, y: jnp.where(_rows(mask, x), x, y), a, b)


def _take(x, idx):
  """Per-lane gather along axis 1: x `[batch, n, ...]`, idx `[batch, C]` -> `[batch, C, ...]`."""
  return jax.vmap(lambda a, i: a[i])(x, idx)


def step_plan(m, starts, valid):
  """What one step of C slots reads and writes (module docstring, "Streaming").

  Args:
    m: `[batch]` tokens of the open chunk already buffered.
    starts: `[batch, C]` a document starts at this token; valid `[batch, C]` (a prefix of the slots).
  Returns a dict of:
    restart `[batch]`: the step's first token starts a document (the carry is replaced by fresh memory);
    m `[batch]`: the buffered count after that; fold `[batch]`: the open chunk completes in this step;
    after `[batch, C]`: tokens that read the weights after the fold; fresh `[batch, C]`: tokens of a
    document started inside the step (they read the initial weights); doc `[batch, C]`: documents
    started inside the step before each token; new_doc `[batch]`, new_m `[batch]`, r `[batch]` valid slots.
  """
  c = starts.shape[1]
  i = jnp.arange(c)
  restart = starts[:, 0]
  m = jnp.where(restart, 0, m)
  inner = starts & (i > 0)
  j1 = jnp.min(jnp.where(inner, i, c), axis=1)
  jl = jnp.max(jnp.where(inner, i, -1), axis=1)
  r = jnp.sum(valid, axis=1).astype(jnp.int32)
  f = c - m
  fold = f <= jnp.minimum(j1, r)
  carried = valid & (i < j1[:, None])
  new_doc = jl >= 0
  return {"restart": restart, "m": m, "fold": fold, "after": carried & (i >= f[:, None]),
          "fresh": valid & (i >= j1[:, None]), "doc": jnp.cumsum(inner, axis=1), "new_doc": new_doc,
          "new_m": jnp.where(new_doc, r - jl, jnp.where(fold, m + r - c, m + r)).astype(jnp.int32), "r": r}


def restart_carry(carry, plan, init):
  """Rows whose step starts a document take fresh memory (initial weights, zero momentum)."""
  b = plan["m"].shape[0]
  fresh_w = tuple(jnp.broadcast_to(w, (b,) + w.shape) for w in init)
  carry = dict(carry, w=_pick(plan["restart"], fresh_w, carry["w"]),
               s=_pick(plan["restart"], jax.tree.map(jnp.zeros_like, carry["s"]), carry["s"]))
  return carry


def fold_open_chunk(carry, plan, new, *, theta_scale, grad_clip=0.0):
  """Weights and momentum after the open chunk completes (garbage in rows where it does not).

  new: the step's (k, v, z); the chunk is the last `m` buffered tokens then the first C - m new ones.
  """
  c = carry["k"].shape[1]
  idx = (c - plan["m"])[:, None] + jnp.arange(c)

  def fold():
    k, v, z = (_take(jnp.concatenate([carry[n], x], axis=1), idx) for n, x in zip("kvz", new))
    return chunk_update_batched(carry["w"], carry["s"], k, v, z, theta_scale=theta_scale, grad_clip=grad_clip)

  return lax.cond(jnp.any(plan["fold"]), fold, lambda: (carry["w"], carry["s"]))


def read_planned(q, w, w_after, init, plan):
  """Each token's retrieval from the weights it may see: `q [batch, C, H, dm]`."""
  y = read_memory(w, q)
  y = lax.cond(jnp.any(plan["after"]), lambda: jnp.where(_rows(plan["after"], y), read_memory(w_after, q), y),
               lambda: y)
  return lax.cond(jnp.any(plan["fresh"]), lambda: jnp.where(_rows(plan["fresh"], y), read_shared(init, q), y),
                  lambda: y)


def advance_carry(carry, plan, w_after, s_after, new, init):
  """The carry after a step: weights of the open document's last chunk boundary, the last C tokens."""
  c = carry["k"].shape[1]
  b = plan["m"].shape[0]
  fresh_w = tuple(jnp.broadcast_to(w, (b,) + w.shape) for w in init)
  w = _pick(plan["new_doc"], fresh_w, _pick(plan["fold"], w_after, carry["w"]))
  s = _pick(plan["new_doc"], jax.tree.map(jnp.zeros_like, s_after), _pick(plan["fold"], s_after, carry["s"]))
  idx = plan["r"][:, None] + jnp.arange(c)
  bufs = {n: _take(jnp.concatenate([carry[n], x], axis=1), idx) for n, x in zip("kvz", new)}
  return dict(carry, w=w, s=s, m=plan["new_m"], **bufs)


def step_inputs(xs, starts, c):
  """Pad `[batch, s, ...]` arrays to whole steps of c slots -> `[steps, batch, c, ...]`, with starts and valid."""
  b, s = starts.shape
  n = -(-s // c)
  pad = n * c - s

  def split(x):
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return x.reshape((b, n, c) + x.shape[2:]).swapaxes(0, 1)

  valid = jnp.broadcast_to(jnp.arange(n * c) < s, (b, n * c))
  return [split(x) for x in xs], split(starts), valid.reshape(b, n, c).swapaxes(0, 1)


def merge_steps(y, s):
  """`[steps, batch, c, ...]` -> `[batch, s, ...]`."""
  y = y.swapaxes(0, 1)
  return y.reshape((y.shape[0], -1) + y.shape[3:])[:, :s]


def memory_segment(carry, q, k, v, z, *, starts, init, theta_scale, grad_clip=0.0):
  """The neural memory of one layer over a segment (MAG's branch; the tests' entry point).

  Args:
    carry: {"w", "s": tuples of `[batch, H, in, out]`; "k", "v": `[batch, C, H, dm]`;
      "z": `[batch, C, H, 3]`; "m": `[batch]` int32} (module docstring, "State").
    q, k, v: `[batch, seg, H, dm]`; z `[batch, seg, H, 3]` gate logits; float32.
    starts: `[batch, seg]` bool, a document starts at this token (index 0 never: that is `reset`).
    init: tuple of `[H, in, out]`, the initial weights of a new document.
  Returns:
    y `[batch, seg, H, dm]` (each token reads the weights at the start of its chunk) and the new carry.
  """
  c = carry["k"].shape[1]
  (qs, ks, vs, zs), st, valid = step_inputs([q, k, v, z], starts, c)

  def body(carry, inputs):
    q, k, v, z, starts, valid = inputs
    plan = step_plan(carry["m"], starts, valid)
    carry = restart_carry(carry, plan, init)
    new = (k, v, z)
    w_after, s_after = fold_open_chunk(carry, plan, new, theta_scale=theta_scale, grad_clip=grad_clip)
    y = read_planned(q, carry["w"], w_after, init, plan)
    return advance_carry(carry, plan, w_after, s_after, new, init), y

  carry, ys = lax.scan(body, carry, (qs, ks, vs, zs, st, valid))
  return merge_steps(ys, q.shape[1]), carry


# ----------------------------------------------------------------------------- layers


def prefix_attention(q, q_raw, k, v, mask, pk, pv):
  """Softmax attention over a position-free prefix and masked keys; softmax in float32.

  Args:
    q: `[batch, q_len, heads, hd]` rotated queries; q_raw: the same unrotated (they score the prefix,
      which has no position, so the result does not depend on where the segment was cut).
    k, v: `[batch, kv_len, kv_heads, hd]` (k rotated); mask `[batch, q_len, kv_len]`.
    pk, pv: `[P, kv_heads, hd]` persistent keys / values, visible to every query (None: none).
  Returns:
    `[batch, q_len, heads, hd]` in q's dtype.
  """
  b, s, h, d = q.shape
  kvh = k.shape[2]
  g = h // kvh
  scale = d ** -0.5
  scores = jnp.einsum("bskgd,btkd->bkgst", q.reshape(b, s, kvh, g, d), k, preferred_element_type=jnp.float32)
  scores = jnp.where(mask[:, None, None], scores * scale, NEG_INF)
  p = 0 if pk is None else pk.shape[0]
  if p:
    pscores = jnp.einsum("bskgd,pkd->bkgsp", q_raw.reshape(b, s, kvh, g, d), pk.astype(q.dtype),
                         preferred_element_type=jnp.float32)
    scores = jnp.concatenate([pscores * scale, scores], axis=-1)
  probs = jax.nn.softmax(scores, axis=-1)
  pw = jnp.where(mask[:, None, None], probs[..., p:], 0.0).astype(v.dtype)  # all-masked rows -> 0
  out = jnp.einsum("bkgst,btkd->bskgd", pw, v, preferred_element_type=jnp.float32)
  if p:
    out = out + jnp.einsum("bkgsp,pkd->bskgd", probs[..., :p].astype(v.dtype), pv.astype(v.dtype),
                           preferred_element_type=jnp.float32)
  return out.reshape(b, s, h, d).astype(q.dtype)


def window_prefix_attention(q, q_raw, k, v, pk, pv, *, q_doc, k_doc, window: int, block: int | None):
  """Sliding-window attention (`layers.sliding_window_attention`'s contract: kv_len = window + q_len)
  plus the persistent prefix, blockwise in O(q_len * (2 block + P)) memory."""
  b, s, h, d = q.shape
  block = max(window, 1) if block is None else block
  if s <= block:
    k_pos = jnp.arange(window + s)
    mask = window_mask(k_pos[window:], k_pos, q_doc, k_doc, window=window)
    return prefix_attention(q, q_raw, k, v, mask, pk, pv)
  nb = -(-s // block)
  pad = nb * block - s
  lead = block - window
  padk = lambda x: jnp.pad(x, ((0, 0), (lead, pad)) + ((0, 0),) * (x.ndim - 2))
  padq = lambda x: jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
  pairs = lambda x: jnp.concatenate([x[:, :-1], x[:, 1:]], axis=2)  # key blocks i and i+1 serve query block i
  kb, vb = (pairs(padk(x).reshape(b, nb + 1, block, *x.shape[2:])) for x in (k, v))
  kdb = pairs(jnp.pad(k_doc, ((0, 0), (lead, pad)), constant_values=-1).reshape(b, nb + 1, block))
  qb, qrb = (padq(x).reshape(b, nb, block, h, d) for x in (q, q_raw))
  qdb = jnp.pad(q_doc, ((0, 0), (0, pad)), constant_values=-2).reshape(b, nb, block)
  fold = lambda x: x.reshape(b * nb, *x.shape[2:])
  mask = window_mask(block + jnp.arange(block), jnp.arange(2 * block), fold(qdb), fold(kdb), window=window)
  out = prefix_attention(fold(qb), fold(qrb), fold(kb), fold(vb), mask, pk, pv)
  return out.reshape(b, nb * block, h, d)[:, :s]


def window_prefix_ring_attention(q, k, v, pk, pv, *, cache_k, cache_v, q_doc, cache_doc, window: int,
                                 rope_base: float, block: int = 128, impl: str = "xla"):
  """`window_prefix_attention` with the segment split over the mesh's `sequence` axis (MAG, context parallel).

  q `[batch, seg, heads, hd]`, k, v `[batch, seg, kv_heads, hd]` unrotated; cache `[batch, W, kv_heads, hd]`
  and cache_doc `[batch, W]`; pk, pv `[P, kv_heads, hd]` or None. Per device, with its seg/n tokens: the ring
  over the segment (the steps the window reaches) and the XL cache as a local block
  (`layers.window_ring_attention`), merged by log-sum-exp with the persistent prefix (scored by the
  unrotated queries, visible to all). Returns `[batch, seg, heads, hd]`.
  """
  w, seg = cache_k.shape[1], q.shape[1]

  def shard(q, k, v, q_doc, pos, cache_k, cache_v, cache_doc, pk, pv):
    cache_pos = jnp.arange(w)
    q_rot, k = rotary(q, pos, base=rope_base), rotary(k, pos, base=rope_base)
    cache = (rotary(cache_k.astype(k.dtype), cache_pos, base=rope_base), cache_v.astype(v.dtype), cache_pos, cache_doc)
    out = window_ring_attention(q_rot, k, v, pos=pos, q_doc=q_doc, window=window, cache=cache, block=block, impl=impl)
    if pk is not None:
      b, p = q.shape[0], pk.shape[0]
      wide = lambda t: jnp.broadcast_to(t.astype(k.dtype), (b,) + t.shape)
      zeros = lambda t: jnp.zeros((b, t), jnp.int32)
      prefix = ra.flash_attention(q, wide(pk), wide(pv), q_pos=pos, k_pos=jnp.zeros(p, jnp.int32),
                                  q_doc=zeros(q.shape[1]), k_doc=zeros(p), block_q=block, block_k=block, impl=impl,
                                  return_lse=True)
      out = ra.merge_attention(*out, *prefix)
    return out[0].astype(q.dtype)

  seq, whole = P(None, shd.SEQUENCE_AXIS), P()
  return shd.over_sequence(shard, in_specs=(seq,) * 4 + (P(shd.SEQUENCE_AXIS),) + (whole,) * 5, out_specs=seq)(
      q, k, v, q_doc, w + jnp.arange(seg), cache_k, cache_v, cache_doc, pk, pv)


class NeuralMemory(nnx.Module):
  """Projections, gates and learned initial weights of one layer's memory."""

  def __init__(self, cfg: TitansConfig, *, rngs: nnx.Rngs):
    d, hm, dm = cfg.d_model, cfg.memory_heads, cfg.memory_dim
    self.wq = param(rngs, (d, hm, dm), ("embed", "heads", "head_dim"), fan_in=d)
    self.wk = param(rngs, (d, hm, dm), ("embed", "heads", "head_dim"), fan_in=d)
    self.wv = param(rngs, (d, hm, dm), ("embed", "heads", "head_dim"), fan_in=d)
    self.w_gate = param(rngs, (d, hm, 3), ("embed", "heads", None), fan_in=d, scale=0.1)
    self.b_gate = nnx.Param(jnp.broadcast_to(jnp.asarray(GATE_BIAS, jnp.float32), (hm, 3)),
                            logical_axes=("heads", None))
    # keys are unit vectors, so the first layer draws from N(0, 1); later ones from N(0, 1 / fan_in)
    self.init_weights = nnx.List([param(rngs, (hm, i, o), ("heads", "memory", "memory"), fan_in=1 if j == 0 else i)
                                  for j, (i, o) in enumerate(cfg.memory_shapes)])
    self.wo = param(rngs, (hm, dm, d), ("heads", "head_dim", "embed"), fan_in=d)

  def initial(self):
    return tuple(w[...].astype(jnp.float32) for w in self.init_weights)

  def query(self, x):
    """`x [batch, seq, d_model]` -> `[batch, seq, H, dm]` float32, L2-normalised."""
    return l2_normalize(jax.nn.silu(jnp.einsum("bsd,dhk->bshk", x, self.wq[...].astype(x.dtype)).astype(jnp.float32)))

  def write_inputs(self, x):
    """`x [batch, seq, d_model]` -> k (L2-normalised), v `[batch, seq, H, dm]`, gate logits z `[batch, seq, H, 3]`."""
    proj = lambda w: jax.nn.silu(jnp.einsum("bsd,dhk->bshk", x, w[...].astype(x.dtype)).astype(jnp.float32))
    z = jnp.einsum("bsd,dhg->bshg", x, self.w_gate[...].astype(x.dtype)).astype(jnp.float32) + self.b_gate[...]
    return l2_normalize(proj(self.wk)), proj(self.wv), z

  def combine(self, y, dtype):
    """Retrievals `[batch, seq, H, dm]` -> `[batch, seq, d_model]` (a projection, not a reshape: XLA's SPMD
    partitioner (jax 0.10.2, CPU) miscomputed the reshape of a head-sharded array here)."""
    return jnp.einsum("bshk,hkd->bsd", y.astype(dtype), self.wo[...].astype(dtype))


class TitansAttention(Attention):
  """The baseline's projections (`transformer.Attention`) plus the persistent (key, value) prefix."""

  def __init__(self, cfg: TitansConfig, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    kvh, hd = cfg.num_kv_heads or cfg.num_heads, cfg.resolved_head_dim
    p = cfg.num_persistent
    self.pk = param(rngs, (p, kvh, hd), (None, "kv_heads", "head_dim"), fan_in=1) if p else None
    self.pv = param(rngs, (p, kvh, hd), (None, "kv_heads", "head_dim"), fan_in=1) if p else None

  def persistent(self):
    return (None, None) if self.pk is None else (self.pk[...], self.pv[...])

  def qkv(self, x):
    proj = lambda w: jnp.einsum("bsd,dhk->bshk", x, w[...].astype(x.dtype))
    return proj(self.wq), proj(self.wk), proj(self.wv)

  def kv(self, x):
    proj = lambda w: jnp.einsum("bsd,dhk->bshk", x, w[...].astype(x.dtype))
    return proj(self.wk), proj(self.wv)

  def out(self, o):
    return jnp.einsum("bshk,hkd->bsd", o, self.wo[...].astype(o.dtype))

  def window(self, x, *, cache_k, cache_v, q_doc, k_doc):
    """MAG: sliding window over [persistent; cache; segment]; returns the output and the new unrotated k, v."""
    cfg = self.cfg
    q, k, v = self.qkv(x)
    window, seg = cache_k.shape[1], x.shape[1]
    pk, pv = self.persistent()
    n = shd.context_parallel_size()
    if n > 1 and seg % n == 0:
      out = window_prefix_ring_attention(q, k, v, pk, pv, cache_k=cache_k, cache_v=cache_v, q_doc=q_doc,
                                         cache_doc=k_doc[:, :window], window=cfg.window, rope_base=cfg.rope_base,
                                         block=cfg.attention_block or 128,
                                         impl="pallas" if cfg.attention_impl == "pallas" else "xla")
      return self.out(out), k, v
    k_all = jnp.concatenate([cache_k.astype(k.dtype), k], axis=1)
    v_all = jnp.concatenate([cache_v.astype(v.dtype), v], axis=1)
    positions = jnp.arange(window + seg)
    out = window_prefix_attention(rotary(q, positions[window:], base=cfg.rope_base), q,
                                  rotary(k_all, positions, base=cfg.rope_base), v_all, pk, pv, q_doc=q_doc,
                                  k_doc=k_doc, window=cfg.window, block=cfg.attention_block or None)
    return self.out(out), k, v


class MAGBlock(nnx.Module):
  """x += Attn(N(x)) * sigmoid(N_m(M*(q) W_o)); x += MLP(N(x))."""

  def __init__(self, cfg: TitansConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    self.attn = TitansAttention(cfg, rngs=rngs)
    self.memory = NeuralMemory(cfg, rngs=rngs)
    self.memory_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    self.mlp = GatedMLP(cfg.d_model, cfg.resolved_d_ff, rngs=rngs, out_scale=1.0 / (2 * cfg.num_layers))

  def __call__(self, x, *, carry, starts, cache_k, cache_v, q_doc, k_doc):
    xn = self.attn_norm(x)
    a, k, v = self.attn.window(xn, cache_k=cache_k, cache_v=cache_v, q_doc=q_doc, k_doc=k_doc)
    y, carry = memory_segment(carry, self.memory.query(xn), *self.memory.write_inputs(xn), starts=starts,
                              init=self.memory.initial(), theta_scale=self.cfg.theta_scale,
                              grad_clip=self.cfg.memory_grad_clip)
    x = x + a * jax.nn.sigmoid(self.memory_norm(self.memory.combine(y, x.dtype)))
    return x + self.mlp(self.mlp_norm(x)), carry, (k, v)


class MACBlock(nnx.Module):
  """Per MAC segment (= memory chunk): attention over [persistent; h_j, x_j (j <= t)], memory written
  with the attention output y, x += y * sigmoid(N_o(M*(q'))), then the gated MLP."""

  def __init__(self, cfg: TitansConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    self.attn = TitansAttention(cfg, rngs=rngs)
    self.memory = NeuralMemory(cfg, rngs=rngs)
    self.h_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)  # retrieved tokens before their K/V projections
    self.y_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)  # attention output before the memory's projections
    self.memory_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    self.mlp = GatedMLP(cfg.d_model, cfg.resolved_d_ff, rngs=rngs, out_scale=1.0 / (2 * cfg.num_layers))

  def attend(self, xq, xk, xv, h, carry, plan, valid):
    """One step's attention. xq `[b, C, heads, hd]`, xk, xv `[b, C, kv, hd]` (unrotated), h `[b, C, H, dm]`.

    Keys: [buffered h; buffered x; the step's h; the step's x] at positions [0..C); [0..C); C + [0..C)
    twice. A key is visible to a query of the same group (document and MAC segment) at a position <= its own.
    """
    cfg = self.cfg
    b, c = xq.shape[:2]
    hk, hv = self.attn.kv(self.h_norm(self.memory.combine(h, xq.dtype)))
    i = jnp.arange(c)
    buf_group = jnp.where(i >= (c - plan["m"])[:, None], 0, -1)
    group = jnp.where(valid, 2 * plan["doc"] + plan["after"], -2)
    k_group = jnp.concatenate([buf_group, buf_group, group, group], axis=1)
    k_pos = jnp.concatenate([i, i, c + i, c + i])
    mask = (group[:, :, None] == k_group[:, None, :]) & (k_group[:, None, :] >= 0) & \
        (k_pos[None, None, :] <= (c + i)[None, :, None])
    keys = jnp.concatenate([carry["h_k"].astype(xk.dtype), carry["x_k"].astype(xk.dtype), hk, xk], axis=1)
    vals = jnp.concatenate([carry["h_v"].astype(xv.dtype), carry["x_v"].astype(xv.dtype), hv, xv], axis=1)
    pk, pv = self.attn.persistent()
    out = prefix_attention(rotary(xq, c + i, base=cfg.rope_base), xq, rotary(keys, k_pos, base=cfg.rope_base),
                           vals, mask, pk, pv)
    return self.attn.out(out), hk, hv

  def __call__(self, x, *, carry, starts):
    cfg = self.cfg
    s, c = x.shape[1], cfg.chunk_size
    xn = self.attn_norm(x)
    xq, xk, xv = self.attn.qkv(xn)
    init = self.memory.initial()
    (xq, xk, xv, hq), st, valid = step_inputs([xq, xk, xv, self.memory.query(xn)], starts, c)

    def body(carry, inputs):
      xq, xk, xv, hq, starts, valid = inputs
      plan = step_plan(carry["m"], starts, valid)
      carry = restart_carry(carry, plan, init)
      no_after = dict(plan, after=jnp.zeros_like(plan["after"]))
      h = read_planned(hq, carry["w"], carry["w"], init, no_after)  # tokens after the fold: redone below
      y, hk, hv = self.attend(xq, xk, xv, h, carry, plan, valid)
      new = self.memory.write_inputs(self.y_norm(y))
      w_after, s_after = fold_open_chunk(carry, plan, new, theta_scale=cfg.theta_scale,
                                         grad_clip=cfg.memory_grad_clip)

      def second_pass():  # tokens of the next MAC segment retrieve from the folded weights
        after = plan["after"]
        h2 = jnp.where(_rows(after, h), read_memory(w_after, hq), h)
        y2, hk2, hv2 = self.attend(xq, xk, xv, h2, carry, plan, valid)
        y2 = jnp.where(_rows(after, y), y2, y)
        return y2, jnp.where(_rows(after, hk), hk2, hk), jnp.where(_rows(after, hv), hv2, hv)

      y, hk, hv = lax.cond(jnp.any(plan["after"]), second_pass, lambda: (y, hk, hv))
      yn = self.y_norm(y)
      new = self.memory.write_inputs(yn)
      o = read_planned(self.memory.query(yn), carry["w"], w_after, init, plan)
      out = y * jax.nn.sigmoid(self.memory_norm(self.memory.combine(o, y.dtype)))
      idx = plan["r"][:, None] + jnp.arange(c)
      kv = {n: _take(jnp.concatenate([carry[n], a.astype(carry[n].dtype)], axis=1), idx)
            for n, a in (("h_k", hk), ("h_v", hv), ("x_k", xk), ("x_v", xv))}
      return dict(advance_carry(carry, plan, w_after, s_after, new, init), **kv), out

    carry, ys = lax.scan(body, carry, (xq, xk, xv, hq, st, valid))
    x = x + merge_steps(ys, s)
    return x + self.mlp(self.mlp_norm(x)), carry


# ----------------------------------------------------------------------------- the model


@register_model("titans", config=TitansConfig,
                description="Titans: neural memory (MLP weights learned at test time, chunked), MAG / MAC")
class Titans(SegmentLM):
  context_parallel = ("MAG: ring attention for the window (XL cache and persistent prefix merged by lse); the "
                      "memory's chunk scan is sequential and XLA runs it on gathered inputs. MAC: none (its "
                      "attention spans one memory chunk inside that scan)")

  def __init__(self, cfg: TitansConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embedding = Embedding(cfg, rngs=rngs)
    block = MAGBlock if cfg.variant == "mag" else MACBlock
    self.blocks = nnx.List([block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)

  def init_state(self, batch_size: int):
    cfg = self.cfg
    b, n, c, hm, dm = batch_size, cfg.num_layers, cfg.chunk_size, cfg.memory_heads, cfg.memory_dim
    weights = [jnp.zeros((b, n, hm, i, o), jnp.float32) for i, o in cfg.memory_shapes]
    state = {"weights": weights, "momentum": [jnp.zeros_like(w) for w in weights],
             "mem_k": jnp.zeros((b, n, c, hm, dm), jnp.float32), "mem_v": jnp.zeros((b, n, c, hm, dm), jnp.float32),
             "mem_z": jnp.zeros((b, n, c, hm, 3), jnp.float32), "offset": jnp.zeros((b,), jnp.int32)}
    kvh, hd = cfg.num_kv_heads or cfg.num_heads, cfg.resolved_head_dim
    if cfg.variant == "mag":
      state.update(k=jnp.zeros((b, n, cfg.window, kvh, hd), jnp.float32),
                   v=jnp.zeros((b, n, cfg.window, kvh, hd), jnp.float32), valid=jnp.zeros((b, cfg.window), bool))
    else:
      state.update({name: jnp.zeros((b, n, c, kvh, hd), jnp.float32) for name in ("h_k", "h_v", "x_k", "x_v")})
    return {**state, **self.embedding.init_history(batch_size)}

  def fresh_state(self, batch_size: int):
    """`init_state` with the learned initial memory weights (reads parameters)."""
    state = self.init_state(batch_size)
    for j in range(self.cfg.memory_depth):
      w = jnp.stack([blk.memory.initial()[j] for blk in self.blocks])  # [layers, H, in, out]
      state["weights"][j] = jnp.broadcast_to(w, (batch_size,) + w.shape)
    return state

  def __call__(self, tokens, state, *, reset, segment_ids=None):
    self.check_segment_shapes(tokens, reset)
    cfg = self.cfg
    state = reset_rows(state, self.fresh_state(tokens.shape[0]), reset)
    q_doc = segment_doc_ids(segment_ids, tokens)
    starts = jnp.concatenate([jnp.zeros_like(q_doc[:, :1], bool), q_doc[:, 1:] != q_doc[:, :-1]], axis=1)
    x, history = self.embedding.embed_segment(tokens, state, q_doc, self.embedding.table[...].dtype)
    mem_keys = ("mem_k", "mem_v", "mem_z")
    kv_keys = ("h_k", "h_v", "x_k", "x_v")
    if cfg.variant == "mag":
      k_doc = jnp.concatenate([jnp.where(state["valid"], 0, -1), q_doc], axis=1)
    carries, caches = [], []
    for i, block in enumerate(self.blocks):
      carry = {"w": tuple(w[:, i] for w in state["weights"]), "s": tuple(s[:, i] for s in state["momentum"]),
               "k": state["mem_k"][:, i], "v": state["mem_v"][:, i], "z": state["mem_z"][:, i], "m": state["offset"]}
      if cfg.variant == "mag":
        x, carry, (k, v) = block(x, carry=carry, starts=starts, cache_k=state["k"][:, i],
                                 cache_v=state["v"][:, i], q_doc=q_doc, k_doc=k_doc)
        caches.append((roll_cache(state["k"][:, i], k), roll_cache(state["v"][:, i], v)))
      else:
        x, carry = block(x, carry=dict(carry, **{n: state[n][:, i] for n in kv_keys}), starts=starts)
      carries.append(carry)
    logits = self.embedding.logits(self.final_norm(x))
    stack = lambda get: jnp.stack([get(cr) for cr in carries], axis=1)
    new = {"weights": [stack(lambda cr: cr["w"][j]) for j in range(cfg.memory_depth)],
           "momentum": [stack(lambda cr: cr["s"][j]) for j in range(cfg.memory_depth)],
           **{n: stack(lambda cr: cr[n[-1]]) for n in mem_keys}, "offset": carries[-1]["m"]}
    if cfg.variant == "mag":
      new.update(k=jnp.stack([k for k, _ in caches], axis=1), v=jnp.stack([v for _, v in caches], axis=1),
                 valid=roll_cache_valid(state["valid"], q_doc))
    else:
      new.update({n: stack(lambda cr: cr[n]) for n in kv_keys})
    new = jax.tree.map(lambda a, old: a.astype(old.dtype), new, {k: state[k] for k in new})
    return logits, {**new, **history}

  @classmethod
  def flops_per_token(cls, cfg: TitansConfig, *, seg_len: int) -> float:
    d, h, hd, L, c = cfg.d_model, cfg.num_heads, cfg.resolved_head_dim, cfg.num_layers, cfg.chunk_size
    kvh = cfg.num_kv_heads or h
    hm = cfg.memory_heads
    mem_params = hm * sum(i * o for i, o in cfg.memory_shapes)  # per layer
    read = 2 * mem_params
    fold = 5 * read  # forward + two backward passes over the chunk's tokens (each ~2 forwards)
    update = 6 * mem_params / c  # the weight and momentum update, once per chunk
    mem_proj = 2 * d * hm * (3 * cfg.memory_dim + 3) + 2 * hm * cfg.memory_dim * d  # q, k, v, gates; W_o
    proj = 2 * d * hd * (2 * h + 2 * kvh)
    p = cfg.num_persistent
    if cfg.variant == "mag":
      attn = 2 * 2 * h * hd * (cfg.window + p)
      mixer = proj + attn + mem_proj + read + fold + update
    else:
      attn = 2 * 2 * h * hd * (4 * c + p)  # each step's queries over [buffer; step] x [h; x] keys
      h_kv = 2 * d * hd * 2 * kvh
      mixer = proj + h_kv + attn + 2 * mem_proj + 2 * read + fold + update  # q and W_o twice (h and the output)
    mlp = 2 * 3 * d * cfg.resolved_d_ff
    return float(L * (mixer + mlp) + 2 * d * cfg.vocab_size + 2 * cfg.embed_conv * d)
