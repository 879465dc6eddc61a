"""Gated DeltaNet (Yang, Kautz & Hatamizadeh 2025) and DeltaNet (Yang et al. 2024): the delta rule, gated.

Per layer, Hk query/key heads of dk channels and Hv value heads of dv channels (Hv a multiple of Hk; each
query/key head serves Hv / Hk consecutive value heads, as in Qwen3-Next):

    q, k, v = silu(causal_conv1d(x W_q), (x W_k), (x W_v))      depthwise, K taps, no bias, history carried
    q, k    = l2norm(q) / sqrt(dk), l2norm(k)
    beta_t  = sigmoid(x W_b)                                     one per value head
    log a_t = -exp(A_log) softplus(x W_a + dt_bias)              one per value head (DeltaNet: a_t = 1)
    S_t     = a_t (S_{t-1} - beta_t k_t^T (k_t S_{t-1})) + beta_t k_t^T v_t        S: [dk, dv] per value head
    o_t     = q_t S_t
    y       = W_o (RMSNorm(o) * w_norm * silu(x W_z))            per value head, w_norm [dv] shared by heads

S_t moves k_t S toward v_t by a step beta_t (the delta rule: a key's old value is replaced, not summed
over, which is what makes the state an associative memory that can be overwritten) after forgetting by
a_t (the gate: Mamba-2's data-dependent scalar decay). The recurrence is the chunked linear recurrence
(`longctx.kernels.linear_recurrence`, its delta-rule form: the WY / UT chunk solve of DeltaNet);
`model.kernel` picks "reference" (token scan), "xla" (chunked) or "pallas". A document starting inside a
segment starts from a zero state and a conv that reads zeros before it.

Variants (`model.variant`):
  "gated"  Gated DeltaNet as Qwen3-Next's layer (Hugging Face `Qwen3NextGatedDeltaNet`: tested against it,
           tests/test_gated_deltanet.py): the decay gate and the gated output norm.
  "delta"  DeltaNet as flash-linear-attention's `DeltaNet` defaults: no decay, no output gate (a plain
           RMSNorm per head), the same convs, L2-normalised q and k and beta.

The rest of the layer follows the zoo's backbone (pre-RMSNorm residual blocks, then the gated MLP; Qwen3-Next
has a mixture of experts there and full-attention layers every fourth layer: a hybrid stack is a layer
pattern, not this file). Initialisation as flash-linear-attention's Gated DeltaNet: A = U(0.01, 16)
(Hugging Face's floor), dt_bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max] (Mamba-2's).

State per layer (float32):
  conv_q, conv_k: [batch, K-1, Hk, dk]; conv_v: [batch, K-1, Hv, dv]   the last K-1 conv inputs
  s:              [batch, Hv, dk, dv]                                    the delta-rule state
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from longctx.config import MultiHeadConfig
from longctx.errors import ConfigError
from longctx.layers import Mixer, dense, l2_normalize, param, register_mixer, rms_norm
from longctx.layers.attention import project
from longctx.layers.context import Context
from longctx.layers.recurrence import recurrence
from longctx.layers.ssm import causal_conv1d, init_dt_bias
from longctx.models import hf
from longctx.models.base import LM
from longctx.models.registry import register_model

VARIANTS = ("gated", "delta")


@dataclasses.dataclass
class GatedDeltaNetConfig(MultiHeadConfig):
  mixer = "gated_delta"
  tiny = {"num_heads": 2, "num_value_heads": 4, "chunk_size": 8}

  name: str = "gated_deltanet"
  variant: str = "gated"  # "gated" (Gated DeltaNet, Qwen3-Next's layer) or "delta" (DeltaNet: no decay, no gate)
  num_value_heads: int = 0  # Hv (0 = num_heads); a multiple of num_heads
  value_head_dim: int = 0  # dv (0 = head_dim)
  conv_kernel: int = 4
  chunk_size: int = 64  # tokens per chunk of the chunked delta rule
  dt_min: float = 0.001
  dt_max: float = 0.1

  def validate(self) -> None:
    super().validate()
    if self.variant not in VARIANTS:
      raise ConfigError(f"model.variant={self.variant!r} is not one of {VARIANTS}")
    for key in ("conv_kernel", "chunk_size"):
      if getattr(self, key) < 1:
        raise ConfigError(f"model.{key}={getattr(self, key)} must be >= 1")
    if self.num_value_heads < 0 or self.value_head_dim < 0:
      raise ConfigError("model.num_value_heads and model.value_head_dim must be >= 0 (0 = as the key heads)")
    if self.resolved_value_heads % self.num_heads:
      raise ConfigError(f"model.num_value_heads={self.num_value_heads} must be a multiple of "
                        f"model.num_heads={self.num_heads} (each key head serves a group of value heads)")
    if not 0 < self.dt_min <= self.dt_max:
      raise ConfigError(f"need 0 < model.dt_min={self.dt_min} <= model.dt_max={self.dt_max}")

  @property
  def resolved_value_heads(self) -> int:
    return self.num_value_heads or self.num_heads

  @property
  def resolved_value_dim(self) -> int:
    return self.value_head_dim or self.resolved_head_dim


def gated_delta_rule(q, k, v, a, b, *, a_log, dt_bias, segment_ids, initial_state, kernel, chunk_size):
  """The layer's recurrence from its (convolved, activated) projections.

  Args:
    q, k: `[batch, seq, Hk, dk]`; v `[batch, seq, Hv, dv]`; a, b `[batch, seq, Hv]` gate logits.
    a_log, dt_bias: `[Hv]`, or a_log None for no decay (DeltaNet).
    segment_ids: `[batch, seq]`; initial_state `[batch, Hv, dk, dv]`.
  Returns:
    `o [batch, seq, Hv, dv]` float32 and the final state.
  """
  group = v.shape[2] // q.shape[2]
  q = jnp.repeat(l2_normalize(q), group, axis=2) / math.sqrt(q.shape[-1])
  k = jnp.repeat(l2_normalize(k), group, axis=2)
  beta = jax.nn.sigmoid(b.astype(jnp.float32))
  log_decay = None
  if a_log is not None:
    log_decay = -jnp.exp(a_log) * jax.nn.softplus(a.astype(jnp.float32) + dt_bias)
  return recurrence(q, k, v.astype(jnp.float32), log_decay=log_decay, beta=beta, segment_ids=segment_ids,
                    initial_state=initial_state, kernel=kernel, chunk_size=chunk_size)


@register_mixer("gated_delta")
class GatedDeltaMixer(Mixer):
  """`x [batch, seq, d_model]` + {conv histories, delta-rule state} -> output, new state."""

  def __init__(self, cfg: GatedDeltaNetConfig, *, layer: int, rngs: nnx.Rngs):
    d, hk, dk, hv, dv, kk = (cfg.d_model, cfg.num_heads, cfg.resolved_head_dim, cfg.resolved_value_heads,
                             cfg.resolved_value_dim, cfg.conv_kernel)
    self.cfg = cfg
    self.wq = param(rngs, (d, hk, dk), ("embed", "heads", "head_dim"), fan_in=d)
    self.wk = param(rngs, (d, hk, dk), ("embed", "heads", "head_dim"), fan_in=d)
    self.wv = param(rngs, (d, hv, dv), ("embed", "heads", "head_dim"), fan_in=d)
    self.wb = param(rngs, (d, hv), ("embed", "heads"), fan_in=d)
    # Depthwise convs: PyTorch's default bound 1/sqrt(K), as a normal of the same variance (as Mamba-2 here).
    self.conv_q = param(rngs, (kk, hk, dk), ("conv", "heads", "head_dim"), fan_in=3 * kk)
    self.conv_k = param(rngs, (kk, hk, dk), ("conv", "heads", "head_dim"), fan_in=3 * kk)
    self.conv_v = param(rngs, (kk, hv, dv), ("conv", "heads", "head_dim"), fan_in=3 * kk)
    if cfg.variant == "gated":
      self.wa = param(rngs, (d, hv), ("embed", "heads"), fan_in=d)
      self.wz = param(rngs, (d, hv, dv), ("embed", "heads", "head_dim"), fan_in=d)
      a = jax.random.uniform(rngs.params(), (hv,), jnp.float32, 0.01, 16.0)
      self.A_log = nnx.Param(jnp.log(a), logical_axes=("heads",))
      self.dt_bias = nnx.Param(init_dt_bias(rngs.params(), (hv,), dt_min=cfg.dt_min, dt_max=cfg.dt_max),
                               logical_axes=("heads",))
    else:
      self.wa = self.wz = self.A_log = self.dt_bias = None
    self.norm = nnx.Param(jnp.ones((dv,), jnp.float32), logical_axes=("head_dim",))
    self.wo = param(rngs, (hv, dv, d), ("heads", "head_dim", "embed"), fan_in=hv * dv, scale=1.0 / (2 * cfg.num_layers))

  def init_state(self, batch_size: int) -> dict:
    cfg = self.cfg
    hist = lambda h, dh: jnp.zeros((batch_size, cfg.conv_kernel - 1, h, dh), jnp.float32)
    return {"conv_q": hist(cfg.num_heads, cfg.resolved_head_dim), "conv_k": hist(cfg.num_heads, cfg.resolved_head_dim),
            "conv_v": hist(cfg.resolved_value_heads, cfg.resolved_value_dim),
            "s": jnp.zeros((batch_size, cfg.resolved_value_heads, cfg.resolved_head_dim, cfg.resolved_value_dim),
                           jnp.float32)}

  def __call__(self, x, state, ctx: Context):
    cfg = self.cfg
    history_doc = ctx.history_doc(cfg.conv_kernel - 1)
    new_state = {}

    def conv(name, w):
      y, new_state[name] = causal_conv1d(project(x, w), getattr(self, name)[...], None, history=state[name],
                                         history_doc=history_doc, doc=ctx.doc)
      return jax.nn.silu(y)

    q, k, v = conv("conv_q", self.wq), conv("conv_k", self.wk), conv("conv_v", self.wv)
    gated = cfg.variant == "gated"
    a = dense(x, self.wa[...]) if gated else None
    o, new_state["s"] = gated_delta_rule(
        q, k, v, a, dense(x, self.wb[...]), a_log=self.A_log[...] if gated else None,
        dt_bias=self.dt_bias[...] if gated else None, segment_ids=ctx.doc, initial_state=state["s"],
        kernel=cfg.kernel, chunk_size=cfg.chunk_size)
    y = rms_norm(o, self.norm[...], eps=cfg.norm_eps)
    if gated:
      y = y * jax.nn.silu(project(x, self.wz).astype(jnp.float32))
    return dense(y.astype(x.dtype), self.wo[...], in_dims=2), new_state

  @classmethod
  def reach(cls, cfg) -> int:
    return cfg.conv_kernel - 1

  @classmethod
  def flops_per_token(cls, cfg: GatedDeltaNetConfig, *, seg_len: int) -> float:
    d, hk, dk, hv, dv = (cfg.d_model, cfg.num_heads, cfg.resolved_head_dim, cfg.resolved_value_heads,
                         cfg.resolved_value_dim)
    gated = cfg.variant == "gated"
    proj = 2 * d * (2 * hk * dk + hv * dv * (2 if gated else 1) + hv * (2 if gated else 1)) + 2 * hv * dv * d
    conv = 2 * cfg.conv_kernel * (2 * hk * dk + hv * dv)
    chunk = 1 if cfg.kernel == "reference" else min(cfg.chunk_size, seg_len)
    # Per value head: the chunk's causal q k^T and k k^T, the solve's products with k and v, then
    # q S, w S (the delta correction) and the state update k^T u.
    scan = hv * (2 * chunk * (2 * dk + dv) / 2 + 2 * chunk * (dk + dv) / 2 + 6 * dk * dv)
    return float(proj + conv + scan)

  @classmethod
  def activation_bytes_per_token(cls, cfg: GatedDeltaNetConfig, *, dtype_bytes: int) -> float:
    qkv = 2 * cfg.num_heads * cfg.resolved_head_dim + cfg.resolved_value_heads * cfg.resolved_value_dim
    return super().activation_bytes_per_token(cfg, dtype_bytes=dtype_bytes) + float(
        2 * qkv * dtype_bytes + 3 * cfg.resolved_value_heads * cfg.resolved_value_dim * 4)


@register_model("gated_deltanet", config=GatedDeltaNetConfig,
                description="Gated DeltaNet / DeltaNet: the (gated) delta rule through the chunked kernel, O(1) state")
class GatedDeltaNet(LM):
  context_parallel = "sequence-parallel linear recurrence (the delta rule: each shard re-runs from its true state)"
  hf_model_type = "qwen3_next"

  @classmethod
  def hf_config(cls, cfg: GatedDeltaNetConfig) -> dict:
    if cfg.variant != "gated":
      raise ConfigError(f"model.variant={cfg.variant!r}: Hugging Face Qwen3-Next has the gated layer only; export "
                        "with --format safetensors")
    n = cfg.num_layers
    return {"architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model, "intermediate_size": cfg.resolved_d_ff, "num_hidden_layers": n,
            "layer_types": ["linear_attention"] * n, "mlp_only_layers": list(range(n)), "hidden_act": "silu",
            "linear_num_key_heads": cfg.num_heads, "linear_num_value_heads": cfg.resolved_value_heads,
            "linear_key_head_dim": cfg.resolved_head_dim, "linear_value_head_dim": cfg.resolved_value_dim,
            "linear_conv_kernel_dim": cfg.conv_kernel, "rms_norm_eps": cfg.norm_eps,
            "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_heads,
            "tie_word_embeddings": bool(cfg.tie_embeddings), "dtype": "float32",
            # transformers builds its attention mask from the cache's attention layers, and this stack has none
            "use_cache": False}

  @classmethod
  def hf_weight_map(cls, cfg: GatedDeltaNetConfig) -> list:
    return hf_weight_map(cfg)

  @classmethod
  def config_from_hf(cls, hf_cfg: Mapping) -> GatedDeltaNetConfig:
    hf.require(hf_cfg, "hidden_act", "silu", kind="gated_deltanet")
    try:
      n = int(hf_cfg["num_hidden_layers"])
      if list(hf_cfg.get("layer_types") or []) != ["linear_attention"] * n:
        raise ConfigError("Hugging Face Qwen3-Next config has full-attention layers; longctx gated_deltanet reads "
                          "one whose layer_types are all linear_attention")
      if sorted(hf_cfg.get("mlp_only_layers") or []) != list(range(n)):
        raise ConfigError("Hugging Face Qwen3-Next config has mixture-of-experts layers; longctx gated_deltanet "
                          "reads one with mlp_only_layers = every layer (dense MLPs)")
      saved = (hf_cfg.get("longctx") or {}).get("model") or {}
      base = dict(saved) if saved.get("name") == "gated_deltanet" else {"name": "gated_deltanet"}
      arch = {"vocab_size": int(hf_cfg["vocab_size"]), "d_model": int(hf_cfg["hidden_size"]), "num_layers": n,
              "d_ff": int(hf_cfg["intermediate_size"]), "num_heads": int(hf_cfg["linear_num_key_heads"]),
              "head_dim": int(hf_cfg["linear_key_head_dim"]),
              "num_value_heads": int(hf_cfg["linear_num_value_heads"]),
              "value_head_dim": int(hf_cfg["linear_value_head_dim"]),
              "conv_kernel": int(hf_cfg.get("linear_conv_kernel_dim", 4)), "variant": "gated",
              "norm_eps": float(hf_cfg.get("rms_norm_eps", 1e-6)),
              "tie_embeddings": bool(hf_cfg.get("tie_word_embeddings", False)), "embed_conv": 0}
    except (KeyError, TypeError, ValueError) as e:
      raise ConfigError(f"Hugging Face config is missing or has a bad {e}; expected a transformers qwen3_next "
                        "config.json") from None
    return hf.config_of(GatedDeltaNetConfig, {**base, **arch})


def hf_weight_map(cfg: GatedDeltaNetConfig) -> list:
  """Every (our flat name(s), transformers Qwen3NextForCausalLM name, (to_hf, from_hf)). Its in_proj_qkvz and
  in_proj_ba interleave q, k, v, z and b, a per key head (each key head's group of value heads together); its
  conv1d's channels are q | k | v flattened; its (1 + w) RMSNorms are our scales minus one."""
  d, hk, dk, hv, dv, kk = (cfg.d_model, cfg.num_heads, cfg.resolved_head_dim, cfg.resolved_value_heads,
                           cfg.resolved_value_dim, cfg.conv_kernel)
  r = hv // hk
  split = lambda w, widths: np.split(w, np.cumsum(widths)[:-1], axis=-1)
  qkvz = (lambda ws: np.ascontiguousarray(np.concatenate([w.reshape(d, hk, -1) for w in ws], axis=2).reshape(d, -1).T),
          lambda w: tuple(part.reshape(d, -1, width) for part, width in zip(
              split(w.T.reshape(d, hk, -1), [dk, dk, r * dv, r * dv]), [dk, dk, dv, dv])))
  ba = (lambda ws: np.ascontiguousarray(np.concatenate([w.reshape(d, hk, r) for w in ws], axis=2).reshape(d, -1).T),
        lambda w: tuple(part.reshape(d, hv) for part in split(w.T.reshape(d, hk, 2 * r), [r, r])))
  conv = (lambda ws: np.ascontiguousarray(np.concatenate([w.reshape(kk, -1) for w in ws], axis=1).T[:, None, :]),
          lambda w: tuple(part.reshape(kk, -1, width) for part, width in zip(
              split(hf.CONV[1](w), [hk * dk, hk * dk, hv * dv]), [dk, dk, dv])))
  out = (lambda w: np.ascontiguousarray(w.reshape(hv * dv, d).T),
         lambda w: np.ascontiguousarray(w.T.reshape(hv, dv, d)))
  scale = hf.ONE_PLUS  # Qwen3-Next's RMSNorm multiplies by 1 + w
  pairs = [("embedding.table", "model.embed_tokens.weight", hf.IDENTITY),
           ("final_norm.scale", "model.norm.weight", scale)]
  if not cfg.tie_embeddings:
    pairs.append(("embedding.head", "lm_head.weight", hf.TRANSPOSE))
  for i in range(cfg.num_layers):
    layer, mixer = f"model.layers.{i}", f"blocks.{i}.mixer"
    pairs += [(f"blocks.{i}.norm.scale", f"{layer}.input_layernorm.weight", scale),
              (f"blocks.{i}.mlp_norm.scale", f"{layer}.post_attention_layernorm.weight", scale),
              (tuple(f"{mixer}.{w}" for w in ("wq", "wk", "wv", "wz")), f"{layer}.linear_attn.in_proj_qkvz.weight",
               qkvz),
              ((f"{mixer}.wb", f"{mixer}.wa"), f"{layer}.linear_attn.in_proj_ba.weight", ba),
              (tuple(f"{mixer}.{c}" for c in ("conv_q", "conv_k", "conv_v")), f"{layer}.linear_attn.conv1d.weight",
               conv),
              (f"{mixer}.dt_bias", f"{layer}.linear_attn.dt_bias", hf.IDENTITY),
              (f"{mixer}.A_log", f"{layer}.linear_attn.A_log", hf.IDENTITY),
              (f"{mixer}.norm", f"{layer}.linear_attn.norm.weight", hf.IDENTITY),
              (f"{mixer}.wo", f"{layer}.linear_attn.out_proj.weight", out)]
    pairs += [(f"blocks.{i}.mlp.{ours}", f"{layer}.mlp.{theirs}_proj.weight", hf.TRANSPOSE)
              for ours, theirs in (("gate", "gate"), ("up", "up"), ("down", "down"))]
  return pairs
