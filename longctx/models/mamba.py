"""Mamba (Gu & Dao 2023): the selective state space layer (S6), a diagonal decay per channel and state.

Per layer, with d_inner = expand x d_model channels, state size N and time-step rank R:

    [x, z]    = u W_in                           x, z: [d_inner]
    x         = silu(causal_conv1d(x))           depthwise, K taps, state carried across segments
    [r, B, C] = x W_x                            r: [R]; B, C: [N] (shared by every channel)
    dt        = softplus(r W_dt + dt_bias)       [d_inner]
    h_t[c, n] = exp(dt_t[c] A[c, n]) h_{t-1}[c, n] + dt_t[c] B_t[n] x_t[c]     A = -exp(A_log)  [d_inner, N]
    y_t[c]    = sum_n C_t[n] h_t[c, n] + D[c] x_t[c]
    out       = (y * silu(z)) W_out

The scan is a linear recurrence with a per-(channel, state) decay, so it can run
as `scan_impl`:
  "associative"  `lax.associative_scan` over (decay, input) pairs: log-depth,
                 materialises every h_t `[batch, seq, d_inner, N]` (the default);
  "reference"    the kernel's token scan (`linear_recurrence_reference`);
  "xla"/"pallas" the chunked kernel with a per-key-channel decay, read as
                 d_inner heads with key_dim N and value_dim 1 (q = C, k = B, v = dt x).
Measured on 2 CPU cores (d_model 128, 2 layers, train step): associative 5.5K
tok/s, token scan 5.3K, chunked 0.5K at 128-token segments; at 1024 the token
scan leads (4.0K vs 2.8K). The chunked form's [C, C, N] decay ratios with a
value_dim of 1 do far more work than the scan, so it is a cross-check here,
not the fast path: Mamba-2's scalar decay is what makes SSD's matmuls pay.

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

State (every leaf batch-first, float32):
  conv:       [batch, layers, K-1, d_inner]  the last K-1 conv inputs
  conv_valid: [batch, K-1] bool  they belong to the open document
  ssm:        [batch, layers, d_inner, N]  (HF's layout)
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from longctx.config import ModelConfig
from longctx.errors import ConfigError
from longctx.kernels.linear_recurrence import IMPLS
from longctx.layers.recurrence import recurrence
from longctx.sharding import context_parallel_size
from longctx.layers import RMSNorm, param
from longctx.layers.ssm import causal_conv1d, init_dt_bias
from longctx.models.base import SegmentLM, reset_rows
from longctx.models.registry import register_model
from longctx.models.transformer import Embedding, segment_doc_ids

SCAN_IMPLS = ("associative",) + IMPLS


@dataclasses.dataclass
class MambaConfig(ModelConfig):
  name: str = "mamba"
  num_heads: int = 1  # unused (Mamba has no heads); kept so shared code finds the field
  state_size: int = 16  # N
  expand: int = 2  # d_inner = expand x d_model
  conv_kernel: int = 4
  dt_rank: int = 0  # R; 0 = ceil(d_model / 16)
  dt_min: float = 0.001
  dt_max: float = 0.1
  scan_impl: str = "associative"  # "associative", "reference", "xla" (chunked) or "pallas"
  chunk_size: int = 16  # tokens per chunk of the "xla"/"pallas" scans
  norm_eps: float = 1e-5

  def validate(self) -> None:
    for key in ("vocab_size", "d_model", "num_layers", "state_size", "expand", "conv_kernel", "chunk_size"):
      if getattr(self, key) < 1:
        raise ConfigError(f"model.{key}={getattr(self, key)} must be >= 1")
    if self.dt_rank < 0:
      raise ConfigError(f"model.dt_rank={self.dt_rank} must be >= 0 (0 = ceil(d_model / 16))")
    if self.scan_impl not in SCAN_IMPLS:
      raise ConfigError(f"model.scan_impl={self.scan_impl!r} is not one of {SCAN_IMPLS}")
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


def selective_scan(x, dt, a, b, c, d, *, segment_ids, initial_state, impl, chunk_size):
  """The S6 scan of one layer: `y [batch, seq, d_inner]` float32 (D term included) and the final state."""
  f32 = lambda t: t.astype(jnp.float32)
  x, dt, b, c = f32(x), f32(dt), f32(b), f32(c)
  if impl == "associative" and context_parallel_size() > 1:
    impl = "xla"  # the associative scan has no sequence-parallel form; the kernel's per-channel one does
  if impl == "associative":
    y, state = selective_scan_associative(x, dt, a, b, c, segment_ids=segment_ids, initial_state=initial_state)
  else:  # d_inner heads, key_dim N, value_dim 1
    channels = x.shape[-1]
    wide = lambda t: jnp.broadcast_to(t[:, :, None, :], t.shape[:2] + (channels, t.shape[-1]))
    y, state = recurrence(wide(c), wide(b), (dt * x)[..., None], log_decay=dt[..., None] * a,
                          segment_ids=segment_ids, initial_state=initial_state[..., None], impl=impl,
                          chunk_size=chunk_size)
    y, state = y[..., 0], state[..., 0]
  return y + d * x, state


class MambaMixer(nnx.Module):
  """`x [batch, seq, d_model]` + (conv history, SSM state) -> output and the new states."""

  def __init__(self, cfg: MambaConfig, *, rngs: nnx.Rngs):
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

  def __call__(self, u, *, conv_state, conv_valid, ssm_state, doc):
    """u `[batch, seq, d_model]`, conv_state `[batch, K-1, d_inner]`, conv_valid `[batch, K-1]`,
    ssm_state `[batch, d_inner, N]`, doc `[batch, seq]` -> (out, conv_state, conv_valid, ssm_state)."""
    cfg = self.cfg
    dtype = u.dtype
    x, z = jnp.split(jnp.einsum("bsd,dp->bsp", u, self.in_proj[...].astype(dtype)), 2, axis=-1)
    x, conv_state, conv_valid = causal_conv1d(x, self.conv_weight[...], self.conv_bias[...], history=conv_state,
                                              history_valid=conv_valid, doc=doc)
    x = jax.nn.silu(x)
    r, b, c = jnp.split(jnp.einsum("bsi,ip->bsp", x, self.x_proj[...].astype(dtype)),
                        [cfg.resolved_dt_rank, cfg.resolved_dt_rank + cfg.state_size], axis=-1)
    dt = jax.nn.softplus(jnp.einsum("bsr,ri->bsi", r.astype(jnp.float32), self.dt_proj[...]) + self.dt_bias[...])
    y, ssm_state = selective_scan(x, dt, -jnp.exp(self.A_log[...]), b, c, self.D[...], segment_ids=doc,
                                  initial_state=ssm_state, impl=cfg.scan_impl, chunk_size=cfg.chunk_size)
    y = (y * jax.nn.silu(z.astype(jnp.float32))).astype(dtype)
    return jnp.einsum("bsi,id->bsd", y, self.out_proj[...].astype(dtype)), conv_state, conv_valid, ssm_state


class MambaBlock(nnx.Module):
  """`x + mixer(RMSNorm(x))`, no MLP (Mamba and Mamba-2 alike)."""

  def __init__(self, cfg, mixer: nnx.Module):
    self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    self.mixer = mixer

  def __call__(self, x, **kwargs):
    y, *states = self.mixer(self.norm(x), **kwargs)
    return x + y, *states


@register_model("mamba", config=MambaConfig,
                description="Mamba: selective state space (S6) with a per-channel decay, O(1) state")
class Mamba(SegmentLM):
  context_parallel = "sequence-parallel linear recurrence (the chunked kernel instead of the associative scan)"
  """Embedding, `num_layers` Mamba blocks, final RMSNorm, LM head. Mamba-2 reuses it with its own mixer."""

  mixer_class: type = MambaMixer

  def __init__(self, cfg: MambaConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embedding = Embedding(cfg, rngs=rngs)
    self.blocks = nnx.List([MambaBlock(cfg, self.mixer_class(cfg, rngs=rngs)) for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)

  @classmethod
  def state_shapes(cls, cfg: MambaConfig) -> tuple[int, tuple[int, ...]]:
    """Channels of the conv, shape of one layer's SSM state."""
    return cfg.d_inner, (cfg.d_inner, cfg.state_size)

  def init_state(self, batch_size: int):
    cfg = self.cfg
    conv_channels, ssm_shape = self.state_shapes(cfg)
    return {
        "conv": jnp.zeros((batch_size, cfg.num_layers, cfg.conv_kernel - 1, conv_channels), jnp.float32),
        "conv_valid": jnp.zeros((batch_size, cfg.conv_kernel - 1), bool),
        "ssm": jnp.zeros((batch_size, cfg.num_layers) + ssm_shape, jnp.float32),
    }

  def __call__(self, tokens, state, *, reset, segment_ids=None):
    self.check_segment_shapes(tokens, reset)
    state = reset_rows(state, self.init_state(tokens.shape[0]), reset)
    doc = segment_doc_ids(segment_ids, tokens)
    x = self.embedding.embed(tokens, self.embedding.table[...].dtype)
    convs, ssms, conv_valid = [], [], state["conv_valid"]
    for i, block in enumerate(self.blocks):
      x, conv, conv_valid, ssm = block(x, conv_state=state["conv"][:, i], conv_valid=state["conv_valid"],
                                       ssm_state=state["ssm"][:, i], doc=doc)
      convs.append(conv.astype(jnp.float32))
      ssms.append(ssm)
    logits = self.embedding.logits(self.final_norm(x))
    return logits, {"conv": jnp.stack(convs, axis=1), "conv_valid": conv_valid, "ssm": jnp.stack(ssms, axis=1)}

  @classmethod
  def flops_per_token(cls, cfg: MambaConfig, *, seg_len: int) -> float:
    d, di, n, r = cfg.d_model, cfg.d_inner, cfg.state_size, cfg.resolved_dt_rank
    proj = 2 * d * 2 * di + 2 * di * (r + 2 * n) + 2 * r * di + 2 * di * d
    conv = 2 * cfg.conv_kernel * di
    scan = 6 * di * n  # decay x state + input, read with C
    return float(cfg.num_layers * (proj + conv + scan) + 2 * d * cfg.vocab_size)

  @classmethod
  def activation_bytes_per_token(cls, cfg: MambaConfig, *, dtype_bytes: int) -> float:
    per_layer = (2 * cfg.d_model + 4 * cfg.d_inner) * dtype_bytes + 3 * cfg.d_inner * cfg.state_size * 4
    return float(cfg.num_layers * per_layer)
