"""Titans (Behrouz et al. 2025): a neural long-term memory that learns at test time.

Each layer has a neural memory: an MLP whose *weights* are the state, written at test time by chunked
gradient steps with data-dependent momentum, step size and decay, and read with a forward pass
(`M*(q)`). Its math and its streaming plan (segments of any length, token by token included, documents
starting anywhere) are longctx/layers/neural_memory.py; here are its projections and gates
(`NeuralMemory`: q, k, v = SiLU(x W), q and k L2-normalised; eta, theta, alpha = sigmoid(x W_g + b_g),
theta times memory_lr / memory_hidden; the heads' reads combined by W_o) and the two layers around it.

Variants (each layer: pre-RMSNorm, then the token mixer below, then the baseline's gated MLP):
  MAG (memory as gate): sliding-window attention over [persistent; XL cache; segment] (the baseline's
      window and cache) and the neural memory over the layer input x, combined as
      o = Attn(x) * sigmoid(N(M*(q) W_o)), N an RMSNorm with a learned scale ("normalised with learnable
      vector-valued weights, then a non-linearity"); the attention branch keeps its residual scale
      (Wo initialised small) instead of being normalised too.
  MAC (memory as context): the MAC segment is the memory chunk (the paper updates the memory once
      per segment). Per token t of a segment: h_t = M*_{segment start}(q_t) W_o, q_t from x_t; attention
      over [persistent; h_j, x_j for j <= t in the segment]; M is written with k, v from the
      attention output y (RMS-normalised); o_t = y_t * sigmoid(N(M*(q'_t) W_o)), q' from y_t, read at the
      segment start too. No attention across segments (`window` is unused): the memory is the only way back.
  MAL (memory as layer) is not implemented.

Context parallelism (mesh `sequence` axis n > 1 dividing the segment): MAG's sliding-window attention
runs the ring over the segment's shards with the XL cache and the persistent prefix as local blocks
(the attention entry, layers/attention.py). The neural memory has no such form: each chunk's gradients are taken
at the weights the previous chunk left, a non-linear recurrence, so its scan over chunks runs on
inputs XLA gathers along `sequence`. MAC's attention spans one chunk inside that scan; it has no
context-parallel form either.

Deviations from the paper, and why:
  * MAC: the paper puts the whole segment's retrieval h in front of the segment; in a causal LM
    h_j (a read with x_j's query) would leak x_j to tokens before j, so token t sees h_j for j <= t
    only. The paper's final read M*_t(y_t) uses the memory after the segment's own update, which
    would leak later tokens of the segment; we read at the segment start. With these two changes MAC
    is causal and decodes token by token like MAG.
  * Persistent memory is a learned (key, value) prefix per layer, visible to every token and
    position-free (the all-attention memory the paper cites), not tokens prepended to the input:
    prepended tokens would be written into the neural memory at every document start.
  * The short depthwise conv after the q, k, v projections is left out; `embed_conv` (a causal
    conv over token embeddings, as in the other models) gives the first layer the same local view.
  * theta_t is scaled by memory_lr / memory_hidden: ||grad|| of the squared loss grows with the hidden
    width, and a step of theta ~ 1 would overshoot (||h||^2 ~ hidden); the outer training tunes the
    gates from there. The gates are per token and per head, as in the paper (lucidrains/titans-pytorch
    shares them across a chunk, averaged).
  * `memory_grad_clip` > 0 caps the norm of each chunk's two gradient sums (into S and into M) per lane
    and head, as lucidrains' `max_grad_norm` caps per-token gradients. On by default (1.0); 0 is the
    paper's unclipped update, which diverges: in a recall run within 15 outer steps (memory weights
    ~5e3 after one 256-token segment, then NaN), and even at initialisation on random tokens (the
    tests' 2-layer MAC model: max |W| 39 after one 16-token segment, 1.5e13 after the second, NaN
    after the third), a positive feedback of the MLP's curvature growing with its weights. With
    decay, a bounded update keeps the weights bounded (tested).

State per layer (float32; H memory heads, dm memory head dim; the open chunk holds the last
`pos mod C` tokens, from the shell's `pos`):
  weights: list of D arrays [batch, H, in_j, out_j]   memory weights at the last chunk boundary
  momentum: list of D arrays, same shapes             the surprise S at that boundary
  mem_k, mem_v: [batch, C, H, dm]; mem_z: [batch, C, H, 3]   k, v, gate logits of the last C tokens
  MAG: k, v [batch, window, kv_heads, head_dim]        the XL cache
  MAC: h_k, h_v, x_k, x_v [batch, C, kv_heads, head_dim]   attention keys/values of the last C tokens
The learned initial weights are parameters; `init_state` holds zeros and `fresh_state` (applied where
`reset` is set) the initial weights.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from longctx.errors import ConfigError
from longctx.layers import RMSNorm, dense, l2_normalize, param, register_mixer
from longctx.layers.attention import Keys, WindowAttention, attention, project, rotary
from longctx.layers.context import Context
from longctx.layers.neural_memory import (_rows, _take, advance_carry, checkpoint_group, fold_open_chunk, memory_segment,
                                         merge_steps, read_memory, read_planned, restart_carry, scan_steps,
                                         step_inputs, step_plan)
from longctx.models.base import LM
from longctx.models.registry import register_model
from longctx.models.transformer import TransformerConfig

VARIANTS = ("mag", "mac")
GATE_BIAS = (1.0, 0.0, -4.0)  # initial eta ~ 0.73, theta ~ 0.5 x lr / hidden, alpha ~ 0.018


@dataclasses.dataclass
class TitansConfig(TransformerConfig):
  tiny = {"chunk_size": 4, "memory_heads": 2, "num_persistent": 2, "embed_conv": 4}

  name: str = "titans"
  variant: str = "mag"  # "mag" (memory as gate) or "mac" (memory as context)
  memory_depth: int = 2  # layers of the memory MLP (>= 2)
  memory_heads: int = 1  # independent memories per layer, each of dim d_model / memory_heads
  memory_hidden: int = 0  # hidden width of the memory MLP (0 = 2 x the memory head dim)
  chunk_size: int = 16  # tokens per memory update (MAC: also the attention segment)
  num_persistent: int = 4  # learned (key, value) pairs every token attends to
  memory_lr: float = 1.0  # theta_t = memory_lr * sigmoid(.) / memory_hidden
  memory_grad_clip: float = 1.0  # > 0: cap the norm of each chunk's inner update (0 = off, the paper; diverges)
  memory_checkpoint: int = 0  # chunks per carry kept for the backward: 0 = auto (~sqrt), -1 = all (faster, more memory)

  def validate(self) -> None:
    super().validate()
    if self.variant not in VARIANTS:
      raise ConfigError(f"model.variant={self.variant!r} is not one of {VARIANTS}")
    if self.memory_depth < 2:
      raise ConfigError(f"model.memory_depth={self.memory_depth} must be >= 2 (a deep memory, as in the paper)")
    if self.memory_heads < 1 or self.d_model % self.memory_heads:
      raise ConfigError(f"model.memory_heads={self.memory_heads} must be >= 1 and divide model.d_model={self.d_model}")
    if self.memory_hidden < 0:
      raise ConfigError(f"model.memory_hidden={self.memory_hidden} must be >= 0 (0 = 2 x memory head dim)")
    if self.chunk_size < 1:
      raise ConfigError(f"model.chunk_size={self.chunk_size} must be >= 1")
    if self.num_persistent < 0:
      raise ConfigError(f"model.num_persistent={self.num_persistent} must be >= 0")
    if self.memory_grad_clip < 0:
      raise ConfigError(f"model.memory_grad_clip={self.memory_grad_clip} must be >= 0 (0 = off)")
    if self.memory_checkpoint < -1:
      raise ConfigError(f"model.memory_checkpoint={self.memory_checkpoint} must be >= -1 (-1 = keep every chunk's "
                        "residuals, 0 = auto, n = chunks per kept carry)")
    if not self.memory_lr > 0:
      raise ConfigError(f"model.memory_lr={self.memory_lr} must be > 0")

  def layer_pattern(self) -> list[str]:
    return [f"titans_{self.variant}"] * self.num_layers

  @property
  def memory_dim(self) -> int:
    return self.d_model // self.memory_heads

  @property
  def resolved_memory_hidden(self) -> int:
    return self.memory_hidden or 2 * self.memory_dim

  @property
  def memory_shapes(self) -> list[tuple[int, int]]:
    """(in, out) of each memory layer."""
    dims = [self.memory_dim] + [self.resolved_memory_hidden] * (self.memory_depth - 1) + [self.memory_dim]
    return list(zip(dims[:-1], dims[1:]))

  @property
  def theta_scale(self) -> float:
    return self.memory_lr / self.resolved_memory_hidden


class NeuralMemory(nnx.Module):
  """Projections, gates and learned initial weights of one layer's memory."""

  def __init__(self, cfg: TitansConfig, *, rngs: nnx.Rngs):
    d, hm, dm = cfg.d_model, cfg.memory_heads, cfg.memory_dim
    self.wq = param(rngs, (d, hm, dm), ("embed", "heads", "head_dim"), fan_in=d)
    self.wk = param(rngs, (d, hm, dm), ("embed", "heads", "head_dim"), fan_in=d)
    self.wv = param(rngs, (d, hm, dm), ("embed", "heads", "head_dim"), fan_in=d)
    self.w_gate = param(rngs, (d, hm, 3), ("embed", "heads", None), fan_in=d, scale=0.1)
    self.b_gate = nnx.Param(jnp.broadcast_to(jnp.asarray(GATE_BIAS, jnp.float32), (hm, 3)),
                            logical_axes=("heads", None))
    # keys are unit vectors, so the first layer draws from N(0, 1); later ones from N(0, 1 / fan_in)
    self.init_weights = nnx.List([param(rngs, (hm, i, o), ("heads", "memory", "memory"), fan_in=1 if j == 0 else i)
                                  for j, (i, o) in enumerate(cfg.memory_shapes)])
    self.wo = param(rngs, (hm, dm, d), ("heads", "head_dim", "embed"), fan_in=d)

  def initial(self):
    return tuple(w[...].astype(jnp.float32) for w in self.init_weights)

  def query(self, x):
    """`x [batch, seq, d_model]` -> `[batch, seq, H, dm]` float32, L2-normalised."""
    return l2_normalize(jax.nn.silu(project(x, self.wq).astype(jnp.float32)))

  def write_inputs(self, x):
    """`x [batch, seq, d_model]` -> k (L2-normalised), v `[batch, seq, H, dm]`, gate logits z `[batch, seq, H, 3]`."""
    proj = lambda w: jax.nn.silu(project(x, w).astype(jnp.float32))
    z = dense(x, self.w_gate[...]).astype(jnp.float32) + self.b_gate[...]
    return l2_normalize(proj(self.wk)), proj(self.wv), z

  def combine(self, y, dtype):
    """Retrievals `[batch, seq, H, dm]` -> `[batch, seq, d_model]` (a projection, not a reshape: XLA's SPMD
    partitioner (jax 0.10.2, CPU) miscomputed the reshape of a head-sharded array here)."""
    return dense(y.astype(dtype), self.wo[...], in_dims=2)


class TitansMixer(WindowAttention):
  """What MAG and MAC share: the baseline's attention projections, the persistent (key, value) prefix, the
  layer's neural memory and the norm of its read before the gate."""

  def __init__(self, cfg: TitansConfig, *, layer: int, rngs: nnx.Rngs):
    super().__init__(cfg, layer=layer, rngs=rngs)
    kvh, hd, p = cfg.num_kv_heads or cfg.num_heads, cfg.resolved_head_dim, cfg.num_persistent
    self.pk = param(rngs, (p, kvh, hd), (None, "kv_heads", "head_dim"), fan_in=1) if p else None
    self.pv = param(rngs, (p, kvh, hd), (None, "kv_heads", "head_dim"), fan_in=1) if p else None
    self.memory = NeuralMemory(cfg, rngs=rngs)
    self.memory_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)

  def prefix(self, q) -> list[Keys]:
    """The persistent prefix as a key block: position-free, seen by every query, scored by the unrotated `q`."""
    if self.pk is None:
      return []
    wide = lambda t: jnp.broadcast_to(t[...].astype(q.dtype), (q.shape[0],) + t.shape)
    return [Keys(wide(self.pk), wide(self.pv), q=q)]

  def memory_state(self, batch_size: int, weights=None) -> dict:
    cfg = self.cfg
    b, c, hm, dm = batch_size, cfg.chunk_size, cfg.memory_heads, cfg.memory_dim
    zeros = [jnp.zeros((b, hm, i, o), jnp.float32) for i, o in cfg.memory_shapes]
    if weights is not None:
      weights = [jnp.broadcast_to(w, (b,) + w.shape) for w in weights]
    return {"weights": zeros if weights is None else weights, "momentum": [jnp.zeros_like(w) for w in zeros],
            "mem_k": jnp.zeros((b, c, hm, dm), jnp.float32), "mem_v": jnp.zeros((b, c, hm, dm), jnp.float32),
            "mem_z": jnp.zeros((b, c, hm, 3), jnp.float32)}

  def carry(self, state, ctx: Context) -> dict:
    """The neural memory's carry (layers/neural_memory.py) from the layer state: `m` tokens of the open chunk."""
    return {"w": tuple(state["weights"]), "s": tuple(state["momentum"]), "k": state["mem_k"], "v": state["mem_v"],
            "z": state["mem_z"], "m": ctx.start % self.cfg.chunk_size}

  @staticmethod
  def memory_of(carry) -> dict:
    return {"weights": list(carry["w"]), "momentum": list(carry["s"]), "mem_k": carry["k"], "mem_v": carry["v"],
            "mem_z": carry["z"]}

  def gate(self, y, memory_read):
    """`y * sigmoid(N(M*(q) W_o))`: the memory's read gates the branch."""
    return y * jax.nn.sigmoid(self.memory_norm(self.memory.combine(memory_read, y.dtype)))

  @classmethod
  def memory_flops(cls, cfg: TitansConfig) -> tuple[float, float, float, float]:
    """(the memory's q/k/v/gate projections and W_o, one read, one chunk fold, the weight update) per token."""
    d, hm, c = cfg.d_model, cfg.memory_heads, cfg.chunk_size
    mem_params = hm * sum(i * o for i, o in cfg.memory_shapes)
    read = 2 * mem_params
    mem_proj = 2 * d * hm * (3 * cfg.memory_dim + 3) + 2 * hm * cfg.memory_dim * d
    return mem_proj, read, 5 * read, 6 * mem_params / c  # a fold: forward + two backward passes (~2 forwards each)


@register_mixer("titans_mag")
class MemoryAsGate(TitansMixer):
  """x += Attn(N(x)) * sigmoid(N_m(M*(q) W_o)): sliding-window attention over [persistent; cache; segment]
  gated by the neural memory's read of the layer input."""

  def init_state(self, batch_size: int) -> dict:
    return {**super().init_state(batch_size), **self.memory_state(batch_size)}

  def fresh_state(self, batch_size: int) -> dict:
    return {**super().init_state(batch_size), **self.memory_state(batch_size, self.memory.initial())}

  def __call__(self, x, state, ctx: Context):
    cfg = self.cfg
    q, k, v = self.qkv(x)
    a = self.out(self.attend(q, k, v, state, ctx, extra=self.prefix(q)))
    y, carry = memory_segment(self.carry(state, ctx), self.memory.query(x), *self.memory.write_inputs(x),
                              starts=ctx.starts, init=self.memory.initial(), theta_scale=cfg.theta_scale,
                              grad_clip=cfg.memory_grad_clip, checkpoint=cfg.memory_checkpoint)
    return self.gate(a, y), {**self.roll(state, k, v), **self.memory_of(carry)}

  @classmethod
  def flops_per_token(cls, cfg: TitansConfig, *, seg_len: int) -> float:
    d, h, hd = cfg.d_model, cfg.num_heads, cfg.resolved_head_dim
    proj = 2 * d * hd * (2 * h + 2 * (cfg.num_kv_heads or h))
    attn = 2 * 2 * h * hd * (cfg.window + cfg.num_persistent)
    return float(proj + attn + sum(cls.memory_flops(cfg)))


@register_mixer("titans_mac")
class MemoryAsContext(TitansMixer):
  """Per MAC segment (= memory chunk): attention over [persistent; h_j, x_j (j <= t)], the memory written
  with the attention output y; the output y * sigmoid(N_o(M*(q'))). No XL cache: the memory reaches back."""

  def __init__(self, cfg: TitansConfig, *, layer: int, rngs: nnx.Rngs):
    super().__init__(cfg, layer=layer, rngs=rngs)
    self.h_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)  # retrieved tokens before their K/V projections
    self.y_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)  # attention output before the memory's projections

  def init_state(self, batch_size: int) -> dict:
    return {**self.buffers(batch_size), **self.memory_state(batch_size)}

  def fresh_state(self, batch_size: int) -> dict:
    return {**self.buffers(batch_size), **self.memory_state(batch_size, self.memory.initial())}

  def buffers(self, batch_size: int) -> dict:
    cfg = self.cfg
    shape = (batch_size, cfg.chunk_size, cfg.num_kv_heads or cfg.num_heads, cfg.resolved_head_dim)
    return {name: jnp.zeros(shape, jnp.float32) for name in ("h_k", "h_v", "x_k", "x_v")}

  def attend_step(self, xq, xk, xv, h, carry, plan, valid):
    """One step's attention. xq `[b, C, heads, hd]`, xk, xv `[b, C, kv, hd]` (unrotated), h `[b, C, H, dm]`.

    Keys: [buffered h; buffered x; the step's h; the step's x] at positions [0..C); [0..C); C + [0..C)
    twice. A key is visible to a query of the same group (document and MAC segment) at a position <= its own.
    """
    cfg = self.cfg
    c = xq.shape[1]
    hk, hv = (project(self.h_norm(self.memory.combine(h, xq.dtype)), w) for w in (self.wk, self.wv))
    i = jnp.arange(c)
    buf_group = jnp.where(i >= (c - plan["m"])[:, None], 0, -1)
    group = jnp.where(valid, 2 * plan["doc"] + plan["after"], -2).astype(jnp.int32)
    k_pos = jnp.concatenate([i, i, c + i, c + i])
    keys = jnp.concatenate([carry["h_k"].astype(xk.dtype), carry["x_k"].astype(xk.dtype), hk, xk], axis=1)
    vals = jnp.concatenate([carry["h_v"].astype(xv.dtype), carry["x_v"].astype(xv.dtype), hv, xv], axis=1)
    blocks = [*self.prefix(xq), Keys(rotary(keys, k_pos, base=cfg.rope_base), vals, pos=k_pos,
                                     doc=jnp.concatenate([buf_group, buf_group, group, group], axis=1))]
    out = attention(rotary(xq, c + i, base=cfg.rope_base), blocks, q_pos=c + i, q_doc=group, kernel=cfg.kernel,
                    block_size=cfg.attention_block or None)
    return self.out(out), hk, hv

  def __call__(self, x, state, ctx: Context):
    cfg = self.cfg
    s, c = x.shape[1], cfg.chunk_size
    xq, xk, xv = self.qkv(x)
    init = self.memory.initial()
    (xq, xk, xv, hq), st, valid = step_inputs([xq, xk, xv, self.memory.query(x)], ctx.starts, c)
    names = ("h_k", "h_v", "x_k", "x_v")

    def body(carry, inputs):
      xq, xk, xv, hq, starts, valid = inputs
      plan = step_plan(carry["m"], starts, valid)
      carry = restart_carry(carry, plan, init)
      no_after = dict(plan, after=jnp.zeros_like(plan["after"]))
      h = read_planned(hq, carry["w"], carry["w"], init, no_after)  # tokens after the fold: redone below
      y, hk, hv = self.attend_step(xq, xk, xv, h, carry, plan, valid)
      w_after, s_after = fold_open_chunk(carry, plan, self.memory.write_inputs(self.y_norm(y)),
                                         theta_scale=cfg.theta_scale, grad_clip=cfg.memory_grad_clip)

      def second_pass():  # tokens of the next MAC segment retrieve from the folded weights
        after = plan["after"]
        h2 = jnp.where(_rows(after, h), read_memory(w_after, hq), h)
        y2, hk2, hv2 = self.attend_step(xq, xk, xv, h2, carry, plan, valid)
        pick = lambda a, b: jnp.where(_rows(after, b), a, b)
        return pick(y2, y), pick(hk2, hk), pick(hv2, hv)

      y, hk, hv = lax.cond(jnp.any(plan["after"]), second_pass, lambda: (y, hk, hv))
      yn = self.y_norm(y)
      o = read_planned(self.memory.query(yn), carry["w"], w_after, init, plan)
      idx = plan["r"][:, None] + jnp.arange(c)
      kv = {n: _take(jnp.concatenate([carry[n], a.astype(carry[n].dtype)], axis=1), idx)
            for n, a in zip(names, (hk, hv, xk, xv))}
      new = advance_carry(carry, plan, w_after, s_after, self.memory.write_inputs(yn), init)
      return dict(new, **kv), self.gate(y, o)

    carry = {**self.carry(state, ctx), **{n: state[n] for n in names}}
    carry, ys = scan_steps(body, carry, (xq, xk, xv, hq, st, valid),
                           group=checkpoint_group(len(xq), cfg.memory_checkpoint))
    return merge_steps(ys, s), {**self.memory_of(carry), **{n: carry[n] for n in names}}

  @classmethod
  def reach(cls, cfg) -> int:
    return 2 * cfg.chunk_size  # the buffered chunk and the step's

  @classmethod
  def flops_per_token(cls, cfg: TitansConfig, *, seg_len: int) -> float:
    d, h, hd, c = cfg.d_model, cfg.num_heads, cfg.resolved_head_dim, cfg.chunk_size
    kvh = cfg.num_kv_heads or h
    proj = 2 * d * hd * (2 * h + 2 * kvh)
    attn = 2 * 2 * h * hd * (4 * c + cfg.num_persistent)  # each step's queries over [buffer; step] x [h; x] keys
    h_kv = 2 * d * hd * 2 * kvh
    mem_proj, read, fold, update = cls.memory_flops(cfg)
    return float(proj + h_kv + attn + 2 * mem_proj + 2 * read + fold + update)  # q and W_o twice (h and the output)


@register_model("titans", config=TitansConfig,
                description="Titans: neural memory (MLP weights learned at test time, chunked), MAG / MAC")
class Titans(LM):
  context_parallel = ("MAG: ring attention for the window (XL cache and persistent prefix merged by lse); the "
                      "memory's chunk scan is sequential and XLA runs it on gathered inputs. MAC: none (its "
                      "attention spans one memory chunk inside that scan)")
