"""Block-Recurrent Transformer (Hutchins et al. 2022), on the baseline's layers.

The model reads a segment as blocks of `block_len` tokens with a Transformer-XL
cache (`blockwise.py`). Every layer is the baseline's pre-norm block except the
layers in `recurrent_layers`, which also carry `num_states` state vectors from
one block to the next: the tokens read the states (vertical direction) and the
states read the tokens (horizontal direction), as an LSTM cell over blocks.

Shapes: b batch rows, L block tokens, W window, S num_states, h query heads,
kv kv heads (h a multiple of kv; grouped-query attention everywhere), e
head_dim, D d_model, F d_ff.

Cosine attention (every recurrent attention; meliad's `normalize_keys`), with a
learned per-head scale c `[h]`, initialised to `recurrent_scale_init`:
    att_c(q, k, v, mask)_i = sum_j softmax_j(|c| q^_i . k^_j over visible j) v_j,   x^ = x / |x|

Recurrent layer, per block; x `[b, L, D]` the layer input, s `[b, S, D]` the
state (float32, one per row), P `[S, D]` learned state IDs:
  Token path (vertical; a residual block):
    x~      = RMSNorm(x)
    y_self, k, v = the baseline's attention of x~: sliding window over
              [XL cache; block], rotary positions; k, v `[b, L, kv, e]` unrotated
    s~      = RMSNorm_s(s) + P                                            `[b, S, D]`
    k_s = s~ Wk_s, v_s = s~ Wv_s  `[b, S, kv, e]`;  q_s = s~ Wq_s, q2_s = s~ Wq2_s  `[b, S, h, e]`
    y_x     = att_{c_x}(x~ Wq2, k_s, v_s, all states)      tokens read the OLD state  `[b, L, h, e]`
    x'      = x + [y_self; y_x] Wo     (Wo = [Wo_self; Wo_cross], `[2h, e, D]`)
    out     = x' + GatedMLP(RMSNorm(x'))
  State path (horizontal; gated instead of residual):
    a_self  = att_{c_ss}(q_s, k_s, v_s, all states)                        `[b, S, h, e]`
    a_tok   = att_{c_st}(q2_s, k, v, last_doc)   the block's tokens of its last document only,
              position-free (unrotated k)                                  `[b, S, h, e]`
    h_s     = [a_self; a_tok]                                              `[b, S, 2h, e]`
    z       = h_s Wo_s                                                     `[b, S, D]`
    s'      = gate(s, z, h_s)
    with state_ffn: s' = gate_ffn(s', GatedMLP_s(RMSNorm(s')), its hidden `[b, S, F]`)
  Gates (per channel, as meliad's `nn_components.MLP._gate`), h the gate's
  hidden input (h_s flattened to `[b, S, 2 h e]`, or the FFN hidden):
    "fixed" (meliad "bias"): g = sigmoid(b_g)  `[D]`;         s' = s * g + z * (1 - g)
    "lstm":                  f = sigmoid(h W_f + b_f + 1),
                             i = sigmoid(h W_i + b_i - 1);    s' = s * f + z * i
  The token path reads the state the block starts with; the state written by a
  block is read by the next block (so the logits of a block never depend on its
  own state update, and reading whole blocks keeps segment invariance).

Initialisation (meliad): initial state N(0, 0.1) `[S, D]` per recurrent layer
(a learned parameter; a document starts from it), state IDs N(0, 1), gate
biases N(0, 0.1), LSTM gate kernels with variance 0.1 / fan_in.

Documents (`blockwise.py`): the state is reset to the learned initial state at
a block that starts a document, and replaced by it for a block in which a
document starts after the first token; the state update reads only the
block's last document (`last_doc_mask`), so nothing of an earlier document
reaches a later one.

Paper vs meliad (`transformer/memory/transformer_layer.py`), where they differ
this code follows the paper:
  * The states cross-attend to the current block's tokens (paper, Fig. 1 and
    section 3); meliad's states attend to the keys after the XL concatenation,
    i.e. [previous window; current window].
Choices of this code base (not in either):
  * The token self-attention is the baseline's (rotary, q.k / sqrt(e)); only
    the three recurrent attentions use normalised keys and queries. meliad
    normalises every attention and uses T5 relative position biases.
  * Scales start at `recurrent_scale_init` (0 = sqrt(head_dim), as the
    Memorizing layer here); meliad starts them at 1.
  * Feed-forwards are the baseline's SwiGLU (meliad: ReLU MLP); no biases in
    projections (meliad's attention-output layers have none either); no
    dropout; no feedback of the state to other layers (meliad's
    `feedback_recurrence`, off in its recommended configs).
  * The state IDs are added to the normalised state at every block (meliad:
    after the pre-attention LayerNorm); they never accumulate into s.

Memory (state["memory"]): `[batch, num_recurrent_layers, num_states, d_model]`
float32, in the order of `resolved_recurrent_layers`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from longctx.errors import ConfigError
from longctx.layers import GatedMLP, RMSNorm, l2_normalize, masked_attention, param
from longctx.models.blockwise import (BlockwiseConfig, BlockwiseLM, check_layer_list, last_doc_mask,
                                      resolve_layer_list)
from longctx.models.registry import register_model
from longctx.models.transformer import Attention, Block, Embedding

GATES = ("fixed", "lstm")


@dataclasses.dataclass
class BlockRecurrentConfig(BlockwiseConfig):
  layer_lists = ("recurrent_layers",)  # the dry run keeps this layer when it reduces the depth
  name: str = "block_recurrent"
  recurrent_layers: list[int] = dataclasses.field(default_factory=lambda: [-2])  # negative from the top
  num_states: int = 64  # S: state vectors per recurrent layer (512 in the paper)
  gate: str = "fixed"  # "fixed" (meliad "bias") or "lstm"
  state_ffn: bool = False  # gated feed-forward on the state after the attention (meliad's "dual"; "skip" = False)
  recurrent_scale_init: float = 0.0  # initial scale of the cosine attentions (0 = sqrt(head_dim); meliad: 1)

  def validate(self) -> None:
    super().validate()
    check_layer_list("recurrent_layers", self.recurrent_layers, self.num_layers)
    if self.num_states < 1:
      raise ConfigError(f"model.num_states={self.num_states} must be >= 1")
    if self.gate not in GATES:
      raise ConfigError(f"model.gate={self.gate!r} is not one of {GATES}")
    if self.recurrent_scale_init < 0:
      raise ConfigError(f"model.recurrent_scale_init={self.recurrent_scale_init} must be >= 0 "
                        "(0 = sqrt(head_dim))")

  @property
  def resolved_recurrent_layers(self) -> tuple[int, ...]:
    return resolve_layer_list(self.recurrent_layers, self.num_layers)


# ----------------------------------------------------------------------------- pure functions


def cosine_attention(q, k, v, mask, *, scale) -> jax.Array:
  """Attention with L2-normalised queries and keys and a learned per-head scale.

  Args:
    q: `[b, s, h, e]`; k, v: `[b, t, kv, e]`; mask: `[b, s, t]` bool; scale: `[h]` (its absolute value is used).
  Returns:
    `[b, s, h, e]` in v's dtype: softmax_j(|scale_h| q^_i . k^_j) v_j over visible j.
  """
  qn = l2_normalize(q) * jnp.abs(scale.astype(jnp.float32))[:, None]
  kn = l2_normalize(k)
  return masked_attention(qn.astype(v.dtype), kn.astype(v.dtype), v, mask, scale=1.0)


def fixed_gate(state, update, *, bias) -> jax.Array:
  """g = sigmoid(bias) `[D]`; `state * g + update * (1 - g)` (float32)."""
  g = jax.nn.sigmoid(bias.astype(jnp.float32))
  return state.astype(jnp.float32) * g + update.astype(jnp.float32) * (1 - g)


def lstm_gate(state, update, hidden, *, w_input, b_input, w_forget, b_forget) -> jax.Array:
  """f = sigmoid(h W_f + b_f + 1), i = sigmoid(h W_i + b_i - 1); `state * f + update * i` (float32).

  Args:
    state, update: `[..., D]`; hidden h: `[..., n]`; w_*: `[n, D]`; b_*: `[D]`.
  """
  h = hidden.astype(jnp.float32)
  f = jax.nn.sigmoid(h @ w_forget.astype(jnp.float32) + b_forget.astype(jnp.float32) + 1.0)
  i = jax.nn.sigmoid(h @ w_input.astype(jnp.float32) + b_input.astype(jnp.float32) - 1.0)
  return state.astype(jnp.float32) * f + update.astype(jnp.float32) * i


def normal_param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], *, std: float) -> nnx.Param:
  """A float32 parameter drawn from N(0, std^2) (not truncated), tagged with logical `axes`."""
  return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32), logical_axes=axes)


def all_visible(b: int, s: int, t: int) -> jax.Array:
  return jnp.ones((b, s, t), bool)


# ----------------------------------------------------------------------------- layers


class FixedGate(nnx.Module):
  """meliad's "bias" gate: a learned per-channel bias, no dependence on the input."""

  def __init__(self, d_model: int, hidden_shape: tuple[int, ...], hidden_axes: tuple[str, ...], *,
               rngs: nnx.Rngs):
    del hidden_shape, hidden_axes
    self.bias = normal_param(rngs, (d_model,), ("embed",), std=0.1)

  def __call__(self, state, update, hidden):
    del hidden
    return fixed_gate(state, update, bias=self.bias[...])


class LSTMGate(nnx.Module):
  """meliad's "lstm" gate: input and forget gates computed from the hidden input `[..., *hidden_shape]`."""

  def __init__(self, d_model: int, hidden_shape: tuple[int, ...], hidden_axes: tuple[str, ...], *,
               rngs: nnx.Rngs):
    n = 1
    for size in hidden_shape:
      n *= size
    shape, axes = (*hidden_shape, d_model), (*hidden_axes, "embed")
    self.w_input = param(rngs, shape, axes, fan_in=n, scale=0.1)
    self.b_input = normal_param(rngs, (d_model,), ("embed",), std=0.1)
    self.w_forget = param(rngs, shape, axes, fan_in=n, scale=0.1)
    self.b_forget = normal_param(rngs, (d_model,), ("embed",), std=0.1)

  def __call__(self, state, update, hidden):
    d = state.shape[-1]
    lead = hidden.shape[:state.ndim - 1]
    return lstm_gate(state, update, hidden.reshape(*lead, -1), w_input=self.w_input[...].reshape(-1, d),
                     b_input=self.b_input[...], w_forget=self.w_forget[...].reshape(-1, d),
                     b_forget=self.b_forget[...])


GATE_CLASSES = {"fixed": FixedGate, "lstm": LSTMGate}


def gated_mlp_with_hidden(mlp: GatedMLP, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The baseline's SwiGLU on `x [b, s, D]`, also returning its hidden `silu(x W_g) * (x W_u)` `[b, s, F]`."""
  g = jnp.einsum("bsd,df->bsf", x, mlp.gate[...].astype(x.dtype))
  u = jnp.einsum("bsd,df->bsf", x, mlp.up[...].astype(x.dtype))
  hidden = jax.nn.silu(g) * u
  return jnp.einsum("bsf,fd->bsd", hidden, mlp.down[...].astype(x.dtype)), hidden


class RecurrentBlock(nnx.Module):
  """A pre-norm block whose attention also reads `num_states` states, and the states' gated update.

  Token-path parameters keep the baseline `Block`'s names (attn_norm, attn, mlp_norm, mlp).
  """

  def __init__(self, cfg: BlockRecurrentConfig, *, rngs: nnx.Rngs):
    d, h, e, S = cfg.d_model, cfg.num_heads, cfg.resolved_head_dim, cfg.num_states
    kvh = cfg.num_kv_heads or h
    out_scale = 1.0 / (2 * cfg.num_layers)
    scale = cfg.recurrent_scale_init or e ** 0.5
    heads_param = lambda: nnx.Param(jnp.full((h,), scale, jnp.float32), logical_axes=("heads",))
    # Token path: the baseline's attention plus queries to the states; [y_self; y_x] is projected by
    # [attn.wo; cross_wo], both drawn with the concatenation's fan-in 2 h e.
    self.attn_norm = RMSNorm(d, eps=cfg.norm_eps)
    self.attn = Attention(cfg, rngs=rngs)
    self.attn.wo = param(rngs, (h, e, d), ("heads", "head_dim", "embed"), fan_in=2 * h * e, scale=out_scale)
    self.cross_wq = param(rngs, (d, h, e), ("embed", "heads", "head_dim"), fan_in=d)
    self.cross_wo = param(rngs, (h, e, d), ("heads", "head_dim", "embed"), fan_in=2 * h * e, scale=out_scale)
    self.cross_scale = heads_param()
    self.mlp_norm = RMSNorm(d, eps=cfg.norm_eps)
    self.mlp = GatedMLP(d, cfg.resolved_d_ff, rngs=rngs, out_scale=out_scale)
    # State path.
    self.initial_state = normal_param(rngs, (S, d), ("state", "embed"), std=0.1)
    self.state_ids = normal_param(rngs, (S, d), ("state", "embed"), std=1.0)
    self.state_norm = RMSNorm(d, eps=cfg.norm_eps)
    self.state_wq = param(rngs, (d, h, e), ("embed", "heads", "head_dim"), fan_in=d)
    self.state_wk = param(rngs, (d, kvh, e), ("embed", "kv_heads", "head_dim"), fan_in=d)
    self.state_wv = param(rngs, (d, kvh, e), ("embed", "kv_heads", "head_dim"), fan_in=d)
    self.state_cross_wq = param(rngs, (d, h, e), ("embed", "heads", "head_dim"), fan_in=d)
    self.state_wo = param(rngs, (2 * h, e, d), ("heads", "head_dim", "embed"), fan_in=2 * h * e)
    self.state_scale = heads_param()
    self.state_cross_scale = heads_param()
    gate_cls = GATE_CLASSES[cfg.gate]
    self.state_gate = gate_cls(d, (2 * h, e), ("heads", "head_dim"), rngs=rngs)
    if cfg.state_ffn:
      self.state_ffn_norm = RMSNorm(d, eps=cfg.norm_eps)
      self.state_ffn = GatedMLP(d, cfg.resolved_d_ff, rngs=rngs)
      self.state_ffn_gate = gate_cls(d, (cfg.resolved_d_ff,), ("mlp",), rngs=rngs)
    else:
      self.state_ffn = None

  def __call__(self, x, *, state, cache_k, cache_v, q_doc, k_doc):
    """x `[b, L, D]`; state `[b, S, D]` float32; cache `[b, W, kv, e]`; q_doc `[b, L]`, k_doc `[b, W + L]`.

    Returns the output `[b, L, D]`, the block's unrotated k, v `[b, L, kv, e]` and the next state
    `[b, S, D]` float32.
    """
    dt = x.dtype
    b, L, _ = x.shape
    S = state.shape[1]
    proj = lambda t, w: jnp.einsum("bsd,dhk->bshk", t, w[...].astype(dt))
    out = lambda t, w: jnp.einsum("bshk,hkd->bsd", t, w[...].astype(dt))
    # Token path.
    xn = self.attn_norm(x)
    y_self, k, v = self.attn(xn, cache_k=cache_k, cache_v=cache_v, q_doc=q_doc, k_doc=k_doc)
    sn = self.state_norm(state.astype(dt)) + self.state_ids[...].astype(dt)
    k_s, v_s = proj(sn, self.state_wk), proj(sn, self.state_wv)
    y_x = cosine_attention(proj(xn, self.cross_wq), k_s, v_s, all_visible(b, L, S), scale=self.cross_scale[...])
    x = x + y_self + out(y_x, self.cross_wo)
    x = x + self.mlp(self.mlp_norm(x))
    # State path.
    a_self = cosine_attention(proj(sn, self.state_wq), k_s, v_s, all_visible(b, S, S), scale=self.state_scale[...])
    tok_mask = jnp.broadcast_to(last_doc_mask(q_doc)[:, None, :], (b, S, L))
    a_tok = cosine_attention(proj(sn, self.state_cross_wq), k, v, tok_mask, scale=self.state_cross_scale[...])
    h_s = jnp.concatenate([a_self, a_tok], axis=2)  # [b, S, 2h, e]
    new_state = self.state_gate(state, out(h_s, self.state_wo), h_s)
    if self.state_ffn is not None:
      y, hidden = gated_mlp_with_hidden(self.state_ffn, self.state_ffn_norm(new_state.astype(dt)))
      new_state = self.state_ffn_gate(new_state, y, hidden)
    return x, k, v, new_state


@register_model("block_recurrent", config=BlockRecurrentConfig,
                description="Block-Recurrent Transformer: gated recurrent states read and written per block")
class BlockRecurrent(BlockwiseLM):
  context_parallel = "ring attention for the token window (the baseline's); state reads of the tokens by XLA"

  def __init__(self, cfg: BlockRecurrentConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    rec = set(cfg.resolved_recurrent_layers)
    self.embedding = Embedding(cfg, rngs=rngs)
    self.blocks = nnx.List([RecurrentBlock(cfg, rngs=rngs) if i in rec else Block(cfg, rngs=rngs)
                            for i in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)

  def init_memory(self, batch_size: int):
    cfg = self.cfg
    shape = (batch_size, len(cfg.resolved_recurrent_layers), cfg.num_states, cfg.d_model)
    return jnp.zeros(shape, jnp.float32)

  def fresh_memory(self, memory):
    init = jnp.stack([self.blocks[i].initial_state[...] for i in self.cfg.resolved_recurrent_layers])
    return jnp.broadcast_to(init, memory.shape).astype(memory.dtype)

  def forward_block(self, x, *, memory, caches, q_doc, k_doc):
    slot = {layer: r for r, layer in enumerate(self.cfg.resolved_recurrent_layers)}
    new_states = [None] * len(slot)
    new_kv = []
    h = x
    for i, (block, (ck, cv)) in enumerate(zip(self.blocks, caches)):
      if i in slot:
        h, k, v, new_states[slot[i]] = block(h, state=memory[:, slot[i]], cache_k=ck, cache_v=cv,
                                             q_doc=q_doc, k_doc=k_doc)
      else:
        h, k, v = block(h, cache_k=ck, cache_v=cv, q_doc=q_doc, k_doc=k_doc)
      new_kv.append((k, v))
    return h, new_kv, jnp.stack(new_states, axis=1)

  @classmethod
  def flops_per_token(cls, cfg: BlockRecurrentConfig, *, seg_len: int) -> float:
    d, h, e, n = cfg.d_model, cfg.num_heads, cfg.resolved_head_dim, cfg.num_layers
    kvh = cfg.num_kv_heads or h
    S, L, ff = cfg.num_states, cfg.resolved_block_len, cfg.resolved_d_ff
    base = n * (2 * d * e * (2 * h + 2 * kvh) + 2 * 3 * d * ff + 2 * 2 * h * e * cfg.window) + 2 * d * cfg.vocab_size
    # Per token and recurrent layer: queries to the states, their output projection, attention over S states.
    tokens = 2 * d * h * e + 2 * h * e * d + 2 * 2 * h * e * S
    # Per state and block: q, q2 (h heads) and k, v (kv heads); the [self; cross] output projection;
    # attention over S states and L tokens; the gate(s) and the optional state FFN.
    lstm = cfg.gate == "lstm"
    per_state = (2 * d * e * (2 * h + 2 * kvh) + 2 * 2 * h * e * d + 2 * 2 * h * e * (S + L)
                 + (2 * 2 * 2 * h * e * d if lstm else 0))
    if cfg.state_ffn:
      per_state += 2 * 3 * d * ff + (2 * 2 * ff * d if lstm else 0)
    return float(base + len(cfg.resolved_recurrent_layers) * (tokens + per_state * S / L))

  @classmethod
  def activation_bytes_per_token(cls, cfg: BlockRecurrentConfig, *, dtype_bytes: int) -> float:
    # Plus, per recurrent layer and token, the cross queries / outputs and probabilities over S states,
    # and the state path's activations (about a layer's worth per state) amortised over the block.
    h, e, S, L = cfg.num_heads, cfg.resolved_head_dim, cfg.num_states, cfg.resolved_block_len
    tokens = 2 * h * e * dtype_bytes + h * S * 4
    per_state = (8 * h * e + 4 * cfg.d_model) * dtype_bytes + h * (S + L) * 4
    extra = len(cfg.resolved_recurrent_layers) * (tokens + per_state * S / L)
    return super().activation_bytes_per_token(cfg, dtype_bytes=dtype_bytes) + float(extra)
