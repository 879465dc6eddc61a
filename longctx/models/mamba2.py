"""Mamba-2 (Dao & Gu 2024): the SSD layer, a selective state space with one scalar decay per head.

Per layer, with d_inner = expand x d_model split into H heads of P channels,
G groups of (B, C) of state size N, and head h reading group h // (H / G):

    [z, xBC, dt] = x W_in                      z, x: [d_inner]; B, C: [G, N]; dt: [H]
    xBC          = silu(causal_conv1d(xBC))    depthwise, K taps, state carried across segments
    dt           = softplus(dt + dt_bias)      A = -exp(A_log)   (one per head)
    S_t          = exp(dt_t A) S_{t-1} + B_t^T (dt_t x_t)        S: [N, P] per head
    y_t          = C_t S_t + D x_t
    out          = W_out gated_rms_norm(y * silu(z))             RMS over each of the G groups of d_inner

The recurrence is the chunked linear recurrence (`longctx.kernels.linear_recurrence`)
with q = C, k = B, v = dt x and a per-head log decay dt A: the SSD algorithm
(quadratic masked product inside a chunk, a state pass between chunks);
`model.kernel` picks "reference" (token scan), "xla" (chunked) or "pallas".

Layout and conventions follow Hugging Face `Mamba2ForCausalLM`, so weights map
one to one (issue 7 exports them): `in_proj [d_model, 2 d_inner + 2 G N + H]`
(columns z | x | B | C | dt), `conv_weight [K, d_inner + 2 G N]` (HF
`conv1d.weight[c, 0, i]`), `conv_bias`, `dt_bias [H]`, `A_log [H]`, `D [H]`,
`norm [d_inner]`, `out_proj [d_inner, d_model]`; blocks are
`x + mixer(RMSNorm(x))` with no MLP, then a final RMSNorm (eps 1e-5
everywhere). Initialisation as HF/mamba_ssm: A_log = log(1..H), D = 1,
dt_bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max] floored at 1e-4.

A document starting inside a segment starts from a zero SSM state and a conv
that reads zeros before it; `reset` does the same per row at a segment start.

Hugging Face interop lives here too (`hf_config`, `hf_weight_map`, `config_from_hf`; models/hf.py).

State per layer (float32; which conv inputs belong to the open document follows from the shell's `pos`):
  conv:  [batch, K-1, d_inner + 2 G N]  the last K-1 conv inputs
  ssm:   [batch, H, N, P]  (HF's `[H, P, N]` transposed)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from longctx.config import ModelConfig
from longctx.errors import ConfigError
from longctx.layers import Mixer, dense, param, register_mixer
from longctx.layers.context import Context
from longctx.layers.recurrence import recurrence
from longctx.layers.ssm import causal_conv1d, init_dt_bias
from longctx.models import hf
from longctx.models.base import LM
from longctx.models.mamba import hf_backbone_map, hf_common_config, hf_common_fields
from longctx.models.registry import register_model


@dataclasses.dataclass
class Mamba2Config(ModelConfig):
  mixer = "mamba2"
  tiny = {"head_dim": 16, "state_size": 8, "chunk_size": 8}

  name: str = "mamba2"
  num_heads: int = 0  # 0 = expand x d_model // head_dim
  head_dim: int = 64  # P, channels per head
  state_size: int = 128  # N
  expand: int = 2  # d_inner = expand x d_model
  num_groups: int = 1  # G groups of (B, C), shared by H / G heads each
  conv_kernel: int = 4
  chunk_size: int = 64  # tokens per chunk of the SSD scan
  dt_min: float = 0.001
  dt_max: float = 0.1
  norm_eps: float = 1e-5

  def validate(self) -> None:
    super().validate()
    for key in ("head_dim", "state_size", "expand", "num_groups", "conv_kernel", "chunk_size"):
      if getattr(self, key) < 1:
        raise ConfigError(f"model.{key}={getattr(self, key)} must be >= 1")
    if self.d_inner % self.head_dim:
      raise ConfigError(f"expand x d_model = {self.d_inner} is not divisible by model.head_dim={self.head_dim}")
    if self.num_heads and self.num_heads * self.head_dim != self.d_inner:
      raise ConfigError(f"model.num_heads={self.num_heads} x model.head_dim={self.head_dim} must equal "
                        f"expand x d_model = {self.d_inner}; set model.num_heads=0 to derive it")
    if self.resolved_num_heads % self.num_groups:
      raise ConfigError(f"{self.resolved_num_heads} heads are not divisible by model.num_groups={self.num_groups}")
    if not 0 < self.dt_min <= self.dt_max:
      raise ConfigError(f"need 0 < model.dt_min={self.dt_min} <= model.dt_max={self.dt_max}")

  @property
  def d_inner(self) -> int:
    return self.expand * self.d_model

  @property
  def resolved_num_heads(self) -> int:
    return self.num_heads or self.d_inner // self.head_dim

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim

  @property
  def conv_dim(self) -> int:
    return self.d_inner + 2 * self.num_groups * self.state_size


def gated_rms_norm(y: jax.Array, z: jax.Array, weight: jax.Array, *, groups: int, eps: float) -> jax.Array:
  """`rms_norm(y * silu(z))` over each of `groups` equal slices of the last axis, then `* weight`.

  y, z `[..., d_inner]`, weight `[d_inner]`; computed in float32 (HF `MambaRMSNormGated`).
  """
  h = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
  g = h.reshape(*h.shape[:-1], groups, -1)
  g = g * lax.rsqrt(jnp.mean(g * g, axis=-1, keepdims=True) + eps)
  return (g.reshape(h.shape) * weight).astype(y.dtype)


def ssd(x, dt, a, b, c, d, *, segment_ids, initial_state, kernel, chunk_size):
  """The selective state space of one layer.

  Args:
    x: `[batch, seq, heads, head_dim]`; dt `[batch, seq, heads]` (after softplus);
    a: `[heads]` (negative); b, c: `[batch, seq, groups, state]`; d: `[heads]`.
    segment_ids: `[batch, seq]`; initial_state `[batch, heads, state, head_dim]`.
  Returns:
    `y [batch, seq, heads, head_dim]` float32 and the final state.
  """
  heads, groups = x.shape[2], b.shape[2]
  f32 = lambda t: t.astype(jnp.float32)
  x, dt = f32(x), f32(dt)
  b = jnp.repeat(f32(b), heads // groups, axis=2)
  c = jnp.repeat(f32(c), heads // groups, axis=2)
  y, state = recurrence(c, b, x * dt[..., None], log_decay=dt * a, segment_ids=segment_ids,
                        initial_state=initial_state, kernel=kernel, chunk_size=chunk_size)
  return y + d[:, None] * x, state


@register_mixer("mamba2")
class Mamba2Mixer(Mixer):
  """`x [batch, seq, d_model]` + {conv history, SSM state} -> output, new state. No MLP after it."""

  mlp = False

  def __init__(self, cfg: Mamba2Config, *, layer: int, rngs: nnx.Rngs):
    d, di, h = cfg.d_model, cfg.d_inner, cfg.resolved_num_heads
    self.cfg = cfg
    self.in_proj = param(rngs, (d, 2 * di + 2 * cfg.num_groups * cfg.state_size + h), ("embed", "mlp"), fan_in=d)
    # Depthwise conv: PyTorch's default (kaiming-uniform) bound 1/sqrt(K), as a normal of the same variance.
    self.conv_weight = param(rngs, (cfg.conv_kernel, cfg.conv_dim), ("conv", "mlp"), fan_in=3 * cfg.conv_kernel)
    self.conv_bias = nnx.Param(jnp.zeros((cfg.conv_dim,), jnp.float32), logical_axes=("mlp",))
    self.dt_bias = nnx.Param(init_dt_bias(rngs.params(), (h,), dt_min=cfg.dt_min, dt_max=cfg.dt_max),
                             logical_axes=("heads",))
    self.A_log = nnx.Param(jnp.log(jnp.arange(1, h + 1, dtype=jnp.float32)), logical_axes=("heads",))
    self.D = nnx.Param(jnp.ones((h,), jnp.float32), logical_axes=("heads",))
    self.norm = nnx.Param(jnp.ones((di,), jnp.float32), logical_axes=("mlp",))
    self.out_proj = param(rngs, (di, d), ("mlp", "embed"), fan_in=di, scale=1.0 / cfg.num_layers)

  def init_state(self, batch_size: int) -> dict:
    cfg = self.cfg
    return {"conv": jnp.zeros((batch_size, cfg.conv_kernel - 1, cfg.conv_dim), jnp.float32),
            "ssm": jnp.zeros((batch_size, cfg.resolved_num_heads, cfg.state_size, cfg.head_dim), jnp.float32)}

  def __call__(self, x, state, ctx: Context):
    cfg = self.cfg
    di, h, p, gn = cfg.d_inner, cfg.resolved_num_heads, cfg.head_dim, cfg.num_groups * cfg.state_size
    proj = dense(x, self.in_proj[...])
    z, xbc, dt = jnp.split(proj, [di, di + cfg.conv_dim], axis=-1)
    xbc, conv = causal_conv1d(xbc, self.conv_weight[...], self.conv_bias[...], history=state["conv"],
                              history_doc=ctx.history_doc(cfg.conv_kernel - 1), doc=ctx.doc)
    xs, b, c = jnp.split(jax.nn.silu(xbc), [di, di + gn], axis=-1)
    bsz, seq = x.shape[:2]
    dt = jax.nn.softplus(dt.astype(jnp.float32) + self.dt_bias[...])
    y, ssm = ssd(xs.reshape(bsz, seq, h, p), dt, -jnp.exp(self.A_log[...]),
                 b.reshape(bsz, seq, cfg.num_groups, -1), c.reshape(bsz, seq, cfg.num_groups, -1),
                 self.D[...], segment_ids=ctx.doc, initial_state=state["ssm"], kernel=cfg.kernel,
                 chunk_size=cfg.chunk_size)
    y = gated_rms_norm(y.reshape(bsz, seq, di), z, self.norm[...], groups=cfg.num_groups, eps=cfg.norm_eps)
    out = dense(y.astype(x.dtype), self.out_proj[...])
    return out, {"conv": conv, "ssm": ssm}

  @classmethod
  def reach(cls, cfg) -> int:
    return cfg.conv_kernel - 1

  @classmethod
  def flops_per_token(cls, cfg: Mamba2Config, *, seg_len: int) -> float:
    d, di, h, n, p = cfg.d_model, cfg.d_inner, cfg.resolved_num_heads, cfg.state_size, cfg.head_dim
    proj = 2 * d * (2 * di + 2 * cfg.num_groups * n + h) + 2 * di * d
    conv = 2 * cfg.conv_kernel * cfg.conv_dim
    chunk = 1 if cfg.kernel == "reference" else min(cfg.chunk_size, seg_len)
    scan = h * (2 * chunk * (n + p) / 2 + 4 * n * p)  # causal half of the chunk, state read + write
    return float(proj + conv + scan)

  @classmethod
  def activation_bytes_per_token(cls, cfg: Mamba2Config, *, dtype_bytes: int) -> float:
    return float((2 * cfg.d_model + 2 * cfg.d_inner + 2 * cfg.conv_dim) * dtype_bytes + 4 * cfg.d_inner * 4)


MAMBA2_MIXER_MAP = [
    ("in_proj", "in_proj.weight", hf.TRANSPOSE), ("conv_weight", "conv1d.weight", hf.CONV),
    ("conv_bias", "conv1d.bias", hf.IDENTITY), ("dt_bias", "dt_bias", hf.IDENTITY), ("A_log", "A_log", hf.IDENTITY),
    ("D", "D", hf.IDENTITY), ("norm", "norm.weight", hf.IDENTITY), ("out_proj", "out_proj.weight", hf.TRANSPOSE)]


@register_model("mamba2", config=Mamba2Config,
                description="Mamba-2: SSD (scalar-decay selective state space) through the chunked kernel, O(1) state")
class Mamba2(LM):
  context_parallel = "sequence-parallel linear recurrence (SSD on the chunked kernel)"
  hf_model_type = "mamba2"

  @classmethod
  def hf_config(cls, cfg: Mamba2Config) -> dict:
    return {"architectures": ["Mamba2ForCausalLM"], "model_type": "mamba2", **hf_common_config(cfg),
            "num_heads": cfg.resolved_num_heads, "head_dim": cfg.head_dim, "n_groups": cfg.num_groups,
            "chunk_size": cfg.chunk_size, "time_step_rank": math.ceil(cfg.d_model / 16)}

  @classmethod
  def hf_weight_map(cls, cfg: Mamba2Config) -> list:
    return hf_backbone_map(cfg, MAMBA2_MIXER_MAP)

  @classmethod
  def config_from_hf(cls, hf_cfg: Mapping) -> Mamba2Config:
    try:
      limit = [hf.hf_float(x) for x in hf_cfg.get("time_step_limit", (0.0, math.inf))]
      if limit != [0.0, math.inf]:
        raise ConfigError(f"Hugging Face config time_step_limit={limit} clamps the time step, which longctx "
                          "mamba2 does not; it needs time_step_limit=[0.0, inf]")
      base, arch = hf_common_fields(hf_cfg, "mamba2")
      heads, head_dim = int(hf_cfg["num_heads"]), int(hf_cfg["head_dim"])
      derived = arch["expand"] * arch["d_model"] // head_dim
      arch.update(num_heads=heads if heads != derived or base.get("num_heads") == heads else 0, head_dim=head_dim,
                  num_groups=int(hf_cfg.get("n_groups", 8)))
    except (KeyError, TypeError, ValueError) as e:
      raise ConfigError(f"Hugging Face config is missing or has a bad {e}; expected a transformers mamba2 "
                        "config.json") from None
    return hf.config_of(Mamba2Config, {**base, **arch})
