"""Mamba (Gu & Dao 2023): the selective state space layer (S6), a diagonal decay per channel and state.

Per layer, with d_inner = expand x d_model channels, state size N and time-step rank R:

    [x, z]    = u W_in                           x, z: [d_inner]
    x         = silu(causal_conv1d(x))           depthwise, K taps, state carried across segments
    [r, B, C] = x W_x                            r: [R]; B, C: [N] (shared by every channel)
    dt        = softplus(r W_dt + dt_bias)       [d_inner]
    h_t[c, n] = exp(dt_t[c] A[c, n]) h_{t-1}[c, n] + dt_t[c] B_t[n] x_t[c]     A = -exp(A_log)  [d_inner, N]
    y_t[c]    = sum_n C_t[n] h_t[c, n] + D[c] x_t[c]
    out       = (y * silu(z)) W_out

The scan runs as `scan`:
  "fused"        kernels/selective_scan.py through layers/recurrence.py, by `model.kernel`: the Mamba
                 paper's fused scan. Pallas kernels (TPU, GPU) keep a block of channels' states on chip; the
                 XLA form scans chunks of `chunk_size` tokens, unrolled inside. Both save only the state at
                 each chunk start and recompute a chunk's states in the backward, so one chunk's states are
                 alive at a time (the default; context-parallel over a `sequence` mesh axis).
  "associative"  one `lax.associative_scan` over the whole segment: materialises every h_t
                 `[batch, seq, d_inner, N]` (N times the activations; 1.8 GiB of temporaries at d_model 128).
                 Context parallelism switches it to "fused".
  "chunked"      the linear-recurrence kernel with a per-key-channel decay, read as d_inner heads with
                 key_dim N and value_dim 1 (q = C, k = B, v = dt x): a cross-check.
Measured on one CPU core (d_model 128, 2 layers, 4096 tokens per train step): "fused" 9.8K tok/s at
128-token segments (1.22x Mamba-2's 8.0K), 11.2K at 512 (1.41x); "associative" was 0.32x Mamba-2.

Layout and conventions follow Hugging Face `MambaForCausalLM`, so weights map one
to one (issue 7 exports them): `in_proj [d_model, 2 d_inner]` (columns x | z),
`conv_weight [K, d_inner]` (HF `conv1d.weight[c, 0, i]`), `conv_bias`,
`x_proj [d_inner, R + 2N]` (columns r | B | C), `dt_proj [R, d_inner]`, `dt_bias`
(HF `dt_proj.bias`), `A_log [d_inner, N]`, `D [d_inner]`, `out_proj`; blocks are
`x + mixer(RMSNorm(x))` with no MLP, a final RMSNorm, eps 1e-5. Initialisation
as mamba_ssm: A_log = log(1..N) per channel, D = 1, dt_proj uniform in
+-R^-0.5, dt_bias = softplus^-1(dt) with dt log-uniform in [dt_min, dt_max].

A document starting inside a segment starts from a zero state and a conv that
reads zeros before it; `reset` does the same per row at a segment start.

Hugging Face interop lives here too (`hf_config`, `hf_weight_map`, `config_from_hf`; models/hf.py):
`longctx export --format hf` writes a directory `MambaForCausalLM.from_pretrained` loads, and
`longctx import-hf` reads one.

State per layer (float32; which conv inputs belong to the open document follows from the shell's `pos`):
  conv:  [batch, K-1, d_inner]  the last K-1 conv inputs
  ssm:   [batch, d_inner, N]  (HF's layout)
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
from longctx.layers.recurrence import fused_selective_scan, recurrence
from longctx.layers.ssm import causal_conv1d, init_dt_bias
from longctx.models import hf
from longctx.models.base import LM
from longctx.models.registry import register_model
from longctx.sharding import context_parallel_size

SCANS = ("fused", "associative", "chunked")


@dataclasses.dataclass
class MambaConfig(ModelConfig):
  mixer = "mamba"
  tiny = {"state_size": 4, "chunk_size": 8}

  name: str = "mamba"
  state_size: int = 16  # N
  expand: int = 2  # d_inner = expand x d_model
  conv_kernel: int = 4
  dt_rank: int = 0  # R; 0 = ceil(d_model / 16)
  dt_min: float = 0.001
  dt_max: float = 0.1
  scan: str = "fused"  # "fused" (the selective-scan kernels), "associative" or "chunked" (module docstring)
  chunk_size: int = 16  # tokens per chunk of the fused and chunked scans (fused kernels: a multiple of 8)
  norm_eps: float = 1e-5

  def validate(self) -> None:
    super().validate()
    for key in ("state_size", "expand", "conv_kernel", "chunk_size"):
      if getattr(self, key) < 1:
        raise ConfigError(f"model.{key}={getattr(self, key)} must be >= 1")
    if self.dt_rank < 0:
      raise ConfigError(f"model.dt_rank={self.dt_rank} must be >= 0 (0 = ceil(d_model / 16))")
    if self.scan not in SCANS:
      raise ConfigError(f"model.scan={self.scan!r} is not one of {SCANS}")
    if self.scan == "fused" and self.kernel == "pallas" and self.chunk_size % 8:
      raise ConfigError(f"model.chunk_size={self.chunk_size}: the fused selective-scan kernels need a multiple of 8")
    if not 0 < self.dt_min <= self.dt_max:
      raise ConfigError(f"need 0 < model.dt_min={self.dt_min} <= model.dt_max={self.dt_max}")

  @property
  def d_inner(self) -> int:
    return self.expand * self.d_model

  @property
  def resolved_dt_rank(self) -> int:
    return self.dt_rank or math.ceil(self.d_model / 16)


def selective_scan_associative(x, dt, a, b, c, *, segment_ids, initial_state):
  """h_t = exp(dt_t a) h_{t-1} + dt_t b_t x_t, y_t = c_t h_t, as a parallel prefix over (decay, input).

  Args:
    x, dt: `[batch, seq, d_inner]`; a `[d_inner, N]` (negative); b, c `[batch, seq, N]`.
    segment_ids: `[batch, seq]` (the state is zeroed where a document starts);
    initial_state: `[batch, d_inner, N]`, belongs to the first token's document.
  Returns:
    `y [batch, seq, d_inner]` float32 (no D term) and the final state `[batch, d_inner, N]`.
  """
  starts = jnp.concatenate([jnp.zeros_like(segment_ids[:, :1], bool),
                            segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  decay = jnp.where(starts[..., None, None], 0.0, jnp.exp(dt[..., None] * a))  # [b, s, d, n]
  inputs = (dt * x)[..., None] * b[:, :, None, :]
  inputs = inputs.at[:, 0].add(decay[:, 0] * initial_state)

  def combine(left, right):
    return left[0] * right[0], right[0] * left[1] + right[1]

  _, h = lax.associative_scan(combine, (decay, inputs), axis=1)
  return jnp.einsum("bsdn,bsn->bsd", h, c), h[:, -1]


def selective_scan(x, dt, a, b, c, d, *, segment_ids, initial_state, scan, kernel, chunk_size):
  """The S6 scan of one layer: `y [batch, seq, d_inner]` float32 (D term included) and the final state."""
  f32 = lambda t: t.astype(jnp.float32)
  x, dt, b, c = f32(x), f32(dt), f32(b), f32(c)
  if scan == "associative" and context_parallel_size() > 1:
    scan = "fused"  # the associative scan has no sequence-parallel form
  if scan == "fused":
    y, state = fused_selective_scan(x, dt, a, b, c, segment_ids=segment_ids, initial_state=initial_state,
                                    kernel=kernel, chunk_size=chunk_size)
  elif scan == "associative":
    y, state = selective_scan_associative(x, dt, a, b, c, segment_ids=segment_ids, initial_state=initial_state)
  else:  # d_inner heads, key_dim N, value_dim 1
    channels = x.shape[-1]
    wide = lambda t: jnp.broadcast_to(t[:, :, None, :], t.shape[:2] + (channels, t.shape[-1]))
    y, state = recurrence(wide(c), wide(b), (dt * x)[..., None], log_decay=dt[..., None] * a,
                          segment_ids=segment_ids, initial_state=initial_state[..., None], kernel=kernel,
                          chunk_size=chunk_size)
    y, state = y[..., 0], state[..., 0]
  return y + d * x, state


@register_mixer("mamba")
class MambaMixer(Mixer):
  """`x [batch, seq, d_model]` + {conv history, SSM state} -> output, new state. No MLP after it."""

  mlp = False

  def __init__(self, cfg: MambaConfig, *, layer: int, rngs: nnx.Rngs):
    d, di, n, r = cfg.d_model, cfg.d_inner, cfg.state_size, cfg.resolved_dt_rank
    self.cfg = cfg
    self.in_proj = param(rngs, (d, 2 * di), ("embed", "mlp"), fan_in=d)
    # Depthwise conv: PyTorch's default (kaiming-uniform) bound 1/sqrt(K), as a normal of the same variance.
    self.conv_weight = param(rngs, (cfg.conv_kernel, di), ("conv", "mlp"), fan_in=3 * cfg.conv_kernel)
    self.conv_bias = nnx.Param(jnp.zeros((di,), jnp.float32), logical_axes=("mlp",))
    self.x_proj = param(rngs, (di, r + 2 * n), ("mlp", None), fan_in=di)
    bound = r ** -0.5
    self.dt_proj = nnx.Param(jax.random.uniform(rngs.params(), (r, di), jnp.float32, -bound, bound),
                             logical_axes=(None, "mlp"))
    self.dt_bias = nnx.Param(init_dt_bias(rngs.params(), (di,), dt_min=cfg.dt_min, dt_max=cfg.dt_max),
                             logical_axes=("mlp",))
    self.A_log = nnx.Param(jnp.log(jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.float32), (di, n))),
                           logical_axes=("mlp", "state"))
    self.D = nnx.Param(jnp.ones((di,), jnp.float32), logical_axes=("mlp",))
    self.out_proj = param(rngs, (di, d), ("mlp", "embed"), fan_in=di, scale=1.0 / cfg.num_layers)

  def init_state(self, batch_size: int) -> dict:
    cfg = self.cfg
    return {"conv": jnp.zeros((batch_size, cfg.conv_kernel - 1, cfg.d_inner), jnp.float32),
            "ssm": jnp.zeros((batch_size, cfg.d_inner, cfg.state_size), jnp.float32)}

  def __call__(self, u, state, ctx: Context):
    cfg = self.cfg
    dtype = u.dtype
    x, z = jnp.split(dense(u, self.in_proj[...]), 2, axis=-1)
    x, conv = causal_conv1d(x, self.conv_weight[...], self.conv_bias[...], history=state["conv"],
                            history_doc=ctx.history_doc(cfg.conv_kernel - 1), doc=ctx.doc)
    x = jax.nn.silu(x)
    r, b, c = jnp.split(dense(x, self.x_proj[...].astype(dtype)),
                        [cfg.resolved_dt_rank, cfg.resolved_dt_rank + cfg.state_size], axis=-1)
    dt = jax.nn.softplus(dense(r.astype(jnp.float32), self.dt_proj[...]) + self.dt_bias[...])
    y, ssm = selective_scan(x, dt, -jnp.exp(self.A_log[...]), b, c, self.D[...], segment_ids=ctx.doc,
                            initial_state=state["ssm"], scan=cfg.scan, kernel=cfg.kernel, chunk_size=cfg.chunk_size)
    y = (y * jax.nn.silu(z.astype(jnp.float32))).astype(dtype)
    return dense(y, self.out_proj[...]), {"conv": conv, "ssm": ssm}

  @classmethod
  def reach(cls, cfg) -> int:
    return cfg.conv_kernel - 1

  @classmethod
  def flops_per_token(cls, cfg: MambaConfig, *, seg_len: int) -> float:
    d, di, n, r = cfg.d_model, cfg.d_inner, cfg.state_size, cfg.resolved_dt_rank
    proj = 2 * d * 2 * di + 2 * di * (r + 2 * n) + 2 * r * di + 2 * di * d
    conv = 2 * cfg.conv_kernel * di
    scan = 6 * di * n  # decay x state + input, read with C
    return float(proj + conv + scan)

  @classmethod
  def activation_bytes_per_token(cls, cfg: MambaConfig, *, dtype_bytes: int) -> float:
    return float((2 * cfg.d_model + 4 * cfg.d_inner) * dtype_bytes + 3 * cfg.d_inner * cfg.state_size * 4)


# ----------------------------------------------------------------------------- Hugging Face


def hf_common_config(cfg) -> dict:
  """The transformers config keys Mamba and Mamba-2 share.

  `time_step_*` and `rescale_prenorm_residual` only steer HF's initialisation; `residual_in_fp32` (HF keeps
  the residual stream in float32) changes nothing for float32 weights.
  """
  return {
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.num_layers,
      "state_size": cfg.state_size, "expand": cfg.expand, "conv_kernel": cfg.conv_kernel,
      "layer_norm_epsilon": cfg.norm_eps, "use_bias": False, "use_conv_bias": True, "hidden_act": "silu",
      "residual_in_fp32": True, "time_step_min": cfg.dt_min, "time_step_max": cfg.dt_max,
      "time_step_floor": 1e-4, "rescale_prenorm_residual": False, "initializer_range": 0.1, "use_cache": True,
      "tie_word_embeddings": bool(cfg.tie_embeddings), "dtype": "float32",
  }


def hf_backbone_map(cfg, mixer_map) -> list[tuple[str, str, hf.Transform]]:
  """Every (our name, HF name, transform) of a Mamba-family model whose mixer maps by `mixer_map`."""
  pairs = [("embedding.table", "backbone.embeddings.weight", hf.IDENTITY),
           ("final_norm.scale", "backbone.norm_f.weight", hf.IDENTITY)]
  if not cfg.tie_embeddings:
    pairs.append(("embedding.head", "lm_head.weight", hf.TRANSPOSE))
  for i in range(cfg.num_layers):
    pairs.append((f"blocks.{i}.norm.scale", f"backbone.layers.{i}.norm.weight", hf.IDENTITY))
    pairs += [(f"blocks.{i}.mixer.{ours}", f"backbone.layers.{i}.mixer.{theirs}", fns)
              for ours, theirs, fns in mixer_map]
  return pairs


def hf_common_fields(hf_cfg: Mapping, kind: str) -> tuple[dict, dict]:
  """(the longctx config a longctx export saved in it, or {"name": kind}; the shared architecture fields)."""
  hf.require(hf_cfg, "use_bias", False, kind=kind)
  hf.require(hf_cfg, "hidden_act", "silu", kind=kind)
  saved = (hf_cfg.get("longctx") or {}).get("model") or {}
  base = dict(saved) if saved.get("name") == kind else {"name": kind}
  arch = {"vocab_size": int(hf_cfg["vocab_size"]), "d_model": int(hf_cfg["hidden_size"]),
          "num_layers": int(hf_cfg["num_hidden_layers"]), "state_size": int(hf_cfg["state_size"]),
          "expand": int(hf_cfg.get("expand", 2)), "conv_kernel": int(hf_cfg.get("conv_kernel", 4)),
          "norm_eps": float(hf_cfg.get("layer_norm_epsilon", 1e-5)),
          "tie_embeddings": bool(hf_cfg.get("tie_word_embeddings", kind == "mamba")),
          "dt_min": float(hf_cfg.get("time_step_min", 0.001)), "dt_max": float(hf_cfg.get("time_step_max", 0.1))}
  inner = int(hf_cfg.get("intermediate_size", arch["d_model"] * arch["expand"]))
  if arch["d_model"] * arch["expand"] != inner:
    raise ConfigError(f"Hugging Face config intermediate_size={inner} is not expand x hidden_size, which longctx "
                      "needs")
  return base, arch


MAMBA_MIXER_MAP = [
    ("in_proj", "in_proj.weight", hf.TRANSPOSE), ("conv_weight", "conv1d.weight", hf.CONV),
    ("conv_bias", "conv1d.bias", hf.IDENTITY), ("x_proj", "x_proj.weight", hf.TRANSPOSE),
    ("dt_proj", "dt_proj.weight", hf.TRANSPOSE), ("dt_bias", "dt_proj.bias", hf.IDENTITY),
    ("A_log", "A_log", hf.IDENTITY), ("D", "D", hf.IDENTITY), ("out_proj", "out_proj.weight", hf.TRANSPOSE)]


@register_model("mamba", config=MambaConfig,
                description="Mamba: selective state space (S6) with a per-channel decay, O(1) state")
class Mamba(LM):
  context_parallel = "sequence-parallel linear recurrence (the chunked kernel instead of the associative scan)"
  hf_model_type = "mamba"

  @classmethod
  def hf_config(cls, cfg: MambaConfig) -> dict:
    return {"architectures": ["MambaForCausalLM"], "model_type": "mamba", **hf_common_config(cfg),
            "intermediate_size": cfg.d_inner, "time_step_rank": cfg.resolved_dt_rank, "time_step_scale": 1.0,
            "time_step_init_scheme": "random", "use_mambapy": False}

  @classmethod
  def hf_weight_map(cls, cfg: MambaConfig) -> list:
    return hf_backbone_map(cfg, MAMBA_MIXER_MAP)

  @classmethod
  def config_from_hf(cls, hf_cfg: Mapping) -> MambaConfig:
    try:
      base, arch = hf_common_fields(hf_cfg, "mamba")
      auto = math.ceil(arch["d_model"] / 16)
      rank = hf_cfg.get("time_step_rank", "auto")
      rank = auto if rank == "auto" else int(rank)
      arch["dt_rank"] = rank if rank != auto or base.get("dt_rank") == rank else 0  # 0 = derived, our default
    except (KeyError, TypeError, ValueError) as e:
      raise ConfigError(f"Hugging Face config is missing or has a bad {e}; expected a transformers mamba "
                        "config.json") from None
    return hf.config_of(MambaConfig, {**base, **arch})
