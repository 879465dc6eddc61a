"""Griffin (De et al. 2024), the architecture of RecurrentGemma: RG-LRU recurrent blocks and local multi-query
attention, two recurrent layers to one attention layer (`model.block_types`; "recurrent" alone is Hawk).

Every layer is a pre-RMSNorm residual block, `x += temporal(norm(x)); x += MLP(mlp_norm(x))`, with Griffin's
MLP, `W_down (gelu(x W_gate + b) * (x W_up + b)) + b` (tanh-approximate GELU, width `d_ff`, 3 x d_model).
The temporal block is either

* the **recurrent block** (`RGLRUBlock`): per channel of `lru_width`, split into H heads of `bw` channels,

      y   = gelu(x W_y + b_y)                                  the gate branch
      u   = conv1d_4(x W_x + b_x)                              causal depthwise conv, carried history
      r_t = sigmoid(u_t W_a + b_a),  i_t = sigmoid(u_t W_i + b_i)    block-diagonal [H, bw, bw] gate maps
      log a_t = -8 r_t softplus(Lambda)
      h_t = a_t h_{t-1} + sqrt(1 - a_t^2) (i_t u_t)            (at a document's first token: h_t = i_t u_t)
      out = W_o (h * y) + b_o

  The recurrence is `layers.recurrence.diagonal_recurrence` (an associative scan; a document start is
  a_t = 0, so packed documents need no mask). sqrt's derivative is bounded at 1000 near a = 1, as in
  recurrentgemma and transformers.
* the **local attention block** (`LocalAttention`): the baseline's windowed attention (the same kernels
  and ring attention) with Griffin's choices: multi-query (`num_kv_heads` 1), rotary positions on the first
  half of each head (`rope_fraction` 0.5), a bias on the output projection.

The embedding is scaled by sqrt(d_model) (rounded to bfloat16, as the checkpoints and transformers do),
the head is tied and its logits soft-capped at 30. Initialisation follows recurrentgemma (variance 1/fan_in
projections, 2/num_layers on the residual outputs, 0.01 on the conv and gate maps, a^(1/8) uniform in
[0.9, 0.999] at r = 1).

Hugging Face interop: `longctx export --format hf` / `import-hf` read and write `RecurrentGemmaForCausalLM`
(tests/test_export.py checks the logits against transformers). Deviations: our `window` counts the tokens
*before* each token (transformers' `attention_window_size` = window + 1, as recurrentgemma's decoding cache;
recurrentgemma's own prefill mask, `q <= k + attention_window_size`, sees one token more); our conv does not
read across a document start inside a segment (transformers' prefill conv does; with one document per row they agree);
RMSNorm scales are stored as the multiplier itself (Gemma's `1 + w`, converted on export / import).

State per layer: recurrent `conv [batch, K-1, H, bw]`, `h [batch, H, bw]` (float32); attention `k, v
[batch, window, kv_heads, head_dim]`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from longctx.errors import ConfigError
from longctx.layers import (AttentionProjections, Block, Mixer, RMSNorm, WindowAttention, dense, param, register_mixer,
                            rotary)
from longctx.layers.attention import project
from longctx.layers.context import Context
from longctx.layers.recurrence import diagonal_recurrence
from longctx.layers.ssm import causal_conv1d
from longctx.models import hf
from longctx.models.base import LM
from longctx.models.registry import register_model
from longctx.models.transformer import TransformerConfig

BLOCK_TYPES = {"recurrent": "rglru", "attention": "local_attention"}  # block type -> mixer name
MAX_SQRT_GRADIENT = 1000.0


@dataclasses.dataclass
class GriffinConfig(TransformerConfig):
  tiny = {"num_heads": 2, "num_kv_heads": 1, "window": 8, "block_types": "recurrent,attention"}

  name: str = "griffin"
  block_types: str = "recurrent,recurrent,attention"  # repeated over the layers; "recurrent" alone = Hawk
  lru_width: int = 0  # RG-LRU channels (0 = d_model), split into num_heads blocks of the gate maps
  conv_width: int = 4  # the recurrent block's causal conv
  window: int = 2047  # tokens visible before each token (RecurrentGemma's attention_window_size 2048 - 1)
  num_kv_heads: int = 1  # multi-query attention
  rope_fraction: float = 0.5  # the share of each head's channels rotated
  embed_scale: bool = True
  logit_cap: float = 30.0

  def validate(self) -> None:
    super().validate()
    types = self.block_types.split(",")
    if not types or any(t not in BLOCK_TYPES for t in types):
      raise ConfigError(f"model.block_types={self.block_types!r} must be a comma-separated pattern of "
                        f"{' and '.join(BLOCK_TYPES)}, e.g. 'recurrent,recurrent,attention'")
    if self.lru_width < 0 or self.resolved_lru_width % self.num_heads:
      raise ConfigError(f"model.lru_width={self.resolved_lru_width} must be a positive multiple of "
                        f"model.num_heads={self.num_heads} (0 = d_model)")
    if self.conv_width < 1:
      raise ConfigError(f"model.conv_width={self.conv_width} must be >= 1")
    rotated = self.rope_fraction * self.resolved_head_dim
    if not 0 < self.rope_fraction <= 1 or rotated != int(rotated) or int(rotated) % 2:
      raise ConfigError(f"model.rope_fraction={self.rope_fraction} x head_dim={self.resolved_head_dim} must be "
                        "an even number of channels (0 < rope_fraction <= 1)")
    if self.kernel == "pallas":
      raise ConfigError("model.kernel='pallas': griffin's RG-LRU scan has no Pallas kernel (its fast form is an "
                        "associative scan in XLA); use model.kernel=auto (Pallas attention where it compiles)")

  def layer_pattern(self) -> list[str]:
    types = self.block_types.split(",")
    return [BLOCK_TYPES[types[i % len(types)]] for i in range(self.num_layers)]

  @property
  def resolved_lru_width(self) -> int:
    return self.lru_width or self.d_model

  @property
  def resolved_d_ff(self) -> int:
    return self.d_ff or 3 * self.d_model


# ----------------------------------------------------------------------------- the math


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def sqrt_bound_derivative(x: jax.Array, max_gradient: float) -> jax.Array:
  """`sqrt(x)` whose derivative is capped at `max_gradient` (near x = 0, i.e. a decay near 1)."""
  return jnp.sqrt(x)


@sqrt_bound_derivative.defjvp
def _sqrt_bound_derivative_jvp(max_gradient, primals, tangents):
  (x,), (t,) = primals, tangents
  return jnp.sqrt(x), t / jnp.sqrt(jnp.maximum(4.0 * x, 1.0 / max_gradient ** 2))


def rg_lru(u, *, w_input, b_input, w_a, b_a, a_param, doc_start, h0, kernel: str = "auto"):
  """The RG-LRU over one step.

  Args:
    u: `[batch, seq, H, bw]` the conv's output.
    w_input, w_a: `[H, bw, bw]` block-diagonal gate maps; b_input, b_a, a_param: `[H, bw]`.
    doc_start: `[batch, seq]` bool, the token is its document's first (h restarts from i_t u_t).
    h0: `[batch, H, bw]` the state before the step.
  Returns:
    `h [batch, seq, H, bw]` and the final state, float32.
  """
  u = u.astype(jnp.float32)
  gate = lambda w, b: jax.nn.sigmoid(jnp.einsum("bshi,hij->bshj", u, w.astype(jnp.float32)) + b)
  log_a = -8.0 * gate(w_a, b_a) * jax.nn.softplus(a_param.astype(jnp.float32))
  start = doc_start[:, :, None, None]
  multiplier = jnp.where(start, 1.0, sqrt_bound_derivative(1.0 - jnp.exp(2.0 * log_a), MAX_SQRT_GRADIENT))
  a = jnp.where(start, 0.0, jnp.exp(log_a))
  return diagonal_recurrence(a, u * gate(w_input, b_input) * multiplier, initial_state=h0, kernel=kernel)


def init_a_param(key: jax.Array, shape: tuple[int, ...], *, low: float = 0.9, high: float = 0.999) -> jax.Array:
  """Lambda with softplus(Lambda) = -log a0, a0^2 uniform in [low^2, high^2] (recurrentgemma's rnn_param_init)."""
  a0_squared = jax.random.uniform(key, shape, jnp.float32, low ** 2 + 1e-8, high ** 2 + 1e-8)
  return jnp.log(jnp.expm1(-0.5 * jnp.log(a0_squared)))


# ----------------------------------------------------------------------------- layers


class GeluMLP(nnx.Module):
  """`W_down (gelu(x W_gate + b_gate) * (x W_up + b_up)) + b_down`, `[batch, seq, d_model]` both ways."""

  def __init__(self, cfg: GriffinConfig, *, rngs: nnx.Rngs):
    d, ff = cfg.d_model, cfg.resolved_d_ff
    self.gate = param(rngs, (d, ff), ("embed", "mlp"), fan_in=d)
    self.up = param(rngs, (d, ff), ("embed", "mlp"), fan_in=d)
    self.down = param(rngs, (ff, d), ("mlp", "embed"), fan_in=ff, scale=2.0 / cfg.num_layers)
    zeros = lambda n, axis: nnx.Param(jnp.zeros((n,), jnp.float32), logical_axes=(axis,))
    self.gate_bias, self.up_bias, self.down_bias = zeros(ff, "mlp"), zeros(ff, "mlp"), zeros(d, "embed")

  def __call__(self, x):
    hidden = jax.nn.gelu(dense(x, self.gate[...]) + self.gate_bias[...].astype(x.dtype), approximate=True)
    hidden = hidden * (dense(x, self.up[...]) + self.up_bias[...].astype(x.dtype))
    return dense(hidden, self.down[...]) + self.down_bias[...].astype(x.dtype)


class GriffinBlock(Block):
  """Griffin's residual block: the shell's `Block` with Griffin's biased GELU MLP."""

  def __init__(self, cfg: GriffinConfig, mixer: Mixer, *, rngs: nnx.Rngs):
    self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    self.mixer = mixer
    self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    self.mlp = GeluMLP(cfg, rngs=rngs)


@register_mixer("rglru")
class RGLRUBlock(Mixer):
  """Griffin's recurrent block (module docstring): `x [batch, seq, d_model]` + `{"conv", "h"}` -> output, state."""

  block_class = GriffinBlock

  def __init__(self, cfg: GriffinConfig, *, layer: int, rngs: nnx.Rngs):
    del layer
    d, h, k = cfg.d_model, cfg.num_heads, cfg.conv_width
    bw = cfg.resolved_lru_width // h
    self.cfg = cfg
    channels = ("heads", "head_dim")
    zeros = lambda: nnx.Param(jnp.zeros((h, bw), jnp.float32), logical_axes=channels)
    self.wx = param(rngs, (d, h, bw), ("embed", *channels), fan_in=d)
    self.wy = param(rngs, (d, h, bw), ("embed", *channels), fan_in=d)
    self.bx, self.by = zeros(), zeros()
    self.conv = param(rngs, (k, h, bw), ("conv", *channels), fan_in=k, scale=0.01)
    self.conv_bias = zeros()
    self.w_input = param(rngs, (h, bw, bw), ("heads", "head_dim", None), fan_in=bw, scale=0.01)
    self.w_a = param(rngs, (h, bw, bw), ("heads", "head_dim", None), fan_in=bw, scale=0.01)
    self.b_input, self.b_a = zeros(), zeros()
    self.a_param = nnx.Param(init_a_param(rngs.params(), (h, bw)), logical_axes=channels)
    self.wo = param(rngs, (h, bw, d), (*channels, "embed"), fan_in=h * bw, scale=2.0 / cfg.num_layers)
    self.bo = nnx.Param(jnp.zeros((d,), jnp.float32), logical_axes=("embed",))

  def init_state(self, batch_size: int) -> dict:
    cfg = self.cfg
    h, bw = cfg.num_heads, cfg.resolved_lru_width // cfg.num_heads
    return {"conv": jnp.zeros((batch_size, cfg.conv_width - 1, h, bw), jnp.float32),
            "h": jnp.zeros((batch_size, h, bw), jnp.float32)}

  def __call__(self, x, state, ctx: Context):
    cfg = self.cfg
    y = jax.nn.gelu(project(x, self.wy) + self.by[...].astype(x.dtype), approximate=True)
    u, conv = causal_conv1d(project(x, self.wx) + self.bx[...].astype(x.dtype), self.conv[...], self.conv_bias[...],
                            history=state["conv"], history_doc=ctx.history_doc(cfg.conv_width - 1), doc=ctx.doc)
    h, h_last = rg_lru(u, w_input=self.w_input[...], b_input=self.b_input[...], w_a=self.w_a[...], b_a=self.b_a[...],
                       a_param=self.a_param[...], doc_start=ctx.pos == 0, h0=state["h"], kernel=cfg.kernel)
    out = dense(h.astype(x.dtype) * y, self.wo[...], in_dims=2) + self.bo[...].astype(x.dtype)
    return out, {"conv": conv, "h": h_last}

  @classmethod
  def reach(cls, cfg: GriffinConfig) -> int:
    return cfg.conv_width - 1

  @classmethod
  def flops_per_token(cls, cfg: GriffinConfig, *, seg_len: int) -> float:
    d, w = cfg.d_model, cfg.resolved_lru_width
    bw = w // cfg.num_heads
    return float(2 * 3 * d * w + 2 * 2 * w * bw + 2 * cfg.conv_width * w)

  @classmethod
  def activation_bytes_per_token(cls, cfg: GriffinConfig, *, dtype_bytes: int) -> float:
    w = cfg.resolved_lru_width
    return super().activation_bytes_per_token(cfg, dtype_bytes=dtype_bytes) + float(3 * w * dtype_bytes + 6 * w * 4)


@register_mixer("local_attention")
class LocalAttention(WindowAttention):
  """Griffin's attention: the windowed attention with partial rotary positions and a biased output."""

  block_class = GriffinBlock

  def __init__(self, cfg: GriffinConfig, *, layer: int, rngs: nnx.Rngs):
    del layer
    AttentionProjections.__init__(self, cfg, rngs=rngs, out_scale=2.0 / cfg.num_layers)
    self.cfg = cfg
    self.bo = nnx.Param(jnp.zeros((cfg.d_model,), jnp.float32), logical_axes=("embed",))

  def rotate(self, x, positions):
    """Rotary positions on the first `rope_fraction` of each head's channels; the rest pass unrotated."""
    n = int(self.cfg.rope_fraction * x.shape[-1])
    return jnp.concatenate([rotary(x[..., :n], positions, base=self.cfg.rope_base), x[..., n:]], axis=-1)

  def out(self, y):
    return super().out(y) + self.bo[...].astype(y.dtype)


# ----------------------------------------------------------------------------- the model and its HF mapping


@register_model("griffin", config=GriffinConfig,
                description="Griffin (RecurrentGemma): RG-LRU recurrent blocks + local MQA attention, 2:1")
class Griffin(LM):
  context_parallel = "ring attention (attention layers) and a sequence-parallel diagonal scan (RG-LRU layers)"
  hf_model_type = "recurrent_gemma"

  @classmethod
  def hf_config(cls, cfg: GriffinConfig) -> dict:
    problems = [f"{key}={value}" for key, value, ok in (
        ("embed_conv", cfg.embed_conv, cfg.embed_conv == 0), ("embed_scale", cfg.embed_scale, cfg.embed_scale),
        ("logit_cap", cfg.logit_cap, cfg.logit_cap > 0),
        ("head_dim", cfg.head_dim, cfg.resolved_head_dim == cfg.d_model // cfg.num_heads)) if not ok]
    if problems:
      raise ConfigError(f"model.{', '.join(problems)}: Hugging Face RecurrentGemma needs embed_conv=0, embed_scale="
                        "True, a logit cap > 0 and head_dim = d_model / num_heads; export with --format safetensors")
    return {"architectures": ["RecurrentGemmaForCausalLM"], "model_type": "recurrent_gemma",
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": 2 * cfg.resolved_d_ff,
            "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
            "num_key_value_heads": cfg.num_kv_heads or cfg.num_heads, "lru_width": cfg.resolved_lru_width,
            "attention_window_size": cfg.window + 1, "conv1d_width": cfg.conv_width,
            "logits_soft_cap": cfg.logit_cap, "rms_norm_eps": cfg.norm_eps, "hidden_activation": "gelu_pytorch_tanh",
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base,
                                "partial_rotary_factor": cfg.rope_fraction},
            "block_types": cfg.block_types.split(","), "attention_bias": False,
            "tie_word_embeddings": bool(cfg.tie_embeddings), "dtype": "float32"}

  @classmethod
  def hf_weight_map(cls, cfg: GriffinConfig) -> list:
    return hf_weight_map(cfg)

  @classmethod
  def config_from_hf(cls, hf_cfg: Mapping) -> GriffinConfig:
    hf.require(hf_cfg, "attention_bias", False, kind="griffin")
    hf.require(hf_cfg, "hidden_activation", "gelu_pytorch_tanh", kind="griffin")
    try:
      saved = (hf_cfg.get("longctx") or {}).get("model") or {}
      base = dict(saved) if saved.get("name") == "griffin" else {"name": "griffin"}
      rope = hf_cfg.get("rope_parameters") or {}
      d, heads = int(hf_cfg["hidden_size"]), int(hf_cfg["num_attention_heads"])
      arch = {"vocab_size": int(hf_cfg["vocab_size"]), "d_model": d, "num_layers": int(hf_cfg["num_hidden_layers"]),
              "num_heads": heads, "num_kv_heads": int(hf_cfg.get("num_key_value_heads") or heads), "head_dim": 0,
              "d_ff": int(hf_cfg["intermediate_size"]) // 2, "lru_width": int(hf_cfg.get("lru_width") or d),
              "window": int(hf_cfg.get("attention_window_size", 2048)) - 1,
              "conv_width": int(hf_cfg.get("conv1d_width", 4)),
              "logit_cap": float(hf_cfg.get("logits_soft_cap", 30.0)),
              "norm_eps": float(hf_cfg.get("rms_norm_eps", 1e-6)),
              "rope_base": float(rope.get("rope_theta", hf_cfg.get("rope_theta", 10000.0))),
              "rope_fraction": float(rope.get("partial_rotary_factor", hf_cfg.get("partial_rotary_factor", 0.5))),
              "block_types": ",".join(hf_cfg.get("block_types") or ("recurrent", "recurrent", "attention")),
              "tie_embeddings": bool(hf_cfg.get("tie_word_embeddings", True)), "embed_scale": True, "embed_conv": 0}
    except (KeyError, TypeError, ValueError) as e:
      raise ConfigError(f"Hugging Face config is missing or has a bad {e}; expected a transformers recurrent_gemma "
                        "config.json") from None
    return hf.config_of(GriffinConfig, {**base, **arch})


def hf_weight_map(cfg: GriffinConfig) -> list:
  """Every (our flat name, transformers RecurrentGemmaForCausalLM name, (to_hf, from_hf))."""
  d, h, hd = cfg.d_model, cfg.num_heads, cfg.resolved_head_dim
  bw = cfg.resolved_lru_width // h
  heads_in = lambda n, width: (lambda w: np.ascontiguousarray(w.reshape(d, -1).T),
                               lambda w: np.ascontiguousarray(w.T.reshape(d, n, width)))
  heads_out = (lambda w: np.ascontiguousarray(w.reshape(-1, d).T),
               lambda w: np.ascontiguousarray(w.T.reshape(h, -1, d)))
  flat = (lambda w: w.reshape(-1), lambda w: w.reshape(h, bw))
  conv = (lambda w: np.ascontiguousarray(w.reshape(w.shape[0], -1).T[:, None, :]),
          lambda w: np.ascontiguousarray(hf.CONV[1](w).reshape(-1, h, bw)))
  recurrent = [("wx", "linear_x.weight", heads_in(h, bw)), ("bx", "linear_x.bias", flat),
               ("wy", "linear_y.weight", heads_in(h, bw)), ("by", "linear_y.bias", flat),
               ("wo", "linear_out.weight", heads_out), ("bo", "linear_out.bias", hf.IDENTITY),
               ("conv", "conv_1d.weight", conv), ("conv_bias", "conv_1d.bias", flat),
               ("w_input", "rg_lru.input_gate_weight", hf.IDENTITY), ("b_input", "rg_lru.input_gate_bias", hf.IDENTITY),
               ("w_a", "rg_lru.recurrent_gate_weight", hf.IDENTITY), ("b_a", "rg_lru.recurrent_gate_bias", hf.IDENTITY),
               ("a_param", "rg_lru.recurrent_param", flat)]
  kvh = cfg.num_kv_heads or h
  attention = [("wq", "q_proj.weight", heads_in(h, hd)), ("wk", "k_proj.weight", heads_in(kvh, hd)),
               ("wv", "v_proj.weight", heads_in(kvh, hd)), ("wo", "o_proj.weight", heads_out),
               ("bo", "o_proj.bias", hf.IDENTITY)]
  mlp = [("gate", "gate_proj.weight", hf.TRANSPOSE), ("gate_bias", "gate_proj.bias", hf.IDENTITY),
         ("up", "up_proj.weight", hf.TRANSPOSE), ("up_bias", "up_proj.bias", hf.IDENTITY),
         ("down", "down_proj.weight", hf.TRANSPOSE), ("down_bias", "down_proj.bias", hf.IDENTITY)]
  pairs = [("embedding.table", "model.embed_tokens.weight", hf.IDENTITY),
           ("final_norm.scale", "model.final_norm.weight", hf.ONE_PLUS)]
  if not cfg.tie_embeddings:
    pairs.append(("embedding.head", "lm_head.weight", hf.TRANSPOSE))
  for i, mixer in enumerate(cfg.layer_pattern()):
    layer = f"model.layers.{i}"
    pairs += [(f"blocks.{i}.norm.scale", f"{layer}.temporal_pre_norm.weight", hf.ONE_PLUS),
              (f"blocks.{i}.mlp_norm.scale", f"{layer}.channel_pre_norm.weight", hf.ONE_PLUS)]
    temporal = recurrent if mixer == "rglru" else attention
    pairs += [(f"blocks.{i}.mixer.{ours}", f"{layer}.temporal_block.{theirs}", fns) for ours, theirs, fns in temporal]
    pairs += [(f"blocks.{i}.mlp.{ours}", f"{layer}.mlp_block.{theirs}", fns) for ours, theirs, fns in mlp]
  return pairs


__all__ = ["Griffin", "GriffinConfig", "rg_lru", "sqrt_bound_derivative"]
