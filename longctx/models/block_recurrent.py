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
a block that starts a document; in a block in which a document starts after
the first token, that document's tokens read the learned initial state and the
update starts from it (the tokens before the start read the carried state);
the update reads only the block's last document (`ctx.last_doc`), so nothing
of an earlier document reaches a later one.

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

State of a recurrent layer (besides its XL cache k, v): `state [batch, num_states, d_model]` float32.
The three cosine attentions are the one attention entry (layers/attention.py) with position-free blocks.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from longctx.errors import ConfigError
from longctx.layers import GatedMLP, RMSNorm, dense, l2_normalize, param, register_mixer
from longctx.layers.attention import Keys, WindowAttention, attention, project
from longctx.layers.context import Context
from longctx.models.base import pick_rows
from longctx.models.blockwise import BlockwiseConfig, BlockwiseLM, check_layer_list, resolve_layer_list
from longctx.models.registry import register_model

GATES = ("fixed", "lstm")


@dataclasses.dataclass
class BlockRecurrentConfig(BlockwiseConfig):
  layer_lists = ("recurrent_layers",)  # the dry run keeps this layer when it reduces the depth
  tiny = {"recurrent_layers": [-1], "num_states": 4, "embed_conv": 4}

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

  def layer_pattern(self) -> list[str]:
    recurrent = set(self.resolved_recurrent_layers)
    return ["recurrent_attention" if i in recurrent else "attention" for i in range(self.num_layers)]

  @property
  def resolved_recurrent_layers(self) -> tuple[int, ...]:
    return resolve_layer_list(self.recurrent_layers, self.num_layers)


# ----------------------------------------------------------------------------- pure functions


def cosine_attention(q, k, v, *, scale, q_doc=None, k_doc=None, kernel: str = "auto") -> jax.Array:
  """Attention with L2-normalised queries and keys and a learned per-head scale, position-free.

  Args:
    q: `[b, s, h, e]`; k, v: `[b, t, kv, e]`; scale: `[h]` (its absolute value is used);
    q_doc `[b, s]`, k_doc `[b, t]`: a query sees the keys of its document (None: every key).
  Returns:
    `[b, s, h, e]` in v's dtype: softmax_j(|scale_h| q^_i . k^_j) v_j over visible j.
  """
  qn = (l2_normalize(q) * jnp.abs(scale.astype(jnp.float32))[:, None]).astype(v.dtype)
  keys = Keys(l2_normalize(k).astype(v.dtype), v, doc=k_doc)
  q_doc = jnp.zeros(q.shape[:2], jnp.int32) if q_doc is None else q_doc
  return attention(qn, [keys], q_pos=jnp.zeros(q.shape[1], jnp.int32), q_doc=q_doc, kernel=kernel, scale=1.0)


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
  hidden = mlp.hidden(x)
  return dense(hidden, mlp.down[...]), hidden


@register_mixer("recurrent_attention")
class RecurrentAttention(WindowAttention):
  """The baseline's attention plus `num_states` states the tokens read and a gated update writes (module
  docstring); the token path's parameters keep the baseline's names (wq, wk, wv, wo)."""

  def __init__(self, cfg: BlockRecurrentConfig, *, layer: int, rngs: nnx.Rngs):
    d, h, e, S = cfg.d_model, cfg.num_heads, cfg.resolved_head_dim, cfg.num_states
    kvh = cfg.num_kv_heads or h
    out_scale = 1.0 / (2 * cfg.num_layers)
    scale = cfg.recurrent_scale_init or e ** 0.5
    heads_param = lambda: nnx.Param(jnp.full((h,), scale, jnp.float32), logical_axes=("heads",))
    # Token path: the baseline's attention plus queries to the states; [y_self; y_x] is projected by
    # [wo; cross_wo], both drawn with the concatenation's fan-in 2 h e.
    super().__init__(cfg, layer=layer, rngs=rngs)
    self.wo = param(rngs, (h, e, d), ("heads", "head_dim", "embed"), fan_in=2 * h * e, scale=out_scale)
    self.cross_wq = param(rngs, (d, h, e), ("embed", "heads", "head_dim"), fan_in=d)
    self.cross_wo = param(rngs, (h, e, d), ("heads", "head_dim", "embed"), fan_in=2 * h * e, scale=out_scale)
    self.cross_scale = heads_param()
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

  def init_state(self, batch_size: int) -> dict:
    cfg = self.cfg
    return {**super().init_state(batch_size),
            "state": jnp.zeros((batch_size, cfg.num_states, cfg.d_model), jnp.float32)}

  def fresh_state(self, batch_size: int) -> dict:
    state = self.init_state(batch_size)
    return {**state, "state": jnp.broadcast_to(self.initial_state[...], state["state"].shape)}

  def recur(self, xn, k, v, state, ctx: Context):
    """The tokens' reads of `state [b, S, D]` (`y_x [b, L, h, e]`) and the state's gated update."""
    cfg, dt = self.cfg, xn.dtype
    out = lambda t, w: dense(t, w[...].astype(dt), in_dims=2)
    sn = self.state_norm(state.astype(dt)) + self.state_ids[...].astype(dt)
    k_s, v_s = project(sn, self.state_wk), project(sn, self.state_wv)
    cosine = lambda q, k, v, scale, **docs: cosine_attention(q, k, v, scale=scale[...], kernel=cfg.kernel, **docs)
    y_x = cosine(project(xn, self.cross_wq), k_s, v_s, self.cross_scale)
    a_self = cosine(project(sn, self.state_wq), k_s, v_s, self.state_scale)
    last = jnp.broadcast_to(ctx.doc[:, -1:], sn.shape[:2])  # the states read the block's last document
    a_tok = cosine(project(sn, self.state_cross_wq), k, v, self.state_cross_scale, q_doc=last, k_doc=ctx.doc)
    h_s = jnp.concatenate([a_self, a_tok], axis=2)  # [b, S, 2h, e]
    new = self.state_gate(state, out(h_s, self.state_wo), h_s)
    if self.state_ffn is not None:
      y, hidden = gated_mlp_with_hidden(self.state_ffn, self.state_ffn_norm(new.astype(dt)))
      new = self.state_ffn_gate(new, y, hidden)
    return y_x, new

  def __call__(self, x, state, ctx: Context):
    """x `[b, L, D]` (the normed block); state: the XL cache and the recurrent `state [b, S, D]`."""
    q, k, v = self.qkv(x)
    y_self = self.out(self.attend(q, k, v, state, ctx))
    y_x, new = self.recur(x, k, v, state["state"], ctx)
    later = ctx.doc > 0  # tokens of a document that started inside the block read the initial state

    def from_initial():
      y_f, new_f = self.recur(x, k, v, self.fresh_state(x.shape[0])["state"], ctx)
      return jnp.where(later[:, :, None, None], y_f, y_x), pick_rows(later[:, -1], new_f, new)

    y_x, new = lax.cond(jnp.any(later), from_initial, lambda: (y_x, new))
    y = y_self + dense(y_x, self.cross_wo[...].astype(x.dtype), in_dims=2)
    return y, {**self.roll(state, k, v), "state": new}

  @classmethod
  def flops_per_token(cls, cfg: BlockRecurrentConfig, *, seg_len: int) -> float:
    d, h, e = cfg.d_model, cfg.num_heads, cfg.resolved_head_dim
    kvh = cfg.num_kv_heads or h
    S, L, ff = cfg.num_states, cfg.resolved_block_len, cfg.resolved_d_ff
    # Per token: queries to the states, their output projection, attention over S states.
    tokens = 2 * d * h * e + 2 * h * e * d + 2 * 2 * h * e * S
    # Per state and block: q, q2 (h heads) and k, v (kv heads); the [self; cross] output projection;
    # attention over S states and L tokens; the gate(s) and the optional state FFN.
    lstm = cfg.gate == "lstm"
    per_state = (2 * d * e * (2 * h + 2 * kvh) + 2 * 2 * h * e * d + 2 * 2 * h * e * (S + L)
                 + (2 * 2 * 2 * h * e * d if lstm else 0))
    if cfg.state_ffn:
      per_state += 2 * 3 * d * ff + (2 * 2 * ff * d if lstm else 0)
    return super().flops_per_token(cfg, seg_len=seg_len) + float(tokens + per_state * S / L)

  @classmethod
  def activation_bytes_per_token(cls, cfg: BlockRecurrentConfig, *, dtype_bytes: int) -> float:
    # Plus, per token, the cross queries / outputs and probabilities over S states, and the state path's
    # activations (about a layer's worth per state) amortised over the block.
    h, e, S, L = cfg.num_heads, cfg.resolved_head_dim, cfg.num_states, cfg.resolved_block_len
    tokens = 2 * h * e * dtype_bytes + h * S * 4
    per_state = (8 * h * e + 4 * cfg.d_model) * dtype_bytes + h * (S + L) * 4
    return super().activation_bytes_per_token(cfg, dtype_bytes=dtype_bytes) + float(tokens + per_state * S / L)


@register_model("block_recurrent", config=BlockRecurrentConfig,
                description="Block-Recurrent Transformer: gated recurrent states read and written per block")
class BlockRecurrent(BlockwiseLM):
  context_parallel = "ring attention for the token window (the baseline's); state reads of the tokens by XLA"
