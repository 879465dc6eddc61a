"""Causal attention in blocks: single-device flash attention and ring attention across devices.

Shapes: `q [batch, q_len, heads, head_dim]`, `k, v [batch, kv_len, kv_heads, head_dim]`
(grouped-query: heads a multiple of kv_heads). Every token carries an integer
position and a document id; query i sees key j iff

    q_doc[i] == k_doc[j],  k_doc[j] >= 0,  0 <= q_pos[i] - k_pos[j] (<= window if given)

so causal masks, sliding windows, packed documents and any token order (the
load-balanced layouts below) are one rule. A query that sees nothing gets 0
and log-sum-exp -inf.

The math is FlashAttention's: keys are visited in blocks of `block_k`, each
query block keeps a running max `m`, normaliser `l` and unnormalised output in
float32, and a (query block, key block) pair that no query can see (from the
min/max of positions and document ids) is skipped with `lax.cond`. Results of
separate passes merge exactly through their log-sum-exps (`merge_attention`).
The backward pass recomputes the probabilities from the saved log-sum-exp
(`p = exp(s - lse)`) in two sweeps, one for dq and one for dk/dv, so memory
stays O(block_q * block_k) per head. A cotangent on the log-sum-exp itself is
supported (`delta = rowsum(do * o) - dlse`), which is what lets a caller merge
a ring pass with a pass over a replicated prefix (a Transformer-XL cache) and
still get exact gradients.

Ring attention (`ring_attention`, call inside `jax.shard_map`) keeps each
device's query block in place and rotates the key/value blocks (with their
positions and document ids) around the mesh axis with `ppermute`. Every step
issues the next transfer before computing the current block, so on GPU/TPU the
collective overlaps the block's compute. The backward pass rotates the
key/values again together with their accumulating dk/dv, which end where they
started. With a sliding window only `num_steps` blocks are in reach (for a
contiguous layout, 1 + ceil(window / local_len)), and the ring stops there.

Causal masks leave device r with r + 1 of the n blocks to compute in a
contiguous layout; `load_balance_order` gives a zig-zag (device r holds chunks
r and 2n - 1 - r) or striped (token t on device t mod n) order in which every
device has the same work. Positions travel with the tokens, so the kernel needs
no other change.

impl: "reference" (dense, autodiff; the test oracle), "xla" (blockwise, pure
jnp, the `lax.cond` skipping above), and the Pallas kernels, forward, dq and
dk/dv each: "pallas_tpu" (Mosaic TPU, flash_attention_tpu.py: a sequential
key-block grid axis with the softmax state in VMEM scratch) and "pallas_gpu"
(Triton, flash_attention_gpu.py: one program per query block looping over key
blocks). Both skip the block pairs that see nothing from ranges computed in XLA
(attention_blocks.py). "pallas" is the kernel of the platform the call runs on,
the TPU kernel in the interpreter on a CPU; `interpret=None` interprets only on
a CPU, and a kernel for another platform is refused (pallas_target.py).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from longctx.kernels import flash_attention_gpu, flash_attention_tpu
from longctx.kernels.attention_blocks import pad_to
from longctx.kernels.pallas_target import PALLAS_IMPLS, pallas_target

IMPLS = ("reference", "xla", *PALLAS_IMPLS)
LAYOUTS = ("contiguous", "zigzag", "striped")
_BIG = np.iinfo(np.int32).max
_PALLAS_KERNELS = {"tpu": flash_attention_tpu, "gpu": flash_attention_gpu}


# ----------------------------------------------------------------------------- masks


def visible_mask(q_pos, k_pos, q_doc, k_doc, *, window: int | None = None) -> jax.Array:
  """`[batch, q_len, kv_len]` bool: the rule in the module docstring.

  q_pos `[q_len]`, k_pos `[kv_len]` int; q_doc `[batch, q_len]`, k_doc `[batch, kv_len]` int.
  """
  dist = q_pos[:, None] - k_pos[None, :]
  ok = dist >= 0
  if window is not None:
    ok &= dist <= window
  return ok[None] & (q_doc[:, :, None] == k_doc[:, None, :]) & (k_doc[:, None, :] >= 0)


def _may_see(q_pos, k_pos, q_doc, k_doc, window):
  """Scalar bool: False only if no query of the block can see any key of the block."""
  ok = jnp.max(q_pos) >= jnp.min(k_pos)
  if window is not None:
    ok &= jnp.min(q_pos) - jnp.max(k_pos) <= window
  k_lo = jnp.min(jnp.where(k_doc >= 0, k_doc, _BIG), axis=1)
  k_hi = jnp.max(k_doc, axis=1)
  docs = (jnp.max(q_doc, axis=1) >= k_lo) & (jnp.min(q_doc, axis=1) <= k_hi)
  return ok & jnp.any(docs)


def gqa_einsum(spec: str, x: jax.Array, y: jax.Array) -> jax.Array:
  """`jnp.einsum(spec, x, y)` in float32 where axis `g` (query heads per kv head) is that of grouped-query
  attention; with one query head per kv head it is dropped first: XLA:CPU runs the 4-axis form of these
  contractions ~1.7x faster than the 5-axis one with a unit axis (attention fwd + bwd, 16 x 128 x 8 x 16)."""
  lhs, out = spec.split("->")
  a, b = lhs.split(",")
  operands = [(a, x), (b, y)]
  if any(t.shape[s.index("g")] != 1 for s, t in operands if "g" in s):
    return jnp.einsum(spec, x, y, preferred_element_type=jnp.float32)
  drop = lambda s, t: (s.replace("g", ""), jnp.squeeze(t, s.index("g")) if "g" in s else t)
  (a, x), (b, y) = drop(a, x), drop(b, y)
  r = jnp.einsum(f"{a},{b}->{out.replace('g', '')}", x, y, preferred_element_type=jnp.float32)
  return jnp.expand_dims(r, out.index("g")) if "g" in out else r


# ----------------------------------------------------------------------------- reference


def attention_reference(q, k, v, *, q_pos, k_pos, q_doc, k_doc, window=None, scale=None):
  """Dense softmax attention under the visibility rule; returns (out, lse `[batch, heads, q_len]`).

  Materialises `[batch, heads, q_len, kv_len]`: the oracle the blockwise paths are tested against.
  """
  b, sq, h, d = q.shape
  kvh = k.shape[2]
  scale = d ** -0.5 if scale is None else scale
  mask = visible_mask(q_pos, k_pos, q_doc, k_doc, window=window)[:, None, None]  # [b, 1, 1, sq, sk]
  qg = q.reshape(b, sq, kvh, h // kvh, d)
  s = jnp.einsum("bqkgd,btkd->bkgqt", qg, k, preferred_element_type=jnp.float32) * scale
  s = jnp.where(mask, s, -jnp.inf)
  lse = jax.nn.logsumexp(s, axis=-1)
  p = jnp.where(mask, jnp.exp(s - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None]), 0.0)
  out = jnp.einsum("bkgqt,btkd->bqkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.reshape(b, sq, h, d).astype(q.dtype), lse.reshape(b, h, sq)


def merge_attention(o_a, lse_a, o_b, lse_b):
  """Exact softmax over the union of two disjoint key sets from their (output, lse).

  o `[batch, q_len, heads, head_dim]`, lse `[batch, heads, q_len]`; -inf lse = saw nothing.
  """
  m = jnp.maximum(lse_a, lse_b)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  wa, wb = jnp.exp(lse_a - m), jnp.exp(lse_b - m)
  total = wa + wb
  lse = jnp.where(total > 0, m + jnp.log(jnp.where(total > 0, total, 1.0)), -jnp.inf)
  norm = lambda w: jnp.swapaxes(w / jnp.where(total > 0, total, 1.0), 1, 2)[..., None]  # [b, q, h, 1]
  out = o_a.astype(jnp.float32) * norm(wa) + o_b.astype(jnp.float32) * norm(wb)
  return out, lse


# ----------------------------------------------------------------------------- blocking


def _blocks(q, k, v, q_pos, k_pos, q_doc, k_doc, block_q, block_k):
  """Pad to whole blocks and put the block index first.

  Returns q `[nq, b, bq, kvh, g, d]`, k/v `[nk, b, bk, kvh, d]`, positions `[n, bs]`,
  documents `[n, b, bs]` (padded queries get document -2, padded keys -1: never visible).
  """
  b, sq, h, d = q.shape
  sk, kvh = k.shape[1], k.shape[2]
  nq, nk = -(-sq // block_q), -(-sk // block_k)
  q = pad_to(q, nq * block_q, 1, 0).reshape(b, nq, block_q, kvh, h // kvh, d)
  k = pad_to(k, nk * block_k, 1, 0).reshape(b, nk, block_k, kvh, d)
  v = pad_to(v, nk * block_k, 1, 0).reshape(b, nk, block_k, kvh, d)
  qp = pad_to(q_pos.astype(jnp.int32), nq * block_q, 0, 0).reshape(nq, block_q)
  kp = pad_to(k_pos.astype(jnp.int32), nk * block_k, 0, 0).reshape(nk, block_k)
  qd = pad_to(q_doc.astype(jnp.int32), nq * block_q, 1, -2).reshape(b, nq, block_q)
  kd = pad_to(k_doc.astype(jnp.int32), nk * block_k, 1, -1).reshape(b, nk, block_k)
  first = lambda x: jnp.moveaxis(x, 1, 0)
  return first(q), first(k), first(v), qp, kp, first(qd), first(kd)


def _unblock_out(o, sq):
  """`[nq, b, kvh, g, bq, d] -> [b, sq, h, d]`."""
  nq, b, kvh, g, bq, d = o.shape
  return jnp.transpose(o, (1, 0, 4, 2, 3, 5)).reshape(b, nq * bq, kvh * g, d)[:, :sq]


def _unblock_rows(x, sq):
  """`[nq, b, kvh, g, bq] -> [b, h, sq]`."""
  nq, b, kvh, g, bq = x.shape
  return jnp.transpose(x, (1, 2, 3, 0, 4)).reshape(b, kvh * g, nq * bq)[..., :sq]


def _block_rows(x, nq, bq, kvh):
  """`[b, h, sq] -> [nq, b, kvh, g, bq]` (padding rows with 0)."""
  b, h, _ = x.shape
  x = pad_to(x, nq * bq, 2, 0).reshape(b, kvh, h // kvh, nq, bq)
  return jnp.transpose(x, (3, 0, 1, 2, 4))


def _scores(qb, kb, qp, kp, qd, kd, window, scale):
  """Masked scores `[b, kvh, g, bq, bk]` (f32, -inf where invisible) and the mask."""
  s = gqa_einsum("bqkgd,btkd->bkgqt", qb, kb) * scale
  mask = visible_mask(qp, kp, qd, kd, window=window)[:, None, None]
  return jnp.where(mask, s, -jnp.inf), mask


# ----------------------------------------------------------------------------- forward


def _forward_xla(q, k, v, q_pos, k_pos, q_doc, k_doc, *, window, scale, block_q, block_k):
  """One pass of local queries over local keys; returns (out f32 `[b, sq, h, d]`, lse `[b, h, sq]`)."""
  b, sq, h, d = q.shape
  kvh = k.shape[2]
  g = h // kvh
  qb, kb, vb, qp, kp, qd, kd = _blocks(q, k, v, q_pos, k_pos, q_doc, k_doc, block_q, block_k)

  def one_query_block(args):
    qi, qpi, qdi = args

    def step(carry, kargs):
      ki, vi, kpi, kdi = kargs

      def compute(carry):
        acc, m, l = carry
        s, mask = _scores(qi, ki, qpi, kpi, qdi, kdi, window, scale)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.where(mask, jnp.exp(s - m_safe[..., None]), 0.0)
        corr = jnp.exp(m - m_safe)
        pv = gqa_einsum("bkgqt,btkd->bkgqd", p.astype(vi.dtype), vi)
        return acc * corr[..., None] + pv, m_new, l * corr + jnp.sum(p, axis=-1)

      return lax.cond(_may_see(qpi, kpi, qdi, kdi, window), compute, lambda c: c, carry), None

    init = (jnp.zeros((b, kvh, g, block_q, d), jnp.float32), jnp.full((b, kvh, g, block_q), -jnp.inf),
            jnp.zeros((b, kvh, g, block_q), jnp.float32))
    (acc, m, l), _ = lax.scan(step, init, (kb, vb, kp, kd))
    seen = l > 0
    out = acc / jnp.where(seen, l, 1.0)[..., None]
    return out, jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)

  out, lse = lax.map(one_query_block, (qb, qp, qd))
  return _unblock_out(out, sq), _unblock_rows(lse, sq)


# ----------------------------------------------------------------------------- backward


def _backward_xla(q, k, v, q_pos, k_pos, q_doc, k_doc, lse, delta, do, *, window, scale, block_q, block_k):
  """Gradients of one pass given the *final* lse and delta = rowsum(do * out) - dlse (`[b, h, sq]`).

  Two sweeps over the blocks, recomputing p = exp(s - lse): dq (per query block, over key
  blocks), then dk and dv (per key block, over query blocks). Returns f32 dq, dk, dv.
  """
  b, sq, h, d = q.shape
  sk, kvh = k.shape[1], k.shape[2]
  g = h // kvh
  qb, kb, vb, qp, kp, qd, kd = _blocks(q, k, v, q_pos, k_pos, q_doc, k_doc, block_q, block_k)
  nq = qb.shape[0]
  dob = jnp.moveaxis(pad_to(do, nq * block_q, 1, 0).reshape(b, nq, block_q, kvh, g, d), 1, 0)
  lse_b = _block_rows(jnp.where(jnp.isfinite(lse), lse, 0.0), nq, block_q, kvh)  # [nq, b, kvh, g, bq]
  delta_b = _block_rows(delta, nq, block_q, kvh)

  def grads_of_pair(qi, doi, lsei, deltai, qpi, qdi, ki, vi, kpi, kdi):
    s, mask = _scores(qi, ki, qpi, kpi, qdi, kdi, window, scale)
    p = jnp.where(mask, jnp.exp(s - lsei[..., None]), 0.0)
    dp = gqa_einsum("bqkgd,btkd->bkgqt", doi, vi)
    ds = p * (dp - deltai[..., None]) * scale
    return p, ds

  def dq_block(args):
    qi, doi, lsei, deltai, qpi, qdi = args

    def step(dq, kargs):
      ki, vi, kpi, kdi = kargs

      def compute(dq):
        _, ds = grads_of_pair(qi, doi, lsei, deltai, qpi, qdi, ki, vi, kpi, kdi)
        return dq + gqa_einsum("bkgqt,btkd->bqkgd", ds.astype(ki.dtype), ki)

      return lax.cond(_may_see(qpi, kpi, qdi, kdi, window), compute, lambda x: x, dq), None

    dq, _ = lax.scan(step, jnp.zeros(qi.shape, jnp.float32), (kb, vb, kp, kd))
    return dq

  def dkv_block(args):
    ki, vi, kpi, kdi = args

    def step(carry, qargs):
      qi, doi, lsei, deltai, qpi, qdi = qargs

      def compute(carry):
        dk, dv = carry
        p, ds = grads_of_pair(qi, doi, lsei, deltai, qpi, qdi, ki, vi, kpi, kdi)
        dv = dv + gqa_einsum("bkgqt,bqkgd->btkd", p.astype(doi.dtype), doi)
        dk = dk + gqa_einsum("bkgqt,bqkgd->btkd", ds.astype(qi.dtype), qi)
        return dk, dv

      return lax.cond(_may_see(qpi, kpi, qdi, kdi, window), compute, lambda c: c, carry), None

    zeros = jnp.zeros(ki.shape, jnp.float32)
    (dk, dv), _ = lax.scan(step, (zeros, zeros), (qb, dob, lse_b, delta_b, qp, qd))
    return dk, dv

  dq = lax.map(dq_block, (qb, dob, lse_b, delta_b, qp, qd))  # [nq, b, bq, kvh, g, d]
  dk, dv = lax.map(dkv_block, (kb, vb, kp, kd))  # [nk, b, bk, kvh, d]
  unq = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, -1, h, d)[:, :sq]
  unk = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, -1, kvh, d)[:, :sk]
  return unq(dq), unk(dk), unk(dv)


def _backward_pass(q, k, v, q_pos, k_pos, q_doc, k_doc, lse, delta, do, opts):
  kw = dict(window=opts["window"], scale=opts["scale"], block_q=opts["block_q"], block_k=opts["block_k"])
  if opts["target"] is not None:
    kernel = _PALLAS_KERNELS[opts["target"]]
    return kernel.backward(q, k, v, q_pos, k_pos, q_doc, k_doc, lse, delta, do, interpret=opts["interpret"], **kw)
  return _backward_xla(q, k, v, q_pos, k_pos, q_doc, k_doc, lse, delta, do, **kw)


# ----------------------------------------------------------------------------- ring (and single device)


def _forward_pass(q, k, v, q_pos, k_pos, q_doc, k_doc, opts):
  kw = dict(window=opts["window"], scale=opts["scale"], block_q=opts["block_q"], block_k=opts["block_k"])
  if opts["target"] is not None:
    kernel = _PALLAS_KERNELS[opts["target"]]
    return kernel.forward(q, k, v, q_pos, k_pos, q_doc, k_doc, interpret=opts["interpret"], **kw)
  return _forward_xla(q, k, v, q_pos, k_pos, q_doc, k_doc, **kw)


def _shift(tree, axis_name, n, by):
  """Send every device's `tree` to the device `by` places further along the ring."""
  perm = [(i, (i + by) % n) for i in range(n)]
  return jax.tree.map(lambda x: lax.ppermute(x, axis_name, perm), tree)


def _ring_forward(q, k, v, q_pos, k_pos, q_doc, k_doc, opts):
  axis, steps = opts["axis_name"], opts["num_steps"]
  if axis is None:
    return _forward_pass(q, k, v, q_pos, k_pos, q_doc, k_doc, opts)
  n = lax.axis_size(axis)
  b, sq, h, d = q.shape

  def step(carry, _):
    kv, out, lse = carry
    incoming = _shift(kv, axis, n, 1)  # issued before this block's compute, so the two overlap
    o_s, lse_s = _forward_pass(q, kv[0], kv[1], q_pos, kv[2], q_doc, kv[3], opts)
    out, lse = merge_attention(out, lse, o_s, lse_s)
    return (incoming, out, lse), None

  init = ((k, v, k_pos, k_doc), jnp.zeros((b, sq, h, d), jnp.float32), jnp.full((b, h, sq), -jnp.inf))
  (_, out, lse), _ = lax.scan(step, init, None, length=min(steps or n, n))
  return out, lse


def _ring_backward(q, k, v, q_pos, k_pos, q_doc, k_doc, lse, delta, do, opts):
  axis, steps = opts["axis_name"], opts["num_steps"]
  if axis is None:
    return _backward_pass(q, k, v, q_pos, k_pos, q_doc, k_doc, lse, delta, do, opts)
  n = lax.axis_size(axis)
  steps = min(steps or n, n)

  def step(carry, _):
    kv, dkv, dq = carry
    incoming = _shift(kv, axis, n, 1)
    dq_s, dk_s, dv_s = _backward_pass(q, kv[0], kv[1], q_pos, kv[2], q_doc, kv[3], lse, delta, do, opts)
    dkv = _shift((dkv[0] + dk_s, dkv[1] + dv_s), axis, n, 1)  # dk/dv travel with their block
    return (incoming, dkv, dq + dq_s), None

  zeros = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  init = ((k, v, k_pos, k_doc), zeros, jnp.zeros(q.shape, jnp.float32))
  (_, (dk, dv), dq), _ = lax.scan(step, init, None, length=steps)
  if steps < n:  # after `steps` hops the block's gradient sits `steps` devices downstream: send it home
    dk, dv = _shift((dk, dv), axis, n, -steps)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _attention(q, k, v, q_pos, k_pos, q_doc, k_doc, opts):
  out, lse = _ring_forward(q, k, v, q_pos, k_pos, q_doc, k_doc, dict(opts))
  return out.astype(q.dtype), lse


def _attention_fwd(q, k, v, q_pos, k_pos, q_doc, k_doc, opts):
  out, lse = _ring_forward(q, k, v, q_pos, k_pos, q_doc, k_doc, dict(opts))
  out = out.astype(q.dtype)
  return (out, lse), (q, k, v, q_pos, k_pos, q_doc, k_doc, out, lse)


def _attention_bwd(opts, residuals, cotangents):
  q, k, v, q_pos, k_pos, q_doc, k_doc, out, lse = residuals
  do, dlse = cotangents
  delta = jnp.einsum("bqhd,bqhd->bhq", do.astype(jnp.float32), out.astype(jnp.float32)) - dlse
  dq, dk, dv = _ring_backward(q, k, v, q_pos, k_pos, q_doc, k_doc, lse, delta, do.astype(q.dtype), dict(opts))
  zero = lambda x: np.zeros(x.shape, jax.dtypes.float0)
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), zero(q_pos), zero(k_pos), zero(q_doc),
          zero(k_doc))


_attention.defvjp(_attention_fwd, _attention_bwd)


def _check(q, k, v, q_pos, k_pos, q_doc, k_doc, block_q, block_k, impl):
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
  if q.ndim != 4 or k.shape != v.shape or k.ndim != 4 or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
    raise ValueError(f"expected q [batch, q_len, heads, head_dim] and k, v [batch, kv_len, kv_heads, head_dim], "
                     f"got q {q.shape}, k {k.shape}, v {v.shape}")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"heads={q.shape[2]} must be a multiple of kv_heads={k.shape[2]}")
  b, sq, sk = q.shape[0], q.shape[1], k.shape[1]
  for name, x, shape in (("q_pos", q_pos, (sq,)), ("k_pos", k_pos, (sk,)), ("q_doc", q_doc, (b, sq)),
                         ("k_doc", k_doc, (b, sk))):
    if tuple(x.shape) != shape:
      raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {shape}")
  if block_q < 1 or block_k < 1:
    raise ValueError(f"block_q={block_q} and block_k={block_k} must be >= 1")


def _options(*, axis_name, window, scale, num_steps, block_q, block_k, impl, interpret, q, k):
  """The static options of one call, hashable; Pallas impls resolved to (target, interpret) here, once."""
  d = q.shape[-1]
  target, interpret = pallas_target(impl, interpret) if impl in PALLAS_IMPLS else (None, False)
  return tuple(sorted(dict(axis_name=axis_name, window=window, scale=float(d ** -0.5 if scale is None else scale),
                           num_steps=num_steps, block_q=min(block_q, q.shape[1]), block_k=min(block_k, k.shape[1]),
                           impl=impl, target=target, interpret=interpret).items()))


def flash_attention(q, k, v, *, q_pos, k_pos, q_doc, k_doc, window: int | None = None, scale: float | None = None,
                    block_q: int = 128, block_k: int = 128, impl: str = "xla", interpret: bool | None = None,
                    return_lse: bool = False):
  """Blockwise attention on one device under the visibility rule (module docstring).

  Args:
    q: `[batch, q_len, heads, head_dim]`; k, v: `[batch, kv_len, kv_heads, head_dim]`.
    q_pos: `[q_len]`, k_pos: `[kv_len]` integer positions; q_doc `[batch, q_len]`,
      k_doc `[batch, kv_len]` document ids (a key with id < 0 is never seen).
    window: a query sees keys at most this many positions back (None: all earlier).
    block_q, block_k: block sizes (lengths need not be multiples). The Pallas kernels round them up to what
      their compiler needs: a multiple of 8 on TPU, a power of 2 of at least 16 on GPU.
    impl: one of IMPLS: "reference", "xla", "pallas" (this platform's kernel), "pallas_tpu", "pallas_gpu".
    interpret: run a Pallas kernel in the interpreter (None: only on a CPU).
    return_lse: also return the log-sum-exp `[batch, heads, q_len]` (f32; -inf where nothing is
      visible), differentiable, for `merge_attention`.
  Returns:
    `[batch, q_len, heads, head_dim]` in q's dtype (and the lse).
  """
  _check(q, k, v, q_pos, k_pos, q_doc, k_doc, block_q, block_k, impl)
  if impl == "reference":
    out, lse = attention_reference(q, k, v, q_pos=q_pos, k_pos=k_pos, q_doc=q_doc, k_doc=k_doc, window=window,
                                   scale=scale)
  else:
    opts = _options(axis_name=None, window=window, scale=scale, num_steps=None, block_q=block_q, block_k=block_k,
                    impl=impl, interpret=interpret, q=q, k=k)
    out, lse = _attention(q, k, v, q_pos, k_pos, q_doc, k_doc, opts)
  return (out, lse) if return_lse else out


def ring_attention(q, k, v, *, axis_name: str, q_pos, k_pos, q_doc, k_doc, window: int | None = None,
                   scale: float | None = None, num_steps: int | None = None, block_q: int = 128, block_k: int = 128,
                   impl: str = "xla", interpret: bool | None = None, return_lse: bool = False):
  """Attention over a sequence sharded on mesh axis `axis_name`; call inside `jax.shard_map`.

  Every array is this device's shard: q/q_pos/q_doc stay, k/v/k_pos/k_doc rotate
  around the ring. Positions are global (whatever the layout, see
  `load_balance_order`), so the result equals `flash_attention` on the gathered
  sequence. `num_steps` < axis size stops the ring early: correct only if the
  keys `num_steps` or more devices upstream are invisible to this device's
  queries (a sliding window over a contiguous layout). Other arguments as in
  `flash_attention` ("reference" is not available here).
  """
  _check(q, k, v, q_pos, k_pos, q_doc, k_doc, block_q, block_k, impl)
  if impl == "reference":
    raise ValueError("ring_attention has no 'reference' impl; compare against flash_attention(impl='reference') "
                     "on the gathered sequence")
  if num_steps is not None and num_steps < 1:
    raise ValueError(f"num_steps={num_steps} must be >= 1")
  opts = _options(axis_name=axis_name, window=window, scale=scale, num_steps=num_steps, block_q=block_q,
                  block_k=block_k, impl=impl, interpret=interpret, q=q, k=k)
  out, lse = _attention(q, k, v, q_pos, k_pos, q_doc, k_doc, opts)
  return (out, lse) if return_lse else out


def ring_steps_for_window(window: int | None, local_len: int, num_shards: int) -> int:
  """Ring steps a contiguous layout needs: blocks within `window` tokens upstream, plus its own."""
  if window is None:
    return num_shards
  return min(num_shards, 1 + math.ceil(window / local_len))


# ----------------------------------------------------------------------------- layouts


def load_balance_order(seq_len: int, num_shards: int, layout: str = "zigzag") -> np.ndarray:
  """Token order that gives every shard equal causal work; `x[:, order]` before sharding.

  "contiguous": identity. "zigzag": the sequence in 2n chunks, shard r holds chunks r and
  2n-1-r (needs seq_len % 2n == 0). "striped": shard r holds tokens r, r+n, r+2n, ...
  (needs seq_len % n == 0). Undo with `np.argsort(order)`.
  """
  if layout not in LAYOUTS:
    raise ValueError(f"layout={layout!r} is not one of {LAYOUTS}")
  n = num_shards
  if layout == "contiguous":
    return np.arange(seq_len)
  if layout == "zigzag":
    if seq_len % (2 * n):
      raise ValueError(f"a zigzag layout needs seq_len={seq_len} to be a multiple of 2 * {n} shards")
    chunks = np.arange(seq_len).reshape(2 * n, seq_len // (2 * n))
    return np.concatenate([np.concatenate([chunks[r], chunks[2 * n - 1 - r]]) for r in range(n)])
  if seq_len % n:
    raise ValueError(f"a striped layout needs seq_len={seq_len} to be a multiple of {n} shards")
  return np.arange(seq_len).reshape(seq_len // n, n).T.reshape(-1)


__all__ = ["IMPLS", "LAYOUTS", "attention_reference", "flash_attention", "ring_attention", "merge_attention",
           "visible_mask", "load_balance_order", "ring_steps_for_window"]
