"""mLSTM, the matrix-memory cell of xLSTM (Beck et al. 2024), in the xLSTM 7B layer (Beck et al. 2025).

Per layer, H heads of dk = qk_factor x d_model / H query/key channels and dv = v_factor x d_model / H value
channels, with exponential input gates and sigmoid forget gates (pre-activations soft-capped at `gate_cap`):

    q, k, v, o~   = x W_q, x W_k, x W_v, x W_o~;   i~, f~ = cap(x W_i + b_i), cap(x W_f + b_f)   one per head
    C_t = f_t C_{t-1} + i_t k_t^T v_t;    n_t = f_t n_{t-1} + i_t k_t;    f_t = sigmoid(f~_t), i_t = exp(i~_t)
    h_t = (q_t C_t) / (max(|q_t n_t|, 1) + eps exp(m_t)),   q_t scaled by 1 / sqrt(dk)
    y   = W_out (LayerNorm_head(h) * sigmoid(o~))

The paper computes it stabilised: C, n and the gates divided by exp(m_t), m_t = max(log f_t + m_{t-1}, i~_t),
so that exp(i~) cannot overflow. With the soft cap, i_t <= e^15 and m_t <= 15, so float32 holds the
unstabilised C and n (a million tokens of e^15-scaled writes stay below 1e13), and the stabilised form's
output is exactly the one above, m_t entering only through its eps term. That makes the cell one pass of
the chunked linear recurrence (`longctx.kernels.linear_recurrence`): per-head decay log f_t, keys scaled
by i_t, and values [v, 1] so that the state's last column is n and the read's last channel is q n.
m_t itself is a running max (a segmented cumulative max over each document, `stabilizer`). A document
starting inside a segment starts from C = n = 0, m = 0, as the reference does for a fresh sequence.

The layer is Hugging Face's `xLSTMLayer` (transformers' xLSTM, the xLSTM 7B architecture), tested against
it with the same weights, and its init (gate weights 0, input-gate bias -10, forget-gate biases 3..6 over
the heads, small-init projections, Wang-init output). The block around it is the zoo's pre-RMSNorm residual
block with the gated MLP, which is xLSTM 7B's block too.

Hugging Face interop (`longctx export --format hf`, `longctx import-hf`): `xLSTMForCausalLM` with
weight_mode "single", no biases, the output norm, an untied head and the output-logit soft cap
(`model.logit_cap`, 30 as xLSTM 7B; Hugging Face's config has no "off", so export needs a cap > 0).

State per layer (float32):
  s: [batch, H, dk, dv + 1]   C and, in the last column, n (unstabilised)
  m: [batch, H]               the stabiliser of the last token (for the eps term)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from longctx.config import WidthFactorConfig
from longctx.errors import ConfigError
from longctx.layers import Mixer, dense, param, register_mixer, soft_cap
from longctx.layers.attention import project
from longctx.layers.context import Context
from longctx.layers.recurrence import recurrence
from longctx.models import hf
from longctx.models.base import LM
from longctx.models.registry import register_model


@dataclasses.dataclass
class MLSTMConfig(WidthFactorConfig):
  mixer = "mlstm"
  width_factors = ("qk_factor", "v_factor")
  tiny = {"num_heads": 2, "chunk_size": 8}

  name: str = "mlstm"
  qk_factor: float = 0.5  # dk x heads = qk_factor x d_model (xLSTM 7B)
  v_factor: float = 1.0  # dv x heads = v_factor x d_model
  gate_cap: float = 15.0  # soft cap of the gate pre-activations: cap * tanh(x / cap) (> 0: the unstabilised form needs it)
  eps: float = 1e-6  # of the output's denominator
  chunk_size: int = 64
  logit_cap: float = 30.0  # xLSTM 7B's soft cap of the output logits (the shell's model.logit_cap)
  tie_embeddings: bool = False  # xLSTM 7B's head is its own

  def validate(self) -> None:
    super().validate()
    if self.chunk_size < 1:
      raise ConfigError(f"model.chunk_size={self.chunk_size} must be >= 1")
    if not 0 < self.gate_cap <= 30:
      raise ConfigError(f"model.gate_cap={self.gate_cap} must be in (0, 30]: the input gate exp(i~) <= "
                        "exp(gate_cap) is accumulated unstabilised in float32")
    if not self.eps > 0:
      raise ConfigError(f"model.eps={self.eps} must be > 0")


def segmented_scan(op, x, doc):
  """Inclusive scan of `op` along axis 1 of `x [batch, seq, ...]`, restarting where `doc [batch, seq]` changes."""
  doc = jnp.broadcast_to(doc.reshape(doc.shape + (1,) * (x.ndim - 2)), x.shape)

  def combine(a, b):
    return b[0], jnp.where(a[0] == b[0], op(a[1], b[1]), b[1])

  return lax.associative_scan(combine, (doc, x), axis=1)[1]


def stabilizer(log_f, log_i, doc, m0):
  """m_t = max(log f_t + m_{t-1}, log i_t) per head from m_{-1} = m0 (`[batch, H]`) for the first document and
  0 for every later one: `log_f, log_i [batch, seq, H]` -> `[batch, seq, H]`.

  Unrolled, m_t = F_t + max(start, max_{j <= t} (log i_j - F_j)) with F the document's cumulative log f."""
  cum_f = segmented_scan(jnp.add, log_f, doc)
  peak = segmented_scan(jnp.maximum, log_i - cum_f, doc)
  start = jnp.where((doc == doc[:, :1])[..., None], m0[:, None], 0.0)
  return cum_f + jnp.maximum(start, peak)


def mlstm_cell(q, k, v, i_pre, f_pre, *, segment_ids, state, eps, kernel, chunk_size):
  """The cell over one segment.

  Args:
    q, k: `[batch, seq, H, dk]`; v `[batch, seq, H, dv]`; i_pre, f_pre `[batch, seq, H]` (soft-capped).
    segment_ids: `[batch, seq]`; state {"s": `[batch, H, dk, dv + 1]`, "m": `[batch, H]`}.
  Returns:
    `h [batch, seq, H, dv]` float32 and the new state.
  """
  f32 = lambda t: t.astype(jnp.float32)
  log_f = jax.nn.log_sigmoid(f32(f_pre))
  m = stabilizer(log_f, f32(i_pre), segment_ids, state["m"])
  q = f32(q) / math.sqrt(q.shape[-1])
  k = f32(k) * jnp.exp(f32(i_pre))[..., None]
  v1 = jnp.concatenate([f32(v), jnp.ones(v.shape[:-1] + (1,), jnp.float32)], axis=-1)
  o, s = recurrence(q, k, v1, log_decay=log_f, segment_ids=segment_ids, initial_state=state["s"], kernel=kernel,
                    chunk_size=chunk_size)
  h = o[..., :-1] / (jnp.maximum(jnp.abs(o[..., -1:]), 1.0) + eps * jnp.exp(m)[..., None])
  return h, {"s": s, "m": m[:, -1]}


@register_mixer("mlstm")
class MLSTMLayer(Mixer):
  """`x [batch, seq, d_model]` + {"s", "m"} -> output, new state."""

  def __init__(self, cfg: MLSTMConfig, *, layer: int, rngs: nnx.Rngs):
    d, h, dk, dv = cfg.d_model, cfg.num_heads, cfg.key_dim, cfg.value_dim
    self.cfg = cfg
    small = dict(fan_in=d, scale=0.4)  # N(0, 2 / (5 d)): xLSTM 7B's small init
    self.wq = param(rngs, (d, h, dk), ("embed", "heads", "head_dim"), **small)
    self.wk = param(rngs, (d, h, dk), ("embed", "heads", "head_dim"), **small)
    self.wv = param(rngs, (d, h, dv), ("embed", "heads", "head_dim"), **small)
    self.wog = param(rngs, (d, h, dv), ("embed", "heads", "head_dim"), **small)
    self.wi = nnx.Param(jnp.zeros((d, h), jnp.float32), logical_axes=("embed", "heads"))
    self.bi = nnx.Param(jnp.full((h,), -10.0, jnp.float32), logical_axes=("heads",))
    self.wf = nnx.Param(jnp.zeros((d, h), jnp.float32), logical_axes=("embed", "heads"))
    self.bf = nnx.Param(jnp.linspace(3.0, 6.0, h, dtype=jnp.float32), logical_axes=("heads",))
    self.norm = nnx.Param(jnp.ones((h, dv), jnp.float32), logical_axes=("heads", "head_dim"))
    self.wo = param(rngs, (h, dv, d), ("heads", "head_dim", "embed"), fan_in=d,
                    scale=4.0 / cfg.num_layers ** 2)  # std 2 / (layers sqrt(d)): Wang init

  def init_state(self, batch_size: int) -> dict:
    cfg = self.cfg
    return {"s": jnp.zeros((batch_size, cfg.num_heads, cfg.key_dim, cfg.value_dim + 1), jnp.float32),
            "m": jnp.zeros((batch_size, cfg.num_heads), jnp.float32)}

  def __call__(self, x, state, ctx: Context):
    cfg = self.cfg
    gate = lambda w, b: soft_cap(dense(x, w[...]).astype(jnp.float32) + b[...], cfg.gate_cap)
    h, state = mlstm_cell(project(x, self.wq), project(x, self.wk), project(x, self.wv), gate(self.wi, self.bi),
                          gate(self.wf, self.bf), segment_ids=ctx.doc, state=state, eps=cfg.eps, kernel=cfg.kernel,
                          chunk_size=cfg.chunk_size)
    mean = jnp.mean(h, axis=-1, keepdims=True)
    h = (h - mean) * lax.rsqrt(jnp.var(h, axis=-1, keepdims=True) + cfg.norm_eps) * self.norm[...]
    y = h * jax.nn.sigmoid(project(x, self.wog).astype(jnp.float32))
    return dense(y.astype(x.dtype), self.wo[...], in_dims=2), state

  @classmethod
  def flops_per_token(cls, cfg: MLSTMConfig, *, seg_len: int) -> float:
    d, h, dk, dv = cfg.d_model, cfg.num_heads, cfg.key_dim, cfg.value_dim
    proj = 2 * d * h * (2 * dk + 3 * dv + 2)
    chunk = 1 if cfg.kernel == "reference" else min(cfg.chunk_size, seg_len)
    return float(proj + h * (2 * chunk * (dk + dv + 1) / 2 + 4 * dk * (dv + 1)))  # causal half, state r/w

  @classmethod
  def activation_bytes_per_token(cls, cfg: MLSTMConfig, *, dtype_bytes: int) -> float:
    h, dk, dv = cfg.num_heads, cfg.key_dim, cfg.value_dim
    return super().activation_bytes_per_token(cfg, dtype_bytes=dtype_bytes) + float(
        (2 * h * dk + 2 * h * dv) * dtype_bytes + (h * dk + 3 * h * (dv + 1)) * 4)


def _heads_to_hf(w):
  """Ours `[d, H, dh]` -> torch Linear `[H dh, d]`."""
  return np.ascontiguousarray(w.reshape(w.shape[0], -1).T)


def hf_weight_map(cfg: MLSTMConfig) -> list:
  """Every (our flat name, transformers xLSTMForCausalLM name, (to_hf, from_hf))."""
  d, h, dk, dv = cfg.d_model, cfg.num_heads, cfg.key_dim, cfg.value_dim
  heads = lambda dh: (_heads_to_hf, lambda w: np.ascontiguousarray(w.T.reshape(d, h, dh)))
  layer = [("wq", "q.weight", heads(dk)), ("wk", "k.weight", heads(dk)), ("wv", "v.weight", heads(dv)),
           ("wog", "ogate_preact.weight", heads(dv)), ("wi", "igate_preact.weight", hf.TRANSPOSE),
           ("bi", "igate_preact.bias", hf.IDENTITY), ("wf", "fgate_preact.weight", hf.TRANSPOSE),
           ("bf", "fgate_preact.bias", hf.IDENTITY),
           ("norm", "multihead_norm.weight", (lambda w: w.reshape(-1), lambda w: w.reshape(h, dv))),
           ("wo", "out_proj.weight", (lambda w: np.ascontiguousarray(w.reshape(-1, d).T),
                                      lambda w: np.ascontiguousarray(w.T.reshape(h, dv, d))))]
  mlp = [("gate", "proj_up_gate.weight"), ("up", "proj_up.weight"), ("down", "proj_down.weight")]
  pairs = [("embedding.table", "backbone.embeddings.weight", hf.IDENTITY),
           ("final_norm.scale", "backbone.out_norm.weight", hf.IDENTITY)]
  if not cfg.tie_embeddings:
    pairs.append(("embedding.head", "lm_head.weight", hf.TRANSPOSE))
  for i in range(cfg.num_layers):
    block = f"backbone.blocks.{i}"
    pairs += [(f"blocks.{i}.norm.scale", f"{block}.norm_mlstm.weight", hf.IDENTITY),
              (f"blocks.{i}.mlp_norm.scale", f"{block}.norm_ffn.weight", hf.IDENTITY)]
    pairs += [(f"blocks.{i}.mixer.{ours}", f"{block}.mlstm_layer.{theirs}", fns) for ours, theirs, fns in layer]
    pairs += [(f"blocks.{i}.mlp.{ours}", f"{block}.ffn.{theirs}", hf.TRANSPOSE) for ours, theirs in mlp]
  return pairs


@register_model("mlstm", config=MLSTMConfig,
                description="mLSTM (xLSTM 7B layer): matrix memory with exponential gating, via the chunked kernel")
class MLSTM(LM):
  context_parallel = "sequence-parallel linear recurrence (the stabiliser's running max is partitioned by XLA)"
  hf_model_type = "xlstm"

  @classmethod
  def hf_config(cls, cfg: MLSTMConfig) -> dict:
    if cfg.embed_conv or not cfg.logit_cap or cfg.tie_embeddings:
      raise ConfigError(f"model.embed_conv={cfg.embed_conv}, logit_cap={cfg.logit_cap}, tie_embeddings="
                        f"{cfg.tie_embeddings}: Hugging Face xLSTM needs embed_conv=0, a logit cap > 0 and an untied "
                        "head (transformers loads no head for a tied one); export with --format safetensors")
    d_ff = cfg.resolved_d_ff
    return {"architectures": ["xLSTMForCausalLM"], "model_type": "xlstm", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model, "embedding_dim": cfg.d_model, "num_hidden_layers": cfg.num_layers,
            "num_blocks": cfg.num_layers, "num_heads": cfg.num_heads, "use_bias": False,
            "tie_word_embeddings": bool(cfg.tie_embeddings), "add_out_norm": True, "norm_eps": cfg.norm_eps,
            "qk_dim_factor": cfg.qk_factor, "v_dim_factor": cfg.v_factor, "chunk_size": cfg.chunk_size,
            "autocast_kernel_dtype": "float32", "eps": cfg.eps, "inference_state_dtype": "float32",
            # HF's FFN width is round_up(hidden x factor, multiple): rounding up to d_ff itself gives d_ff exactly
            "ffn_proj_factor": d_ff / cfg.d_model, "ffn_round_up_to_multiple_of": 64 if d_ff % 64 == 0 else d_ff,
            "gate_soft_cap": cfg.gate_cap, "output_logit_soft_cap": cfg.logit_cap, "weight_mode": "single",
            "mode": "inference", "dtype": "float32"}

  @classmethod
  def hf_weight_map(cls, cfg: MLSTMConfig) -> list:
    return hf_weight_map(cfg)

  @classmethod
  def config_from_hf(cls, hf_cfg: Mapping) -> MLSTMConfig:
    for key, value in (("use_bias", False), ("add_out_norm", True), ("weight_mode", "single"),
                       ("tie_word_embeddings", False)):
      hf.require(hf_cfg, key, value, kind="mlstm")
    try:
      saved = (hf_cfg.get("longctx") or {}).get("model") or {}
      base = dict(saved) if saved.get("name") == "mlstm" else {"name": "mlstm"}
      d = int(hf_cfg.get("hidden_size") or hf_cfg["embedding_dim"])
      multiple = int(hf_cfg.get("ffn_round_up_to_multiple_of", 64))
      d_ff = int(math.ceil(d * float(hf_cfg.get("ffn_proj_factor", 2.667)) / multiple) * multiple)
      arch = {"vocab_size": int(hf_cfg["vocab_size"]), "d_model": d,
              "num_layers": int(hf_cfg.get("num_hidden_layers") or hf_cfg["num_blocks"]),
              "num_heads": int(hf_cfg.get("num_heads", 8)), "qk_factor": float(hf_cfg.get("qk_dim_factor", 0.5)),
              "v_factor": float(hf_cfg.get("v_dim_factor", 1.0)), "norm_eps": float(hf_cfg.get("norm_eps", 1e-6)),
              "eps": float(hf_cfg.get("eps", 1e-6)), "gate_cap": float(hf_cfg.get("gate_soft_cap", 15.0)),
              "tie_embeddings": bool(hf_cfg.get("tie_word_embeddings", False)), "d_ff": d_ff,
              "logit_cap": float(hf_cfg.get("output_logit_soft_cap") or 0.0)}
    except (KeyError, TypeError, ValueError) as e:
      raise ConfigError(f"Hugging Face config is missing or has a bad {e}; expected a transformers xlstm "
                        "config.json") from None
    return hf.config_of(MLSTMConfig, {**base, **arch})
