"""MELODI (Chen et al. 2025): hierarchical short/long-term compression memory, on the baseline's layers.

Reference: google-research/meliad `transformer/memory2/melodi_layer.py`, `melodi_memory.py`.
A segment is read as windows of W = `block_len` tokens (`blockwise.py`; 0 = `window`,
as for every block-recurrent model, so `window` only sets W's default). There is
no Transformer-XL cache (`xl_cache = False`): the short-term memory replaces it.

Shapes: b lanes, W window (block) tokens, S `short_memory` slots per layer,
U `summary_tokens`, M `long_memory_size`, A `long_append` entries per window,
h query heads, kv kv heads, dh head_dim, d d_model, n layers.

Per window, layer l (the baseline's pre-norm block, `Block`; N = RMSNorm):
    x  `[b, W, d]`  the window's hidden states (layer 0: token embeddings)
    u  `[b, U, d]`  summary tokens (layer 0: the learned `summary_tokens [U, d]`;
                    layer l > 0: layer l-1's mixed summary of this same window)
    z  `[b, S, d]`  this layer's short-term memory, written by the previous window
    queries  [x; u]     rotary positions S .. S+W+U-1             `[b, W+U, h, dh]`
    keys     [z; x; u]  rotary positions 0 .. S+W+U-1             `[b, S+W+U, kv, dh]`
             (q, k, v = N(.) Wq, Wk, Wv with the layer's own norm and weights)
    visible (causal over the sequence [z; x; u], tokens see themselves):
      token i      every valid memory slot, tokens <= i of its own document, no summary token
      summary j    every valid memory slot, the tokens of the window's last document,
                   summary tokens <= j
    y_self = softmax attention                                    `[b, W+U, h, dh]`
  Long-term layer only (`long_layer`), with the FIFO `m [b, M, d]`, `valid [b, M]`:
    k_m, v_m = N(m) Wk, N(m) Wv  (recomputed every window from the stored embeddings)
    y_long   = softmax attention of the unrotated queries over the valid entries
               (no position, no causal mask; 0 while the FIFO holds nothing valid)
    alpha    = sigmoid(long_gate)  `[h, dh]`
    y        = alpha * y_self + (1 - alpha) * y_long              (per head and channel)
  then  [x'; u'] = [x; u] + y Wo;  [x'; u'] += GatedMLP(N([x'; u']))   (the baseline's block)
  Token mixing: a linear map over the token axis, the same for every lane and window,
    mix(x', u') = K^T [x'~; u'~] + bias,   K `[W+U, O]`, bias `[O]` (broadcast over d)
    with norm+residual:  x'~ = N1(x'), u'~ = N2(u') (two RMSNorms), and + u' at the end (O = U)
    without:             x'~ = x', u'~ = u'
    and x'~ set to 0 for tokens outside the window's last document (memory writes see it only).
    z (next window, layer l)  = mix_short(x', u')    O = S; norm+residual iff S == U (as meliad)
    u (this window, layer l+1) = mix_summary(x', u')  O = U; norm+residual (no mixer after the last layer,
                                                      whose summary meliad computes and discards)
    long layer: inc = mix_long(x', u')               O = A; plain linear, no norm, no residual
                m, valid = [m[A:]; inc], [valid[A:]; 1]   (FIFO: drop the oldest A, append at the end;
                                                        window k reads what windows < k wrote)
  x' goes on to layer l+1 unmixed; the logits are the baseline's head on the last layer's x'.

Context parallelism (mesh `sequence` axis n > 1 dividing W): each device holds W/n of the window's
tokens (`melodi_ring_attention`). They attend over the ring of token shards and the replicated short
memory; the replicated summary tokens read each shard's tokens there and merge the partial results by
log-sum-exp. The FIFO cross attention is per query and the token mixers are sums over the token axis,
which XLA partitions (an all-reduce of `[b, O, d]` per mixer).

Gradients flow through the whole memory chain across the windows of a train
step (short memory window to window, summaries layer to layer, FIFO entries);
as in meliad there is no stop_gradient; the trainer stops them between steps.
The long memory's K/V are recomputed from the stored embeddings with the
current weights, so Wk/Wv/norm still learn from entries written in earlier steps.

Memory (state["memory"]), float32, every leaf lane-first:
  short        `[b, n, S, d]`  per layer's short-term memory (embeddings, not K/V)
  short_valid  `[b]` bool      the short memory holds a window of the current document
  long         `[b, M, d]`     the FIFO, oldest first (absent when long_memory_size = 0)
  long_valid   `[b, M]` bool
Bytes per lane: 4 (n S d + M d) + M + 1 (`Melodi.state_bytes_per_lane`). At the
reference's scale (n 12, d 1024, S 64, M 4096) that is 19.9 MB, against 587 MB (29x)
for a Memorizing Transformer with 64K (key, value) pairs of 8 heads x 128 in one
layer plus its 12 x 512-token XL cache (our `memorizing` state, float32). S192+A32,
S128+A64 and S192+A96 with a 128-window span (configurations the paper is reported
to compare) give 22x, 15x and 10x by this count; the paper's abstract claims 8x with
its own accounting, which is not reproduced here.

Documents: a window in which a document starts after its first token reads the
fresh (empty) memory for all its tokens (`blockwise.py`), and its writes (short
memory, summaries, FIFO entries) see only the last document's tokens.

Deviations from meliad, all deliberate:
  * Rotary positions over the sequence [z; x; u] with the baseline's scaled
    dot-product attention, instead of T5 relative-position buckets with
    L2-normalised q/k and a learned per-head scale; long-memory cross attention
    uses the unrotated queries (meliad: no position bias there either).
  * Causal attention includes the diagonal (a token sees itself), as in our
    baseline; meliad masks to strictly earlier keys.
  * Empty memory is masked: `short_valid` and `long_valid` keep never-written
    slots (document start, a FIFO not yet full) out of the softmax. meliad resets
    memory to zeros and attends to them, so zero slots soak up probability mass.
  * The baseline's block (RMSNorm, SwiGLU MLP, no dropout, our init) instead of
    meliad's scale-only LayerNorm, ReLU MLP and dropout 0.05. As in meliad:
    summary tokens and gate are initialised truncated N(0, 0.25^2) (the embedding
    is N(0, 1)), mixer kernels with variance 1 / (W+U), mixer biases 0.
  * Writes use the window's last document only (`last_doc_mask`), our document convention.
  * The FIFO's K/V are recomputed from its embeddings in every window (meliad: once
    per segment, then appended); same values, since the state holds embeddings only.

Defaults are small (W = window = 128, S = U 32, M 512, A 16: a 32-window FIFO span). The
reference gin (base_melodi.gin) uses W 512, S = U 64, M 4096, A 32 (128 windows,
65,536 tokens), long layer 6 of 12; the paper reportedly also runs S 128-192 and
A 32-96 with a 128-window span (not checked against the paper's text).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from longctx import sharding as shd
from longctx.errors import ConfigError
from longctx.kernels import ring_attention as ra
from longctx.layers import RMSNorm, masked_attention, merge_over_sequence, param, rotary, window_ring_attention
from longctx.models.blockwise import BlockwiseConfig, BlockwiseLM, last_doc_mask
from longctx.models.registry import register_model
from longctx.models.transformer import Attention, Block, Embedding


@dataclasses.dataclass
class MelodiConfig(BlockwiseConfig):
  layer_indices = ("long_layer",)  # the dry run keeps this layer when it reduces the depth
  name: str = "melodi"
  short_memory: int = 32  # S: short-term memory slots per layer (reference 64)
  summary_tokens: int = 32  # U: summary tokens per window (reference 64)
  long_memory_size: int = 512  # M: FIFO entries in the long-term layer (reference 4096; 0 = no long memory)
  long_append: int = 16  # A: entries appended per window (reference 32)
  long_layer: int = -1  # index of the long-term memory layer (-1 = the middle, num_layers // 2)

  def validate(self) -> None:
    super().validate()
    for key in ("short_memory", "summary_tokens"):
      if getattr(self, key) < 1:
        raise ConfigError(f"model.{key}={getattr(self, key)} must be >= 1")
    if self.long_memory_size < 0:
      raise ConfigError(f"model.long_memory_size={self.long_memory_size} must be >= 0 (0 = no long-term memory)")
    if self.long_memory_size and not 1 <= self.long_append <= self.long_memory_size:
      raise ConfigError(f"model.long_append={self.long_append} must be in [1, model.long_memory_size="
                        f"{self.long_memory_size}]")
    if not (self.long_layer == -1 or 0 <= self.long_layer < self.num_layers):
      raise ConfigError(f"model.long_layer={self.long_layer} must be -1 (the middle layer) or in "
                        f"[0, model.num_layers={self.num_layers})")

  @property
  def resolved_long_layer(self) -> int | None:
    """The long-term memory layer, or None without long memory."""
    if not self.long_memory_size:
      return None
    return self.num_layers // 2 if self.long_layer == -1 else self.long_layer


# ----------------------------------------------------------------------------- pure functions


def melodi_mask(q_doc: jax.Array, short_valid: jax.Array, *, short_memory: int, summary_tokens: int) -> jax.Array:
  """Visibility `[b, W+U, S+W+U]` of queries [tokens; summary] over keys [short memory; tokens; summary].

  Args:
    q_doc: `[b, W]` document ids of the window's tokens (0 = the memory's document).
    short_valid: `[b]` bool, the short memory holds something of document 0.
  """
  b, W = q_doc.shape
  S, U = short_memory, summary_tokens
  row_doc = jnp.concatenate([q_doc, jnp.broadcast_to(q_doc[:, -1:], (b, U))], axis=1)  # summary = last doc
  mem = jnp.broadcast_to((short_valid[:, None] & (row_doc == 0))[:, :, None], (b, W + U, S))
  tok_tok = jnp.tril(jnp.ones((W, W), bool))[None] & (q_doc[:, :, None] == q_doc[:, None, :])
  sum_tok = jnp.broadcast_to(last_doc_mask(q_doc)[:, None, :], (b, U, W))
  tok_sum = jnp.zeros((b, W, U), bool)
  sum_sum = jnp.broadcast_to(jnp.tril(jnp.ones((U, U), bool)), (b, U, U))
  rows_tok = jnp.concatenate([tok_tok, sum_tok], axis=1)  # [b, W+U, W]
  rows_sum = jnp.concatenate([tok_sum, sum_sum], axis=1)  # [b, W+U, U]
  return jnp.concatenate([mem, rows_tok, rows_sum], axis=2)


def long_mask(q_doc: jax.Array, long_valid: jax.Array, *, summary_tokens: int) -> jax.Array:
  """Visibility `[b, W+U, M]` of queries [tokens; summary] over the FIFO: its valid entries, document 0 only."""
  b = q_doc.shape[0]
  row_doc = jnp.concatenate([q_doc, jnp.broadcast_to(q_doc[:, -1:], (b, summary_tokens))], axis=1)
  return long_valid[:, None, :] & (row_doc == 0)[:, :, None]


def fifo_append(memory: jax.Array, valid: jax.Array, new: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Drop the oldest `A` entries of `memory [b, M, d]` (front) and append `new [b, A, d]` at the end."""
  a = new.shape[1]
  memory = jnp.concatenate([memory[:, a:], new.astype(memory.dtype)], axis=1)
  valid = jnp.concatenate([valid[:, a:], jnp.ones(valid.shape[:1] + (a,), bool)], axis=1)
  return memory, valid


# ----------------------------------------------------------------------------- layers


class TokenMixing(nnx.Module):
  """A linear map over the token axis: [x (W); u (U)] `[b, W+U, d]` -> `[b, O, d]` (meliad's TokenMixing)."""

  def __init__(self, cfg: MelodiConfig, num_out: int, *, norm_residual: bool, rngs: nnx.Rngs):
    n_in = cfg.resolved_block_len + cfg.summary_tokens
    if norm_residual and num_out != cfg.summary_tokens:
      raise ValueError(f"a residual token mixer needs {num_out} outputs = summary_tokens={cfg.summary_tokens}")
    self.kernel = param(rngs, (n_in, num_out), (None, "memory"), fan_in=n_in)
    self.bias = nnx.Param(jnp.zeros((num_out,), jnp.float32), logical_axes=("memory",))
    self.norm_x = RMSNorm(cfg.d_model, eps=cfg.norm_eps) if norm_residual else None
    self.norm_u = RMSNorm(cfg.d_model, eps=cfg.norm_eps) if norm_residual else None

  def __call__(self, x, u, keep):
    """x `[b, W, d]`, u `[b, U, d]`; keep `[b, W]` bool: tokens that may be written (the last document)."""
    xs, us = (self.norm_x(x), self.norm_u(u)) if self.norm_x is not None else (x, u)
    xs = jnp.where(keep[:, :, None], xs, 0).astype(x.dtype)
    z = jnp.concatenate([xs, us], axis=1)
    out = jnp.einsum("bnd,no->bod", z, self.kernel[...].astype(z.dtype)) + self.bias[...].astype(z.dtype)[:, None]
    return out + u if self.norm_x is not None else out


def melodi_ring_attention(q, k, v, *, q_doc, short_valid, short_memory: int, rope_base: float,
                          block: int = 128, impl: str = "xla") -> jax.Array:
  """`melodi_mask` attention with the window's tokens split over the mesh's `sequence` axis.

  q `[b, W+U, h, dh]` rows [tokens; summary], k, v `[b, S+W+U, kv, dh]` rows [short memory; tokens;
  summary], all unrotated; q_doc `[b, W]`, short_valid `[b]`. Memory slots and summary tokens are
  replicated; per device, with its W/n tokens:
    tokens   ring over the tokens (causal, own document) + the memory slots as one local block
    summary  memory slots + summary tokens <= j, and this shard's tokens of the window's last document;
             the per-device partial results are all-gathered and merged by log-sum-exp
  Returns y `[b, W+U, h, dh]`.
  """
  S, W = short_memory, q_doc.shape[1]
  b, U = q.shape[0], q.shape[1] - W
  pos_z, pos_u = jnp.arange(S), S + W + jnp.arange(U)
  rot = lambda t, p: rotary(t, p, base=rope_base)
  qt, qu = q[:, :W], rot(q[:, W:], pos_u)
  kz, kt, ku = rot(k[:, :S], pos_z), k[:, S:S + W], rot(k[:, S + W:], pos_u)
  vz, vt, vu = v[:, :S], v[:, S:S + W], v[:, S + W:]
  z_doc = jnp.broadcast_to(jnp.where(short_valid, 0, -1)[:, None], (b, S))  # memory belongs to document 0
  u_doc = jnp.broadcast_to(q_doc[:, -1:], (b, U))  # summary tokens: the window's last document

  def shard(qt, kt, vt, q_doc, pos, qu, kz, vz, ku, vu, z_doc, u_doc):
    qt, kt = rot(qt, pos), rot(kt, pos)
    flash = functools.partial(ra.flash_attention, block_q=block, block_k=block, impl=impl, return_lse=True)
    tokens, _ = window_ring_attention(qt, kt, vt, pos=pos, q_doc=q_doc, window=None, cache=(kz, vz, pos_z, z_doc),
                                      block=block, impl=impl)
    summary = ra.merge_attention(*flash(qu, kz, vz, q_pos=pos_u, k_pos=pos_z, q_doc=u_doc, k_doc=z_doc),
                                 *flash(qu, ku, vu, q_pos=pos_u, k_pos=pos_u, q_doc=u_doc, k_doc=u_doc))
    summary, _ = ra.merge_attention(*summary, *merge_over_sequence(
        *flash(qu, kt, vt, q_pos=pos_u, k_pos=pos, q_doc=u_doc, k_doc=q_doc)))
    return tokens.astype(qt.dtype), summary.astype(qt.dtype)

  seq, whole = P(None, shd.SEQUENCE_AXIS), P()
  tokens, summary = shd.over_sequence(shard, in_specs=(seq, seq, seq, seq, P(shd.SEQUENCE_AXIS)) + (whole,) * 7,
                                      out_specs=(seq, whole))(
      qt, kt, vt, q_doc, S + jnp.arange(W), qu, kz, vz, ku, vu, z_doc, u_doc)
  return jnp.concatenate([tokens, summary], axis=1)


class MelodiAttention(Attention):
  """The baseline's attention weights; queries [tokens; summary] over keys [short memory; tokens; summary]."""

  def self_attention(self, x, memory, *, q_doc, short_valid):
    """x `[b, W+U, d]` and memory `[b, S, d]` (both normed); q_doc `[b, W]`, short_valid `[b]`.

    With the mesh's `sequence` axis n > 1 (dividing W) the window's tokens are context-parallel
    (`melodi_ring_attention`); otherwise the dense `melodi_mask` attention. Returns y `[b, W+U, h, dh]`
    and the unrotated q.
    """
    cfg = self.cfg
    S, W = memory.shape[1], q_doc.shape[1]
    q = jnp.einsum("bsd,dhk->bshk", x, self.wq[...].astype(x.dtype))
    kv_in = jnp.concatenate([memory.astype(x.dtype), x], axis=1)
    k = jnp.einsum("bsd,dhk->bshk", kv_in, self.wk[...].astype(x.dtype))
    v = jnp.einsum("bsd,dhk->bshk", kv_in, self.wv[...].astype(x.dtype))
    n = shd.context_parallel_size()
    if n > 1 and W % n == 0:
      y = melodi_ring_attention(q, k, v, q_doc=q_doc, short_valid=short_valid, short_memory=S,
                                rope_base=cfg.rope_base, block=cfg.attention_block or 128,
                                impl="pallas" if cfg.attention_impl == "pallas" else "xla")
      return y, q
    mask = melodi_mask(q_doc, short_valid, short_memory=S, summary_tokens=cfg.summary_tokens)
    pos = jnp.arange(kv_in.shape[1])
    base = cfg.rope_base
    y = masked_attention(rotary(q, pos[S:], base=base), rotary(k, pos, base=base), v, mask)
    return y, q

  def __call__(self, x, *, memory, q_doc, short_valid):
    y, _ = self.self_attention(x, memory, q_doc=q_doc, short_valid=short_valid)
    return jnp.einsum("bshk,hkd->bsd", y, self.wo[...].astype(x.dtype)), None, None


class LongMemoryAttention(MelodiAttention):
  """MelodiAttention plus gated cross attention over the long-term FIFO (same projections)."""

  def __init__(self, cfg: MelodiConfig, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    self.long_gate = param(rngs, (cfg.num_heads, cfg.resolved_head_dim), ("heads", "head_dim"), fan_in=1,
                           scale=0.25 ** 2)

  def __call__(self, x, *, memory, q_doc, short_valid, long_memory, long_mask):
    """long_memory `[b, M, d]` (normed); long_mask `[b, W+U, M]` (`long_mask`)."""
    y_self, q = self.self_attention(x, memory, q_doc=q_doc, short_valid=short_valid)
    mem = long_memory.astype(x.dtype)
    k = jnp.einsum("bsd,dhk->bshk", mem, self.wk[...].astype(x.dtype))
    v = jnp.einsum("bsd,dhk->bshk", mem, self.wv[...].astype(x.dtype))
    y_long = masked_attention(q, k, v, long_mask)
    alpha = jax.nn.sigmoid(self.long_gate[...].astype(jnp.float32))
    y = (alpha * y_self.astype(jnp.float32) + (1 - alpha) * y_long.astype(jnp.float32)).astype(x.dtype)
    return jnp.einsum("bshk,hkd->bsd", y, self.wo[...].astype(x.dtype)), None, None


@register_model("melodi", config=MelodiConfig,
                description="MELODI: per-layer short-term compression memory + gated long-term FIFO in one layer")
class Melodi(BlockwiseLM):
  xl_cache = False
  context_parallel = ("ring attention for the window's tokens; short memory and summary tokens replicated, "
                      "the summary's reads of the tokens merged by lse (FIFO reads and token mixing by XLA)")

  def __init__(self, cfg: MelodiConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    S, U, n = cfg.short_memory, cfg.summary_tokens, cfg.num_layers
    long = cfg.resolved_long_layer
    self.embedding = Embedding(cfg, rngs=rngs)
    self.blocks = nnx.List([Block(cfg, rngs=rngs, attention_cls=LongMemoryAttention if i == long else MelodiAttention)
                            for i in range(n)])
    self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    self.summary_tokens = param(rngs, (U, cfg.d_model), ("memory", "embed"), fan_in=cfg.d_model)
    self.mix_short = nnx.List([TokenMixing(cfg, S, norm_residual=S == U, rngs=rngs) for _ in range(n)])
    self.mix_summary = nnx.List([TokenMixing(cfg, U, norm_residual=True, rngs=rngs) for _ in range(n - 1)])
    self.mix_long = (TokenMixing(cfg, cfg.long_append, norm_residual=False, rngs=rngs)
                     if long is not None else None)

  def init_memory(self, batch_size: int):
    cfg = self.cfg
    memory = {"short": jnp.zeros((batch_size, cfg.num_layers, cfg.short_memory, cfg.d_model), jnp.float32),
              "short_valid": jnp.zeros((batch_size,), bool)}
    if cfg.resolved_long_layer is not None:
      memory["long"] = jnp.zeros((batch_size, cfg.long_memory_size, cfg.d_model), jnp.float32)
      memory["long_valid"] = jnp.zeros((batch_size, cfg.long_memory_size), bool)
    return memory

  def forward_block(self, x, *, memory, caches, q_doc, k_doc):
    cfg = self.cfg
    b, W, d = x.shape
    U, long = cfg.summary_tokens, cfg.resolved_long_layer
    keep = last_doc_mask(q_doc)
    u = jnp.broadcast_to(self.summary_tokens[...].astype(x.dtype), (b, U, d))
    new_memory = dict(memory)
    new_short = []
    for i, block in enumerate(self.blocks):
      kwargs = {"memory": block.attn_norm(memory["short"][:, i].astype(x.dtype)), "q_doc": q_doc,
                "short_valid": memory["short_valid"]}
      if i == long:
        kwargs["long_memory"] = block.attn_norm(memory["long"].astype(x.dtype))
        kwargs["long_mask"] = long_mask(q_doc, memory["long_valid"], summary_tokens=U)
      h, _, _ = block(jnp.concatenate([x, u], axis=1), **kwargs)
      x_out, u_out = h[:, :W], h[:, W:]
      if i == long:
        new_memory["long"], new_memory["long_valid"] = fifo_append(
            memory["long"], memory["long_valid"], self.mix_long(x_out, u_out, keep))
      new_short.append(self.mix_short[i](x_out, u_out, keep))
      if i < cfg.num_layers - 1:
        u = self.mix_summary[i](x_out, u_out, keep)
      x = x_out
    new_memory["short"] = jnp.stack(new_short, axis=1)
    new_memory["short_valid"] = jnp.ones((b,), bool)
    return x, None, new_memory

  @classmethod
  def state_bytes_per_lane(cls, cfg: MelodiConfig) -> int:
    """Bytes of model state one lane carries (all of it memory: there is no XL cache)."""
    short = 4 * cfg.num_layers * cfg.short_memory * cfg.d_model + 1
    long = 4 * cfg.long_memory_size * cfg.d_model + cfg.long_memory_size if cfg.resolved_long_layer is not None else 0
    return short + long

  @classmethod
  def flops_per_token(cls, cfg: MelodiConfig, *, seg_len: int) -> float:
    d, h, hd, n = cfg.d_model, cfg.num_heads, cfg.resolved_head_dim, cfg.num_layers
    kvh = cfg.num_kv_heads or h
    W, S, U = cfg.resolved_block_len, cfg.short_memory, cfg.summary_tokens
    q_rows, k_rows = W + U, S + W + U  # per window: queries [x; u], keys [z; x; u]
    proj = 2 * d * hd * (2 * h * q_rows + 2 * kvh * k_rows)  # q, o over the queries; k, v over the keys
    mlp = 2 * 3 * d * cfg.resolved_d_ff * q_rows
    attn = 2 * 2 * h * hd * q_rows * k_rows  # dense [W+U, S+W+U] scores and values
    mix = 2 * d * q_rows * (S + U)
    per_window = n * (proj + mlp + attn + mix) - 2 * d * q_rows * U  # no summary mixer after the last layer
    if cfg.resolved_long_layer is not None:
      M = cfg.long_memory_size
      per_window += 2 * d * 2 * kvh * hd * M  # K/V of the FIFO, recomputed every window
      per_window += 2 * 2 * h * hd * q_rows * M + 2 * d * q_rows * cfg.long_append
    return float(per_window / W + 2 * d * cfg.vocab_size)

  @classmethod
  def activation_bytes_per_token(cls, cfg: MelodiConfig, *, dtype_bytes: int) -> float:
    d, h, hd, ff, n = cfg.d_model, cfg.num_heads, cfg.resolved_head_dim, cfg.resolved_d_ff, cfg.num_layers
    W, S, U = cfg.resolved_block_len, cfg.short_memory, cfg.summary_tokens
    rows = (W + U) / W
    per_layer = ((4 * d + 4 * h * hd + 3 * ff) * dtype_bytes + h * (S + W + U) * 4) * rows
    long = 0.0
    if cfg.resolved_long_layer is not None:
      M = cfg.long_memory_size
      long = h * M * 4 * rows + (d + 2 * (cfg.num_kv_heads or h) * hd) * M * dtype_bytes / W
    return float(n * per_layer + long)
