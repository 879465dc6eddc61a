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
jnp) and "pallas": three Pallas kernels, interpreted off TPU. The forward and
dq kernels run a grid over (batch, head, query block) and loop over key
blocks; the dk/dv kernel runs a grid over (batch, kv head, key block) and loops
over its group's query heads and query blocks. Each loop skips unseen pairs.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

IMPLS = ("reference", "xla", "pallas")
LAYOUTS = ("contiguous", "zigzag", "striped")
_BIG = np.iinfo(np.int32).max


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


def _pad_to(x, n, axis, value):
  pad = n - x.shape[axis]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def _blocks(q, k, v, q_pos, k_pos, q_doc, k_doc, block_q, block_k):
  """Pad to whole blocks and put the block index first.

  Returns q `[nq, b, bq, kvh, g, d]`, k/v `[nk, b, bk, kvh, d]`, positions `[n, bs]`,
  documents `[n, b, bs]` (padded queries get document -2, padded keys -1: never visible).
  """
  b, sq, h, d = q.shape
  sk, kvh = k.shape[1], k.shape[2]
  nq, nk = -(-sq // block_q), -(-sk // block_k)
  q = _pad_to(q, nq * block_q, 1, 0).reshape(b, nq, block_q, kvh, h // kvh, d)
  k = _pad_to(k, nk * block_k, 1, 0).reshape(b, nk, block_k, kvh, d)
  v = _pad_to(v, nk * block_k, 1, 0).reshape(b, nk, block_k, kvh, d)
  qp = _pad_to(q_pos.astype(jnp.int32), nq * block_q, 0, 0).reshape(nq, block_q)
  kp = _pad_to(k_pos.astype(jnp.int32), nk * block_k, 0, 0).reshape(nk, block_k)
  qd = _pad_to(q_doc.astype(jnp.int32), nq * block_q, 1, -2).reshape(b, nq, block_q)
  kd = _pad_to(k_doc.astype(jnp.int32), nk * block_k, 1, -1).reshape(b, nk, block_k)
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
  x = _pad_to(x, nq * bq, 2, 0).reshape(b, kvh, h // kvh, nq, bq)
  return jnp.transpose(x, (3, 0, 1, 2, 4))


def _scores(qb, kb, qp, kp, qd, kd, window, scale):
  """Masked scores `[b, kvh, g, bq, bk]` (f32, -inf where invisible) and the mask."""
  s = jnp.einsum("bqkgd,btkd->bkgqt", qb, kb, preferred_element_type=jnp.float32) * scale
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
        pv = jnp.einsum("bkgqt,btkd->bkgqd", p.astype(vi.dtype), vi, preferred_element_type=jnp.float32)
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


def _pallas_kernel(q_ref, k_ref, v_ref, qp_ref, kp_ref, qd_ref, kd_ref, o_ref, lse_ref, *, block_k, num_k_blocks,
                   window, scale):
  """One (batch, head, query block): loop over key blocks with an online softmax, skipping unseen ones.

  Refs: q `[bq, d]`, k/v `[sk, d]`, qp/qd `[bq, 1]`, kp/kd `[sk, 1]`; out `[bq, d]`, lse `[bq, 1]`.
  """
  q = q_ref[...]
  qp, qd = qp_ref[...], qd_ref[...]
  bq, d = q.shape

  def body(j, carry):
    start = pl.multiple_of(j * block_k, block_k)
    kp = kp_ref[pl.ds(start, block_k), :]
    kd = kd_ref[pl.ds(start, block_k), :]
    may = (jnp.max(qp) >= jnp.min(kp)) & (jnp.max(qd) >= jnp.min(jnp.where(kd >= 0, kd, _BIG))) & (
        jnp.min(qd) <= jnp.max(kd))
    if window is not None:
      may &= jnp.min(qp) - jnp.max(kp) <= window

    def compute(carry):
      acc, m, l = carry
      k = k_ref[pl.ds(start, block_k), :]
      v = v_ref[pl.ds(start, block_k), :]
      s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
      dist = qp - kp.T
      mask = (dist >= 0) & (qd == kd.T) & (kd.T >= 0)
      if window is not None:
        mask &= dist <= window
      s = jnp.where(mask, s, -jnp.inf)
      m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
      m_safe = jnp.where(m_new > -jnp.inf, m_new, 0.0)
      p = jnp.where(mask, jnp.exp(s - m_safe), 0.0)
      corr = jnp.exp(m - m_safe)
      pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
      return acc * corr + pv, m_new, l * corr + jnp.sum(p, axis=1, keepdims=True)

    return lax.cond(may, compute, lambda c: c, carry)

  init = (jnp.zeros((bq, d), jnp.float32), jnp.full((bq, 1), -jnp.inf, jnp.float32), jnp.zeros((bq, 1), jnp.float32))
  acc, m, l = lax.fori_loop(0, num_k_blocks, body, init)
  seen = l > 0
  o_ref[...] = (acc / jnp.where(seen, l, 1.0)).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)


def _forward_pallas(q, k, v, q_pos, k_pos, q_doc, k_doc, *, window, scale, block_q, block_k, interpret):
  b, sq, h, d = q.shape
  sk, kvh = k.shape[1], k.shape[2]
  g = h // kvh
  nq, nk = -(-sq // block_q), -(-sk // block_k)
  bhsd = lambda x, n: jnp.swapaxes(_pad_to(x, n, 1, 0), 1, 2)  # [b, s, h, d] -> [b, h, s, d]
  qp = _pad_to(q_pos.astype(jnp.int32), nq * block_q, 0, 0)[:, None]
  kp = _pad_to(k_pos.astype(jnp.int32), nk * block_k, 0, 0)[:, None]
  qd = _pad_to(q_doc.astype(jnp.int32), nq * block_q, 1, -2)[..., None]
  kd = _pad_to(k_doc.astype(jnp.int32), nk * block_k, 1, -1)[..., None]
  skp = nk * block_k
  kernel = functools.partial(_pallas_kernel, block_k=block_k, num_k_blocks=nk, window=window, scale=scale)
  out, lse = pl.pallas_call(
      kernel,
      grid=(b, h, nq),
      in_specs=[
          pl.BlockSpec((None, None, block_q, d), lambda i, j, c: (i, j, c, 0)),
          pl.BlockSpec((None, None, skp, d), lambda i, j, c: (i, j // g, 0, 0)),
          pl.BlockSpec((None, None, skp, d), lambda i, j, c: (i, j // g, 0, 0)),
          pl.BlockSpec((block_q, 1), lambda i, j, c: (c, 0)),
          pl.BlockSpec((skp, 1), lambda i, j, c: (0, 0)),
          pl.BlockSpec((None, block_q, 1), lambda i, j, c: (i, c, 0)),
          pl.BlockSpec((None, skp, 1), lambda i, j, c: (i, 0, 0)),
      ],
      out_specs=[pl.BlockSpec((None, None, block_q, d), lambda i, j, c: (i, j, c, 0)),
                 pl.BlockSpec((None, None, block_q, 1), lambda i, j, c: (i, j, c, 0))],
      out_shape=[jax.ShapeDtypeStruct((b, h, nq * block_q, d), jnp.float32),
                 jax.ShapeDtypeStruct((b, h, nq * block_q, 1), jnp.float32)],
      interpret=interpret,
  )(bhsd(q, nq * block_q), bhsd(k, skp), bhsd(v, skp), qp, kp, qd, kd)
  return jnp.swapaxes(out, 1, 2)[:, :sq], lse[..., 0][..., :sq]


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
  dob = jnp.moveaxis(_pad_to(do, nq * block_q, 1, 0).reshape(b, nq, block_q, kvh, g, d), 1, 0)
  lse_b = _block_rows(jnp.where(jnp.isfinite(lse), lse, 0.0), nq, block_q, kvh)  # [nq, b, kvh, g, bq]
  delta_b = _block_rows(delta, nq, block_q, kvh)

  def grads_of_pair(qi, doi, lsei, deltai, qpi, qdi, ki, vi, kpi, kdi):
    s, mask = _scores(qi, ki, qpi, kpi, qdi, kdi, window, scale)
    p = jnp.where(mask, jnp.exp(s - lsei[..., None]), 0.0)
    dp = jnp.einsum("bqkgd,btkd->bkgqt", doi, vi, preferred_element_type=jnp.float32)
    ds = p * (dp - deltai[..., None]) * scale
    return p, ds

  def dq_block(args):
    qi, doi, lsei, deltai, qpi, qdi = args

    def step(dq, kargs):
      ki, vi, kpi, kdi = kargs

      def compute(dq):
        _, ds = grads_of_pair(qi, doi, lsei, deltai, qpi, qdi, ki, vi, kpi, kdi)
        return dq + jnp.einsum("bkgqt,btkd->bqkgd", ds.astype(ki.dtype), ki, preferred_element_type=jnp.float32)

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
        dv = dv + jnp.einsum("bkgqt,bqkgd->btkd", p.astype(doi.dtype), doi, preferred_element_type=jnp.float32)
        dk = dk + jnp.einsum("bkgqt,bqkgd->btkd", ds.astype(qi.dtype), qi, preferred_element_type=jnp.float32)
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


def _pallas_dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qp_ref, kp_ref, qd_ref, kd_ref, dq_ref, *,
                      block_k, num_k_blocks, window, scale):
  """dq of one (batch, head, query block): loop over key blocks, recomputing p = exp(s - lse).

  Refs: q, do `[bq, d]`, lse, delta, qp, qd `[bq, 1]`, k, v `[sk, d]`, kp, kd `[sk, 1]`; out dq `[bq, d]`.
  """
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]
  qp, qd = qp_ref[...], qd_ref[...]

  def body(j, dq):
    start = pl.multiple_of(j * block_k, block_k)
    kp, kd = kp_ref[pl.ds(start, block_k), :], kd_ref[pl.ds(start, block_k), :]

    def compute(dq):
      k, v = k_ref[pl.ds(start, block_k), :], v_ref[pl.ds(start, block_k), :]
      p, ds = _pallas_pair_grads(q, do, lse, delta, qp, qd, k, v, kp, kd, window=window, scale=scale)
      return dq + lax.dot_general(ds.astype(k.dtype), k, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)

    return lax.cond(_pallas_may_see(qp, kp, qd, kd, window), compute, lambda x: x, dq)

  dq_ref[...] = lax.fori_loop(0, num_k_blocks, body, jnp.zeros(q.shape, jnp.float32))


def _pallas_dkv_kernel(q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, qp_ref, kp_ref, qd_ref, kd_ref, dk_ref, dv_ref,
                       *, block_q, num_q_blocks, group, window, scale):
  """dk, dv of one (batch, kv head, key block): loop over the group's query heads and query blocks.

  Refs: q, do `[g, sq, d]`, lse, delta `[g, sq, 1]`, qp, qd `[sq, 1]`, k, v `[bk, d]`, kp, kd `[bk, 1]`.
  """
  k, v = k_ref[...], v_ref[...]
  kp, kd = kp_ref[...], kd_ref[...]

  def body(i, carry):
    head, blk = i // num_q_blocks, i % num_q_blocks
    start = pl.multiple_of(blk * block_q, block_q)
    qp, qd = qp_ref[pl.ds(start, block_q), :], qd_ref[pl.ds(start, block_q), :]

    def compute(carry):
      dk, dv = carry
      rows = lambda ref: ref[pl.ds(head, 1), pl.ds(start, block_q), :][0]
      q, do, lse, delta = rows(q_ref), rows(do_ref), rows(lse_ref), rows(delta_ref)
      p, ds = _pallas_pair_grads(q, do, lse, delta, qp, qd, k, v, kp, kd, window=window, scale=scale)
      tn = (((0,), (0,)), ((), ()))  # p^T x
      dv = dv + lax.dot_general(p.astype(do.dtype), do, tn, preferred_element_type=jnp.float32)
      dk = dk + lax.dot_general(ds.astype(q.dtype), q, tn, preferred_element_type=jnp.float32)
      return dk, dv

    return lax.cond(_pallas_may_see(qp, kp, qd, kd, window), compute, lambda c: c, carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, group * num_q_blocks, body, (zeros, zeros))
  dk_ref[...] = dk
  dv_ref[...] = dv


def _pallas_may_see(qp, kp, qd, kd, window):
  """`_may_see` for one batch row inside a kernel: positions `[n, 1]`, documents `[n, 1]`."""
  may = (jnp.max(qp) >= jnp.min(kp)) & (jnp.max(qd) >= jnp.min(jnp.where(kd >= 0, kd, _BIG))) & (
      jnp.min(qd) <= jnp.max(kd))
  if window is not None:
    may &= jnp.min(qp) - jnp.max(kp) <= window
  return may


def _pallas_pair_grads(q, do, lse, delta, qp, qd, k, v, kp, kd, *, window, scale):
  """p `[bq, bk]` and ds = p (do v^T - delta) scale for one block pair (lse already finite)."""
  nt = (((1,), (1,)), ((), ()))  # x y^T
  s = lax.dot_general(q, k, nt, preferred_element_type=jnp.float32) * scale
  dist = qp - kp.T
  mask = (dist >= 0) & (qd == kd.T) & (kd.T >= 0)
  if window is not None:
    mask &= dist <= window
  p = jnp.where(mask, jnp.exp(s - lse), 0.0)
  dp = lax.dot_general(do, v, nt, preferred_element_type=jnp.float32)
  return p, p * (dp - delta) * scale


def _backward_pallas(q, k, v, q_pos, k_pos, q_doc, k_doc, lse, delta, do, *, window, scale, block_q, block_k,
                     interpret):
  """`_backward_xla` as two Pallas kernels: dq per query block, dk/dv per key block (all heads of its group)."""
  b, sq, h, d = q.shape
  sk, kvh = k.shape[1], k.shape[2]
  g = h // kvh
  nq, nk = -(-sq // block_q), -(-sk // block_k)
  sqp, skp = nq * block_q, nk * block_k
  bhsd = lambda x, n: jnp.swapaxes(_pad_to(x, n, 1, 0), 1, 2)  # [b, s, h, d] -> [b, h, s, d]
  rows = lambda x: _pad_to(x, sqp, 2, 0)[..., None]  # [b, h, sq] -> [b, h, sqp, 1]
  qp = _pad_to(q_pos.astype(jnp.int32), sqp, 0, 0)[:, None]
  kp = _pad_to(k_pos.astype(jnp.int32), skp, 0, 0)[:, None]
  qd = _pad_to(q_doc.astype(jnp.int32), sqp, 1, -2)[..., None]
  kd = _pad_to(k_doc.astype(jnp.int32), skp, 1, -1)[..., None]
  qt, dot = bhsd(q, sqp), bhsd(do, sqp)
  kt, vt = bhsd(k, skp), bhsd(v, skp)
  lse_r, delta_r = rows(jnp.where(jnp.isfinite(lse), lse, 0.0)), rows(delta)
  common = dict(window=window, scale=scale)

  q_block = pl.BlockSpec((None, None, block_q, d), lambda i, j, c: (i, j, c, 0))
  q_rows = pl.BlockSpec((None, None, block_q, 1), lambda i, j, c: (i, j, c, 0))
  kv_all = pl.BlockSpec((None, None, skp, d), lambda i, j, c: (i, j // g, 0, 0))
  dq = pl.pallas_call(
      functools.partial(_pallas_dq_kernel, block_k=block_k, num_k_blocks=nk, **common),
      grid=(b, h, nq),
      in_specs=[q_block, kv_all, kv_all, q_block, q_rows, q_rows,
                pl.BlockSpec((block_q, 1), lambda i, j, c: (c, 0)),
                pl.BlockSpec((skp, 1), lambda i, j, c: (0, 0)),
                pl.BlockSpec((None, block_q, 1), lambda i, j, c: (i, c, 0)),
                pl.BlockSpec((None, skp, 1), lambda i, j, c: (i, 0, 0))],
      out_specs=q_block,
      out_shape=jax.ShapeDtypeStruct((b, h, sqp, d), jnp.float32),
      interpret=interpret,
  )(qt, kt, vt, dot, lse_r, delta_r, qp, kp, qd, kd)

  group = lambda x: x.reshape(b, kvh, g, *x.shape[2:])  # [b, h, ...] -> [b, kvh, g, ...]
  q_group = pl.BlockSpec((None, None, g, sqp, d), lambda i, j, c: (i, j, 0, 0, 0))
  rows_group = pl.BlockSpec((None, None, g, sqp, 1), lambda i, j, c: (i, j, 0, 0, 0))
  k_block = pl.BlockSpec((None, None, block_k, d), lambda i, j, c: (i, j, c, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_pallas_dkv_kernel, block_q=block_q, num_q_blocks=nq, group=g, **common),
      grid=(b, kvh, nk),
      in_specs=[q_group, q_group, rows_group, rows_group, k_block, k_block,
                pl.BlockSpec((sqp, 1), lambda i, j, c: (0, 0)),
                pl.BlockSpec((block_k, 1), lambda i, j, c: (c, 0)),
                pl.BlockSpec((None, sqp, 1), lambda i, j, c: (i, 0, 0)),
                pl.BlockSpec((None, block_k, 1), lambda i, j, c: (i, c, 0))],
      out_specs=[k_block, k_block],
      out_shape=[jax.ShapeDtypeStruct((b, kvh, skp, d), jnp.float32)] * 2,
      interpret=interpret,
  )(group(qt), group(dot), group(lse_r), group(delta_r), kt, vt, qp, kp, qd, kd)
  back = lambda x, n: jnp.swapaxes(x, 1, 2)[:, :n]
  return back(dq, sq), back(dk, sk), back(dv, sk)


def _backward_pass(q, k, v, q_pos, k_pos, q_doc, k_doc, lse, delta, do, opts):
  kw = dict(window=opts["window"], scale=opts["scale"], block_q=opts["block_q"], block_k=opts["block_k"])
  if opts["impl"] == "pallas":
    return _backward_pallas(q, k, v, q_pos, k_pos, q_doc, k_doc, lse, delta, do, interpret=opts["interpret"], **kw)
  return _backward_xla(q, k, v, q_pos, k_pos, q_doc, k_doc, lse, delta, do, **kw)


# ----------------------------------------------------------------------------- ring (and single device)


def _forward_pass(q, k, v, q_pos, k_pos, q_doc, k_doc, opts):
  kw = dict(window=opts["window"], scale=opts["scale"], block_q=opts["block_q"], block_k=opts["block_k"])
  if opts["impl"] == "pallas":
    return _forward_pallas(q, k, v, q_pos, k_pos, q_doc, k_doc, interpret=opts["interpret"], **kw)
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
  d = q.shape[-1]
  if interpret is None:
    interpret = jax.default_backend() != "tpu"
  return tuple(sorted(dict(axis_name=axis_name, window=window, scale=float(d ** -0.5 if scale is None else scale),
                           num_steps=num_steps, block_q=min(block_q, q.shape[1]), block_k=min(block_k, k.shape[1]),
                           impl=impl, interpret=interpret).items()))


def flash_attention(q, k, v, *, q_pos, k_pos, q_doc, k_doc, window: int | None = None, scale: float | None = None,
                    block_q: int = 128, block_k: int = 128, impl: str = "xla", interpret: bool | None = None,
                    return_lse: bool = False):
  """Blockwise attention on one device under the visibility rule (module docstring).

  Args:
    q: `[batch, q_len, heads, head_dim]`; k, v: `[batch, kv_len, kv_heads, head_dim]`.
    q_pos: `[q_len]`, k_pos: `[kv_len]` integer positions; q_doc `[batch, q_len]`,
      k_doc `[batch, kv_len]` document ids (a key with id < 0 is never seen).
    window: a query sees keys at most this many positions back (None: all earlier).
    block_q, block_k: block sizes (lengths need not be multiples).
    impl: "reference", "xla" or "pallas".
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
