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
tokens (the attention entry's ring, layers/attention.py). They attend over the ring of token shards and the replicated short
memory; the replicated summary tokens read each shard's tokens there and merge the partial results by
log-sum-exp. The FIFO cross attention is per query and the token mixers are sums over the token axis,
which XLA partitions (an all-reduce of `[b, O, d]` per mixer).

Gradients flow through the whole memory chain across the windows of a train
step (short memory window to window, summaries layer to layer, FIFO entries);
as in meliad there is no stop_gradient; the trainer stops them between steps.
The long memory's K/V are recomputed from the stored embeddings with the
current weights, so Wk/Wv/norm still learn from entries written in earlier steps.

Memory, float32, every leaf lane-first, in the state of each layer (`state["blocks"][l]`):
  short        `[b, S, d]`  the layer's short-term memory (embeddings, not K/V); it holds a window of the
                            current document once the document has a token before the window (`ctx.start > 0`)
  long         `[b, M, d]`  the FIFO, oldest first (the long-term layer only; none when long_memory_size = 0)
  long_valid   `[b, M]` bool
Bytes per lane: 4 (n S d + M d) + M, plus the shell's 4-byte position (`Melodi.state_bytes_per_lane`). At the
reference's scale (n 12, d 1024, S 64, M 4096) that is 19.9 MB, against 587 MB (29x)
for a Memorizing Transformer with 64K (key, value) pairs of 8 heads x 128 in one
layer plus its 12 x 512-token XL cache (our `memorizing` state, float32). S192+A32,
S128+A64 and S192+A96 with a 128-window span (configurations the paper is reported
to compare) give 22x, 15x and 10x by this count; the paper's abstract claims 8x with
its own accounting, which is not reproduced here.

Documents: memory is visible to tokens of document 0 only (the one the memory is of), so a document
starting inside a window reads nothing of the one before it; the window's writes (short memory,
summaries, FIFO entries) see only its last document's tokens, and its FIFO entries go into an empty
FIFO when that document is new.

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
  * Writes use the window's last document only (`ctx.last_doc`), our document convention.
  * The FIFO's K/V are recomputed from its embeddings in every window (meliad: once
    per segment, then appended); same values, since the state holds embeddings only.

Defaults are small (W = window = 128, S = U 32, M 512, A 16: a 32-window FIFO span). The
reference gin (base_melodi.gin) uses W 512, S = U 64, M 4096, A 32 (128 windows,
65,536 tokens), long layer 6 of 12; the paper reportedly also runs S 128-192 and
A 32-96 with a 128-window span (not checked against the paper's text).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from longctx.errors import ConfigError
from longctx.layers import Block, Mixer, RMSNorm, param, register_mixer
from longctx.layers.attention import AttentionProjections, Keys, attention, project, rotary
from longctx.layers.context import Context
from longctx.models.base import LM, pick_rows
from longctx.models.blockwise import BlockwiseConfig, BlockwiseLM
from longctx.models.registry import register_model


@dataclasses.dataclass
class MelodiConfig(BlockwiseConfig):
  layer_indices = ("long_layer",)  # the dry run keeps this layer when it reduces the depth
  mixer = "melodi"
  tiny = {"window": 16, "short_memory": 4, "summary_tokens": 4, "long_memory_size": 8, "long_append": 2}

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


class MelodiBlock(Block):
  """The baseline's block over [x; u], then the layer's writes: its short memory, the FIFO (long layer), and
  the next layer's summary tokens.

  The hidden stream between layers is `[x; u]` `[b, W+U, d]`: the window's tokens and its summary tokens.
  State: short `[b, S, d]`, and long `[b, M, d]`, long_valid `[b, M]` in the long-term layer.
  """

  def __init__(self, cfg: MelodiConfig, mixer: "MelodiAttention", *, rngs: nnx.Rngs):
    super().__init__(cfg, mixer, rngs=rngs)
    self.cfg = cfg
    S, U, layer = cfg.short_memory, cfg.summary_tokens, mixer.layer
    self.mix_short = TokenMixing(cfg, S, norm_residual=S == U, rngs=rngs)
    # meliad computes a summary after the last layer too, and discards it: none here.
    self.mix_summary = TokenMixing(cfg, U, norm_residual=True, rngs=rngs) if layer < cfg.num_layers - 1 else None
    self.mix_long = (TokenMixing(cfg, cfg.long_append, norm_residual=False, rngs=rngs)
                     if layer == cfg.resolved_long_layer else None)

  def init_state(self, batch_size: int) -> dict:
    cfg = self.cfg
    state = {"short": jnp.zeros((batch_size, cfg.short_memory, cfg.d_model), jnp.float32)}
    if self.mix_long is not None:
      state["long"] = jnp.zeros((batch_size, cfg.long_memory_size, cfg.d_model), jnp.float32)
      state["long_valid"] = jnp.zeros((batch_size, cfg.long_memory_size), bool)
    return state

  def fresh_state(self, batch_size: int) -> dict:
    return self.init_state(batch_size)

  def __call__(self, h, state, ctx: Context):
    W, dt = ctx.doc.shape[1], h.dtype
    long = None
    if self.mix_long is not None:
      long = (self.norm(state["long"].astype(dt)), state["long_valid"])
    h = h + self.mixer.attend(self.norm(h), self.norm(state["short"].astype(dt)), ctx, long=long)
    h = h + self.mlp(self.mlp_norm(h))
    x, u = h[:, :W], h[:, W:]
    keep = ctx.last_doc
    new = {"short": self.mix_short(x, u, keep)}
    if self.mix_long is not None:  # a document new in this window appends to an empty FIFO
      fresh = self.init_state(h.shape[0])
      base = pick_rows(ctx.doc[:, -1] > 0, (fresh["long"], fresh["long_valid"]), (state["long"], state["long_valid"]))
      new["long"], new["long_valid"] = fifo_append(*base, self.mix_long(x, u, keep))
    u = self.mix_summary(x, u, keep) if self.mix_summary is not None else u
    return jnp.concatenate([x, u], axis=1), new


@register_mixer("melodi")
class MelodiAttention(AttentionProjections, Mixer):
  """The baseline's projections; queries [tokens; summary] over keys [short memory; tokens; summary], and in
  the long-term layer a gated cross attention over the FIFO (same projections)."""

  block_class = MelodiBlock

  def __init__(self, cfg: MelodiConfig, *, layer: int, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    self.cfg, self.layer = cfg, layer
    self.long_gate = (param(rngs, (cfg.num_heads, cfg.resolved_head_dim), ("heads", "head_dim"), fan_in=1,
                            scale=0.25 ** 2) if layer == cfg.resolved_long_layer else None)

  def attend(self, xn, memory, ctx: Context, *, long=None):
    """xn `[b, W+U, d]` and the short memory `[b, S, d]` (both normed); long: None or (the normed FIFO
    `[b, M, d]`, its validity `[b, M]`). Returns the layer's attention output `[b, W+U, d]`."""
    cfg = self.cfg
    S, W, U = memory.shape[1], ctx.doc.shape[1], cfg.summary_tokens
    b = xn.shape[0]
    rot = lambda t, p: rotary(t, p, base=cfg.rope_base)
    q = project(xn, self.wq)
    kv_in = jnp.concatenate([memory.astype(xn.dtype), xn], axis=1)
    k, v = project(kv_in, self.wk), project(kv_in, self.wv)
    pos_z, pos_x, pos_u = jnp.arange(S), S + jnp.arange(W), S + W + jnp.arange(U)
    u_doc = jnp.broadcast_to(ctx.doc[:, -1:], (b, U))  # summary tokens: the window's last document
    z_doc = jnp.broadcast_to(jnp.where(ctx.start > 0, 0, -1)[:, None], (b, S))  # memory of document 0, if any yet
    short = Keys(rot(k[:, :S], pos_z), v[:, :S], pos=pos_z, doc=z_doc)
    tokens = Keys(rot(k[:, S:S + W], pos_x), v[:, S:S + W], pos=pos_x, doc=ctx.doc, sharded=True)
    summary = Keys(rot(k[:, S + W:], pos_u), v[:, S + W:], pos=pos_u, doc=u_doc)
    run = lambda q, blocks, **kw: attention(q, blocks, kernel=cfg.kernel,
                                            block_size=cfg.attention_block or None, **kw)
    y = jnp.concatenate([
        run(rot(q[:, :W], pos_x), [short, tokens], q_pos=pos_x, q_doc=ctx.doc, q_sharded=True),
        run(rot(q[:, W:], pos_u), [short, summary, tokens], q_pos=pos_u, q_doc=u_doc)], axis=1)
    if long is not None:  # unrotated queries over the FIFO's valid entries, document 0 only
      fifo, valid = long
      fifo = Keys(project(fifo, self.wk), project(fifo, self.wv), doc=jnp.where(valid, 0, -1))
      y_long = run(q, [fifo], q_pos=jnp.zeros(W + U, jnp.int32), q_doc=jnp.concatenate([ctx.doc, u_doc], axis=1))
      alpha = jax.nn.sigmoid(self.long_gate[...].astype(jnp.float32))
      y = (alpha * y.astype(jnp.float32) + (1 - alpha) * y_long.astype(jnp.float32)).astype(xn.dtype)
    return self.out(y)

  @classmethod
  def reach(cls, cfg) -> int:
    return cfg.resolved_block_len  # the window's own tokens (no XL cache)


@register_model("melodi", config=MelodiConfig,
                description="MELODI: per-layer short-term compression memory + gated long-term FIFO in one layer")
class Melodi(BlockwiseLM):
  context_parallel = ("ring attention for the window's tokens; short memory and summary tokens replicated, "
                      "the summary's reads of the tokens merged by lse (FIFO reads and token mixing by XLA)")

  def __init__(self, cfg: MelodiConfig, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    self.summary_tokens = param(rngs, (cfg.summary_tokens, cfg.d_model), ("memory", "embed"), fan_in=cfg.d_model)

  def forward_step(self, x, state, ctx: Context):
    """The window's tokens with the learned summary tokens through every layer; the summaries are dropped after."""
    b, W, d = x.shape
    u = jnp.broadcast_to(self.summary_tokens[...].astype(x.dtype), (b, self.cfg.summary_tokens, d))
    h, state = LM.forward_step(self, jnp.concatenate([x, u], axis=1), state, ctx)
    return h[:, :W], state

  @classmethod
  def state_bytes_per_lane(cls, cfg: MelodiConfig) -> int:
    """Bytes of model state one lane carries (all of it memory, and the shell's position: no XL cache)."""
    short = 4 * cfg.num_layers * cfg.short_memory * cfg.d_model
    long = 4 * cfg.long_memory_size * cfg.d_model + cfg.long_memory_size if cfg.resolved_long_layer is not None else 0
    return short + long + 4

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
    return float(per_window / W + 2 * d * cfg.vocab_size + 2 * cfg.embed_conv * d)

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
