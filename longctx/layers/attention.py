"""Attention, written once: queries against a list of key blocks under one visibility rule.

Every attention in the zoo is "these queries against some blocks of keys": a Transformer-XL cache and
the segment's tokens (the baseline), plus memory slots (RMT), a persistent prefix (Titans), a block
buffer (Infini-attention), a short-term memory and summary tokens (MELODI), recurrent states
(Block-Recurrent). A `Keys` block carries its keys, values, positions and documents; query i sees key j
of a block iff

    q_doc[i] == doc[j] >= 0  and  0 <= q_pos[i] - pos[j]  (<= window, if the block has one)

(the rule of kernels/ring_attention.py). A block may see the queries at coordinates of its own (a
position-free prefix is `pos=None`: always in reach; `doc=None`: every query's document) and may be
scored by other queries (`q`: e.g. the unrotated ones for a position-free prefix). The softmax runs over
the union of every block's visible keys: blocks that share the queries' coordinates are concatenated
into one pass, the others merged exactly by log-sum-exp (`merge_attention`).

`attention` dispatches on `model.kernel` (layers/kernel.py): "reference" is dense attention (the
oracle), "xla" and "pallas" the flash kernels. When the mesh in context has a `sequence` axis of n > 1
devices and a block is `sharded` (the segment's tokens, split over that axis like the queries), the
call runs context-parallel inside `jax.shard_map`: a sharded block goes round a ring (only the steps
its window reaches), a replicated block (cache, memory, prefix) is one more local pass, and replicated
queries (memory slots, summary tokens) read each device's share of the tokens and merge over the axis.
No model calls `shard_map` itself.

Shapes: `q [batch, q_len, heads, head_dim]`, keys/values `[batch, n, kv_heads, head_dim]` (heads a
multiple of kv_heads: grouped-query attention), positions `[len]`, documents `[batch, len]`.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jax.sharding import PartitionSpec as P

from longctx import sharding as shd
from longctx.kernels import ring_attention as ra
from longctx.layers.block import Mixer, register_mixer
from longctx.layers.context import Context
from longctx.layers.kernel import current_platform, resolve
from longctx.layers.linear import dense, param

DEFAULT_BLOCK = 128  # the flash tile (queries and keys): the Pallas kernels' and, below, the XLA path's default
CPU_TILE_BYTES = 2 * 2**20
NEG_INF = -1e30  # a masked score before the softmax (a row that sees nothing gets 0, not a uniform average)


def rotary(x: jax.Array, positions: jax.Array, *, base: float = 10000.0) -> jax.Array:
  """Rotary position embedding (rotate-half form).

  Args:
    x: `[batch, seq, heads, head_dim]` (head_dim even).
    positions: `[seq]` or `[batch, seq]` integer positions.
  Returns:
    `x` rotated, same shape and dtype.
  """
  half = x.shape[-1] // 2
  inv_freq = 1.0 / (base ** (jnp.arange(half, dtype=jnp.float32) / half))
  pos = positions.astype(jnp.float32)
  angles = pos[..., None] * inv_freq  # [(batch,) seq, half]
  if angles.ndim == 2:
    angles = angles[None]
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class Keys:
  """A block of keys and values, and how queries see it (module docstring).

  k, v: `[batch, n, kv_heads, head_dim]`.
  pos: `[n]` int positions; None = position-free (in reach of every query, no window).
  doc: `[batch, n]` int documents (-1: never seen); None = every query's document.
  window: a query sees keys at most this many positions back (None: every earlier one).
  q: the queries that score this block, `[batch, q_len, heads, head_dim]` (None: the call's).
  q_pos `[q_len]`, q_doc `[batch, q_len]`: the queries' coordinates for this block (None: the call's).
  sharded: the block is split over the mesh's `sequence` axis (the segment's tokens).
  """

  k: jax.Array
  v: jax.Array
  pos: jax.Array | None = None
  doc: jax.Array | None = None
  window: int | None = None
  q: jax.Array | None = None
  q_pos: jax.Array | None = None
  q_doc: jax.Array | None = None
  sharded: bool = False


def attention(q: jax.Array, blocks: Sequence[Keys], *, q_pos: jax.Array, q_doc: jax.Array, kernel: str = "auto",
              block_size: int | None = None, scale: float | None = None, q_sharded: bool = False,
              return_lse: bool = False):
  """Softmax attention of `q` over the union of `blocks` (module docstring).

  Args:
    q: `[batch, q_len, heads, head_dim]` (rotated by the caller where positions apply).
    blocks: the key blocks, merged in this order.
    q_pos: `[q_len]` int; q_doc: `[batch, q_len]` int: the queries' coordinates.
    kernel: `model.kernel` ("auto", "reference", "xla", "pallas").
    block_size: query and key block of the flash kernels (None: `default_block`).
    scale: score scale (None: head_dim ** -0.5).
    q_sharded: the queries are the segment's tokens (split over `sequence` like the sharded blocks);
      False: every device holds all of them (memory slots, summary tokens).
    return_lse: also return the log-sum-exp `[batch, heads, q_len]` (-inf where nothing is seen).
  Returns:
    `[batch, q_len, heads, head_dim]` in q's dtype (0 for a query that sees nothing), and the lse.
  """
  impl = resolve(kernel, "attention")
  block_size = block_size or default_block(q, impl)
  n = shd.context_parallel_size()
  if n > 1 and any(b.sharded for b in blocks):
    local = q.shape[1] // n if q_sharded else None
    if (not q_sharded or q.shape[1] % n == 0) and all(b.k.shape[1] % n == 0 for b in blocks if b.sharded):
      return _sharded(q, blocks, q_pos=q_pos, q_doc=q_doc, impl=impl, block_size=block_size, scale=scale,
                      q_sharded=q_sharded, num_shards=n, local=local, return_lse=return_lse)
  if impl.impl == "reference":
    out, lse = dense_attention(q, blocks, q_pos=q_pos, q_doc=q_doc, scale=scale)
    return (out, lse) if return_lse else out
  groups = _concatenated(q, blocks, q_pos=q_pos, q_doc=q_doc)
  if len(groups) == 1 and not return_lse:
    return _pass(groups[0], impl=impl, block_size=block_size, scale=scale, return_lse=False)
  out, lse = _merged([_pass(g, impl=impl, block_size=block_size, scale=scale, return_lse=True) for g in groups])
  out = out.astype(q.dtype)
  return (out, lse) if return_lse else out


def default_block(q: jax.Array, impl) -> int:
  """The flash tile when the config leaves it at 0: `DEFAULT_BLOCK`, except on the XLA path on a CPU, where it
  is halved (down to 32) while one tile's float32 scores `[batch, heads, block, block]` exceed 2 MiB: there the
  tile's elementwise work (mask, exp, rescale) dominates and wants to stay in cache. Measured on one core, train
  step: 16 lanes x 8 heads of 16 (an 8 MiB tile at 128) 1.15x faster at 64 (transformer), 1.07x
  (Block-Recurrent); 4 lanes x 8 heads of 64 (2 MiB at 128) 0.91x at 64, so it stays 128 there."""
  block = DEFAULT_BLOCK
  if impl.impl == "xla" and current_platform() == "cpu":
    while block > 32 and q.shape[0] * q.shape[2] * block * block * 4 > CPU_TILE_BYTES:
      block //= 2
  return block


def dense_attention(q, blocks: Sequence[Keys], *, q_pos, q_doc, scale: float | None = None):
  """The obvious form (`kernel="reference"`): every block's scores `[batch, heads, q_len, n]`, masked by the
  rule, concatenated, one softmax in float32. Returns (out in q's dtype, lse `[batch, heads, q_len]`)."""
  b, sq, h, d = q.shape
  scale = d ** -0.5 if scale is None else scale
  scores, values = [], []
  for block in blocks:
    qb, qp, qd, kp, kd = _coordinates(q, block, q_pos, q_doc)
    kvh = block.k.shape[2]
    qg = qb.reshape(b, sq, kvh, h // kvh, d)
    s = jnp.einsum("bqkgd,btkd->bkgqt", qg, block.k.astype(qb.dtype), preferred_element_type=jnp.float32) * scale
    mask = ra.visible_mask(qp, kp, qd, kd, window=block.window)[:, None, None]
    scores.append(jnp.where(mask, s, -jnp.inf))
    values.append(block.v.astype(qb.dtype))
  s = jnp.concatenate(scores, axis=-1)  # [b, kvh, g, sq, total]
  lse = jax.nn.logsumexp(s, axis=-1)
  seen = jnp.isfinite(s)
  p = jnp.where(seen, jax.nn.softmax(jnp.where(seen, s, NEG_INF), axis=-1), 0.0)  # unseen rows: 0
  out, start = 0.0, 0
  for v in values:
    n = v.shape[1]
    out = out + jnp.einsum("bkgqt,btkd->bqkgd", p[..., start:start + n].astype(v.dtype), v,
                           preferred_element_type=jnp.float32)
    start += n
  return out.reshape(b, sq, h, d).astype(q.dtype), lse.reshape(b, h, sq)


def _coordinates(q, block: Keys, q_pos, q_doc):
  """(queries, q_pos, q_doc, k_pos, k_doc) of one block, position-free and all-document blocks made explicit."""
  qb = q if block.q is None else block.q
  qp = q_pos if block.q_pos is None else block.q_pos
  qd = q_doc if block.q_doc is None else block.q_doc
  b, n = block.k.shape[:2]
  kp = block.pos
  if kp is None:  # in reach of every query: both at position 0
    qp, kp = jnp.zeros(qb.shape[1], jnp.int32), jnp.zeros(n, jnp.int32)
  kd = block.doc
  if kd is None:  # every query's document
    qd, kd = jnp.zeros((b, qb.shape[1]), jnp.int32), jnp.zeros((b, n), jnp.int32)
  return qb, qp, qd, kp, kd


@dataclasses.dataclass
class _Pass:
  q: jax.Array
  k: jax.Array
  v: jax.Array
  q_pos: jax.Array
  q_doc: jax.Array
  k_pos: jax.Array
  k_doc: jax.Array
  window: int | None


def _concatenated(q, blocks, *, q_pos, q_doc) -> list[_Pass]:
  """One pass per run of consecutive blocks that see the same queries at the same coordinates."""
  passes: list[_Pass] = []
  keys: list[tuple] = []
  for block in blocks:
    qb, qp, qd, kp, kd = _coordinates(q, block, q_pos, q_doc)
    same = (block.pos is not None and block.doc is not None and keys and keys[-1][0] is qb
            and keys[-1][1] is qp and keys[-1][2] is qd and keys[-1][3] == block.window)
    if same:
      last = passes[-1]
      cat = lambda a, b: jnp.concatenate([a, b.astype(a.dtype)], axis=1)
      passes[-1] = dataclasses.replace(last, k=cat(last.k, block.k), v=cat(last.v, block.v),
                                       k_pos=jnp.concatenate([last.k_pos, kp]), k_doc=cat(last.k_doc, kd))
    else:
      passes.append(_Pass(qb, block.k.astype(qb.dtype), block.v.astype(qb.dtype), qp, qd, kp, kd, block.window))
    keys.append((qb, qp, qd, block.window) if block.pos is not None and block.doc is not None else (None,) * 4)
  return passes


def _pass(p: _Pass, *, impl, block_size, scale, return_lse):
  def flash(q, k, v, q_pos, k_pos, q_doc, k_doc):
    return ra.flash_attention(q, k, v, q_pos=q_pos, k_pos=k_pos, q_doc=q_doc, k_doc=k_doc, window=p.window,
                              scale=scale, block_q=block_size, block_k=block_size, impl=impl.impl,
                              interpret=impl.interpret, return_lse=return_lse)

  args = (p.q, p.k.astype(p.q.dtype), p.v.astype(p.q.dtype), p.q_pos, p.k_pos, p.q_doc, p.k_doc)
  if impl.impl != "pallas":
    return flash(*args)
  batch = P(shd.BATCH)  # a Pallas kernel sees each device's batch rows (sharding.over_mesh)
  return shd.over_mesh(flash, in_specs=(batch, batch, batch, P(), P(), batch, batch),
                       out_specs=(batch, batch) if return_lse else batch)(*args)


def _merged(results):
  out, lse = results[0][0].astype(jnp.float32), results[0][1]
  for o, l in results[1:]:
    out, lse = ra.merge_attention(out, lse, o, l)
  return out, lse


def _sharded(q, blocks, *, q_pos, q_doc, impl, block_size, scale, q_sharded, num_shards, local, return_lse):
  """The context-parallel form (module docstring): one `shard_map` over the `sequence` axis."""
  impl = impl if impl.impl != "reference" else dataclasses.replace(impl, impl="xla")  # no dense ring
  seq, whole = P(None, shd.SEQUENCE_AXIS), P()
  axis = P(shd.SEQUENCE_AXIS)
  batched = _with_batch
  dtype = q.dtype
  args, specs = [], []

  pallas = impl.impl == "pallas"  # then one shard_map over the whole mesh, batch rows split (sharding.over_mesh)

  def put(x, spec):
    # A replicated float input enters in float32: the gradient of a replicated input is summed over the axis,
    # and XLA:CPU's all-reduce promotion crashed on that sum in bfloat16 ("Invalid binary instruction opcode
    # copy"). Inside, every float is cast back to the computation's dtype.
    if spec is whole and jnp.issubdtype(x.dtype, jnp.floating):
      x = x.astype(jnp.float32)
    args.append(x)
    specs.append(batched(spec) if pallas and x.ndim > 1 else spec)  # positions `[n]` have no batch dim
    return len(args) - 1

  q_ix = put(q, seq if q_sharded else whole)
  plans = []
  for block in blocks:
    qb, qp, qd, kp, kd = _coordinates(q, block, q_pos, q_doc)
    q_spec, q_axis = (seq, axis) if q_sharded else (whole, whole)
    k_spec, k_axis = (seq, axis) if block.sharded else (whole, whole)
    plans.append({
        "q": q_ix if block.q is None else put(qb, q_spec), "q_pos": put(qp.astype(jnp.int32), q_axis),
        "q_doc": put(qd.astype(jnp.int32), q_spec), "k": put(block.k, k_spec), "v": put(block.v, k_spec),
        "k_pos": put(kp.astype(jnp.int32), k_axis), "k_doc": put(kd.astype(jnp.int32), k_spec),
        "window": block.window, "sharded": block.sharded})

  def shard(*arrays):
    results = []
    for plan in plans:
      qb, qp, qd = arrays[plan["q"]].astype(dtype), arrays[plan["q_pos"]], arrays[plan["q_doc"]]
      k, v, kp, kd = (arrays[plan[name]] for name in ("k", "v", "k_pos", "k_doc"))
      k, v = k.astype(dtype), v.astype(dtype)
      kw = dict(q_pos=qp, k_pos=kp, q_doc=qd, k_doc=kd, window=plan["window"], scale=scale, block_q=block_size,
                block_k=block_size, impl=impl.impl, interpret=impl.interpret, return_lse=True)
      if plan["sharded"] and q_sharded:  # tokens against tokens: the ring, cut to the steps the window reaches
        steps = ra.ring_steps_for_window(plan["window"], local, num_shards)
        results.append(ra.ring_attention(qb, k, v, axis_name=shd.SEQUENCE_AXIS, num_steps=steps, **kw))
      elif plan["sharded"]:  # replicated queries against each device's tokens, merged over the axis
        results.append(merge_over_sequence(*ra.flash_attention(qb, k, v, **kw)))
      else:  # a block every device holds whole
        results.append(ra.flash_attention(qb, k, v, **kw))
    out, lse = _merged(results)
    return (out.astype(dtype), lse) if return_lse else out.astype(dtype)

  out_spec = seq if q_sharded else whole
  out_specs = (out_spec, P(None, None, shd.SEQUENCE_AXIS) if q_sharded else whole) if return_lse else out_spec
  if pallas:
    out_specs = tuple(map(batched, out_specs)) if return_lse else batched(out_specs)
    return shd.over_mesh(shard, in_specs=tuple(specs), out_specs=out_specs)(*args)
  return shd.over_sequence(shard, in_specs=tuple(specs), out_specs=out_specs)(*args)


def _with_batch(spec: P) -> P:
  """`spec` with the batch dim (the first) named `sharding.BATCH`."""
  return P(shd.BATCH, *tuple(spec)[1:])


def merge_over_sequence(out, lse):
  """Merge the partial results of replicated queries over each shard's own keys: every device gets the
  attention over the union (all-gathered, then merged by lse). out `[batch, q_len, heads, head_dim]`,
  lse `[batch, heads, q_len]`; call inside `sharding.over_sequence`."""
  outs, lses = lax.all_gather((out, lse), shd.SEQUENCE_AXIS)
  merged = (outs[0].astype(jnp.float32), lses[0])
  for i in range(1, outs.shape[0]):
    merged = ra.merge_attention(*merged, outs[i], lses[i])
  return merged


# ----------------------------------------------------------------------------- the baseline's attention layer


class AttentionProjections(nnx.Module):
  """The q, k, v and output projections of grouped-query attention (every attention mixer has them).

  wq `[d_model, heads, head_dim]`, wk / wv `[d_model, kv_heads, head_dim]`, wo `[heads, head_dim, d_model]`
  (drawn at `out_scale`, default 1 / (2 num_layers), of its fan-in variance: the residual branches' scale).
  """

  def __init__(self, cfg, *, rngs: nnx.Rngs, kv_heads: int | None = None, out_fan_in: int | None = None,
               out_scale: float | None = None):
    d, h, hd = cfg.d_model, cfg.num_heads, cfg.resolved_head_dim
    kvh = kv_heads or getattr(cfg, "num_kv_heads", 0) or h
    self.wq = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), fan_in=d)
    self.wk = param(rngs, (d, kvh, hd), ("embed", "kv_heads", "head_dim"), fan_in=d)
    self.wv = param(rngs, (d, kvh, hd), ("embed", "kv_heads", "head_dim"), fan_in=d)
    self.wo = param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), fan_in=out_fan_in or h * hd,
                    scale=out_scale or 1.0 / (2 * cfg.num_layers))

  def qkv(self, x):
    """x `[batch, seq, d_model]` -> q `[batch, seq, heads, head_dim]`, k, v `[batch, seq, kv_heads, head_dim]`."""
    return tuple(project(x, w) for w in (self.wq, self.wk, self.wv))

  def out(self, y):
    """Per-head outputs `[batch, seq, heads, head_dim]` -> `[batch, seq, d_model]`."""
    return dense(y, self.wo[...], in_dims=2)


def project(x, w):
  """`x [batch, seq, d_model]` through a head projection `w [d_model, heads, head_dim]`."""
  return dense(x, w[...])


def roll_cache(cache: jax.Array, new: jax.Array) -> jax.Array:
  """Keep the last `window` entries of `[cache; new]` along axis 1."""
  window = cache.shape[1]
  return jnp.concatenate([cache, new.astype(cache.dtype)], axis=1)[:, -window:]


@register_mixer("attention")
class WindowAttention(AttentionProjections, Mixer):
  """Sliding-window attention with a Transformer-XL cache: the baseline's token mixer.

  Each token attends to itself and the previous `window` tokens of its own document: the `window`
  cached (unrotated) keys and values before the step, then the step's own. Rotary positions are
  relative inside [cache; step], so a stream cut into any steps gives the same result.

  State: k, v `[batch, window, kv_heads, head_dim]` float32 (which slots are valid follows from the context).
  """

  def __init__(self, cfg, *, layer: int, rngs: nnx.Rngs):
    del layer
    super().__init__(cfg, rngs=rngs)
    self.cfg = cfg

  def init_state(self, batch_size: int) -> dict:
    cfg = self.cfg
    shape = (batch_size, cfg.window, cfg.num_kv_heads or cfg.num_heads, cfg.resolved_head_dim)
    return {"k": jnp.zeros(shape, jnp.float32), "v": jnp.zeros(shape, jnp.float32)}

  def __call__(self, x, state, ctx: Context):
    q, k, v = self.qkv(x)
    y = self.attend(q, k, v, state, ctx)
    return self.out(y), self.roll(state, k, v)

  def window_keys(self, k, v, state, ctx: Context) -> tuple[jax.Array, list[Keys]]:
    """The positions of the step's queries and the key blocks [cache; step] of this window, rotated."""
    cfg = self.cfg
    w, s = cfg.window, k.shape[1]
    pos = jnp.arange(w + s)
    cache = Keys(self.rotate(state["k"], pos[:w]).astype(k.dtype), state["v"].astype(v.dtype), pos=pos[:w],
                 doc=ctx.history_doc(w), window=w)
    tokens = Keys(self.rotate(k, pos[w:]), v, pos=pos[w:], doc=ctx.doc, window=w, sharded=True)
    return pos[w:], [cache, tokens]

  def attend(self, q, k, v, state, ctx: Context, *, extra: Sequence[Keys] = ()):
    """The per-head output `[batch, seq, heads, head_dim]` of unrotated q, k, v over [cache; step] (and `extra`
    key blocks, e.g. a persistent prefix)."""
    cfg = self.cfg
    q_pos, blocks = self.window_keys(k, v, state, ctx)
    return attention(self.rotate(q, q_pos), [*extra, *blocks], q_pos=q_pos, q_doc=ctx.doc,
                     kernel=cfg.kernel, block_size=cfg.attention_block or None, q_sharded=True)

  def rotate(self, x, positions):
    """Rotary positions on queries or keys `[batch, seq, heads, head_dim]` (Griffin's attention rotates a part)."""
    return rotary(x, positions, base=self.cfg.rope_base)

  def roll(self, state, k, v) -> dict:
    """The cache after the step: the last `window` of [cache; step]'s unrotated keys and values."""
    return {"k": roll_cache(state["k"], k), "v": roll_cache(state["v"], v)}

  @classmethod
  def reach(cls, cfg) -> int:
    return cfg.window

  @classmethod
  def flops_per_token(cls, cfg, *, seg_len: int) -> float:
    d, h, hd = cfg.d_model, cfg.num_heads, cfg.resolved_head_dim
    kvh = cfg.num_kv_heads or h
    proj = 2 * d * hd * (2 * h + 2 * kvh)  # q, o and k, v projections
    attn = 2 * 2 * h * hd * cfg.window  # QK^T and PV over the visible window
    return float(proj + attn)

  @classmethod
  def activation_bytes_per_token(cls, cfg, *, dtype_bytes: int) -> float:
    """A pre-norm Transformer layer: residual/norm inputs, q/k/v/o, the gated MLP's hidden, the probabilities."""
    d, h, hd, ff = cfg.d_model, cfg.num_heads, cfg.resolved_head_dim, cfg.resolved_d_ff
    visible = 2 * (cfg.attention_block or cfg.window)
    return float((4 * d + 4 * h * hd + 3 * ff) * dtype_bytes + h * visible * 4)
