"""Chunked linear recurrence: the one primitive under RetNet, Mamba-2, GLA, Infini-attention and DeltaNet.

Per batch row and head, with a state `S [key_dim, value_dim]`:

    decay form:  S_t = a_t * S_{t-1} + k_t^T v_t                      o_t = q_t S_t
    delta rule:  S_t = a_t * (S_{t-1} - beta_t k_t^T (k_t S_{t-1})) + beta_t k_t^T v_t

`a_t = exp(log_decay_t)` is one scalar per head (RetNet, Mamba-2), one value per
key channel (GLA; multiplies the rows of S), or 1 (no decay: Infini-attention).
The output is inclusive: token t reads the state after its own update. The
delta rule (DeltaNet; Gated DeltaNet with a scalar decay) writes
`beta_t (v_t - k_t S)` so that `k_t S_t` moves toward `v_t`.

Shapes (batch, seq, heads first, like the attention layers):
  q, k:          [batch, seq, heads, key_dim]
  v:             [batch, seq, heads, value_dim]
  log_decay:     None, [batch, seq, heads] or [batch, seq, heads, key_dim]; <= 0
  beta:          None or [batch, seq, heads] (delta rule when given)
  segment_ids:   None or [batch, seq] int, non-decreasing along seq: a token's state
                 holds only its own document. The initial state belongs to the
                 document of the first token; the final state is the state of the
                 last document (the one still open at the end of the sequence).
  initial_state: None (zeros) or [batch, heads, key_dim, value_dim]
Returns `o [batch, seq, heads, value_dim]` (dtype of v) and the final state
`[batch, heads, key_dim, value_dim]` float32. All arithmetic is float32.

Three implementations behind `impl` (docs/contracts.md §3):
  "reference"  a `lax.scan` over tokens: the definition, slow and obvious.
  "xla"        chunked: inside a chunk of `chunk_size` tokens a masked (decayed)
               quadratic product, between chunks a `lax.scan` passing the state.
               With no decay or one per head, every chunk's parts are batched
               matmuls over all chunks at once and the scan only applies
               `S <- trans S + write` (the SSD / DeltaNet chunkwise algorithm);
               per-channel decays need [C, C, key_dim] ratios, so those chunks
               are computed one at a time inside the scan.
               Decay ratios are formed as exp(cum_i - cum_j) with the mask
               applied before exp, so every exponent is <= 0 and nothing
               overflows, whatever the decay. The delta rule solves the chunk's
               unit lower-triangular system (the WY/UT form of DeltaNet).
  "pallas"     Pallas kernels that walk the chunks in order with the state on chip:
               kernels/linear_recurrence_tpu.py (Mosaic TPU: grid (batch, heads,
               chunks), state in VMEM) and kernels/linear_recurrence_gpu.py (Triton:
               one program per (batch, head), state in registers), both running the
               chunk math of kernels/linear_recurrence_chunk.py. Their backward is a
               Pallas kernel too: the forward saves the state entering each chunk,
               the backward walks the chunks in reverse carrying the state's gradient.
               The per-chunk cumulative log decays are formed in XLA before the
               kernels (a segmented scan), so autodiff carries the kernels' dcum back
               to the decays. "pallas" is the platform's kernel ("pallas_tpu" /
               "pallas_gpu" name one; kernels/pallas_target.py has the rule, and the
               interpreter runs them on a CPU).

`sequence_parallel_linear_recurrence` runs the same op on a sequence sharded
over a mesh axis inside `jax.shard_map`: each shard runs the chunked pass from
a zero state, the shards exchange (final state, state transition) with one
all_gather, each shard folds its predecessors into its true initial state, and
a cheap correction adds that state's contribution (the decay forms), or the
shard re-runs its pass from it (the delta rule, whose outputs depend on the
state through the chunk solve).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from longctx.kernels.pallas_target import PALLAS_IMPLS, pallas_target

IMPLS = ("reference", "xla") + PALLAS_IMPLS


# ----------------------------------------------------------------------------- checks


def _check(q, k, v, log_decay, beta, segment_ids, initial_state) -> str:
  """Validate shapes; returns the decay kind: "none", "scalar" or "vector"."""
  if q.ndim != 4 or k.shape != q.shape:
    raise ValueError(f"q and k must both be [batch, seq, heads, key_dim]; got {q.shape} and {k.shape}")
  b, t, h, dk = q.shape
  if v.ndim != 4 or v.shape[:3] != (b, t, h):
    raise ValueError(f"v must be [batch, seq, heads, value_dim] = [{b}, {t}, {h}, *]; got {v.shape}")
  kind = "none"
  if log_decay is not None:
    if log_decay.shape == (b, t, h):
      kind = "scalar"
    elif log_decay.shape == (b, t, h, dk):
      kind = "vector"
    else:
      raise ValueError(f"log_decay must be [batch, seq, heads] = {(b, t, h)} (one decay per head) or "
                       f"[batch, seq, heads, key_dim] = {(b, t, h, dk)} (per key channel); got {log_decay.shape}")
  if beta is not None:
    if beta.shape != (b, t, h):
      raise ValueError(f"beta must be [batch, seq, heads] = {(b, t, h)}; got {beta.shape}")
    if kind == "vector":
      raise ValueError("the delta rule (beta) takes no decay or one decay per head, not a per-channel decay")
  if segment_ids is not None and segment_ids.shape != (b, t):
    raise ValueError(f"segment_ids must be [batch, seq] = {(b, t)}; got {segment_ids.shape}")
  if initial_state is not None and initial_state.shape != (b, h, dk, v.shape[-1]):
    raise ValueError(f"initial_state must be [batch, heads, key_dim, value_dim] = {(b, h, dk, v.shape[-1])}; "
                     f"got {initial_state.shape}")
  return kind


# ----------------------------------------------------------------------------- reference


def linear_recurrence_reference(q, k, v, *, log_decay=None, beta=None, segment_ids=None, initial_state=None):
  """The recurrence one token at a time (`lax.scan` over seq). Same contract as `linear_recurrence`."""
  kind = _check(q, k, v, log_decay, beta, segment_ids, initial_state)
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  f32 = lambda x: x.astype(jnp.float32)
  s0 = jnp.zeros((b, h, dk, dv), jnp.float32) if initial_state is None else f32(initial_state)
  doc = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  log_a = jnp.zeros((b, t, h), jnp.float32) if log_decay is None else f32(log_decay)
  bt = jnp.zeros((b, t, h), jnp.float32) if beta is None else f32(beta)

  def step(carry, xs):
    s, prev_doc = carry
    q_t, k_t, v_t, la_t, b_t, d_t = xs  # [b, h, dk], [b, h, dk], [b, h, dv], [b, h(, dk)], [b, h], [b]
    s = jnp.where((d_t != prev_doc)[:, None, None, None], 0.0, s)  # a new document starts from zeros
    a = jnp.exp(la_t)
    a = a[..., None] if kind == "vector" else a[..., None, None]
    if beta is None:
      s = a * s + k_t[..., :, None] * v_t[..., None, :]
    else:
      ks = jnp.einsum("bhk,bhkv->bhv", k_t, s)
      s = a * (s - b_t[..., None, None] * k_t[..., :, None] * ks[..., None, :]) \
          + b_t[..., None, None] * k_t[..., :, None] * v_t[..., None, :]
    return (s, d_t), jnp.einsum("bhk,bhkv->bhv", q_t, s)

  xs = tuple(jnp.moveaxis(x, 1, 0) for x in (f32(q), f32(k), f32(v), log_a, bt, doc))
  (s, _), o = lax.scan(step, (s0, doc[:, 0]), xs)
  return jnp.moveaxis(o, 0, 1).astype(v.dtype), s


# ----------------------------------------------------------------------------- one chunk (shared math)


def _cumulative(log_a, same, *, vector: bool):
  """Inclusive log decay from the chunk start or the document start, whichever is later.

  cum_i = sum of log_a_j over j <= i in the chunk with doc_j == doc_i, formed as a masked triangular
  matmul (no scan, so it also runs inside a kernel). Leaving the other documents' terms out (exact zeros)
  rather than subtracting their prefix makes a document's outputs bitwise independent of the documents
  before it, even with data-dependent decays. `same [..., C, C]`; log_a `[..., C]` or `[..., C, dk]`.
  """
  mask = same.astype(jnp.float32)
  if vector:
    return jnp.einsum("...ij,...jd->...id", mask, log_a, precision=lax.Precision.HIGHEST)
  # A matrix-matrix product with a trailing unit axis: the form a Mosaic kernel lowers.
  return jnp.einsum("...ij,...jk->...ik", mask, log_a[..., None], precision=lax.Precision.HIGHEST)[..., 0]


def _chunk_step(s, prev_doc, q, k, v, log_a, beta, doc, *, kind: str, solve):
  """One chunk of the recurrence for a batch of independent (row, head) problems.

  Args (leading dims `...` are any batch of problems; C the chunk length):
    s: state `[..., dk, dv]` on entry; prev_doc `[...]`: the document it belongs to.
    q, k `[..., C, dk]`, v `[..., C, dv]`; log_a `[..., C]` (scalar/none) or
    `[..., C, dk]` (vector); beta `[..., C]` or None; doc `[..., C]`.
    solve: `(m [..., C, C] unit lower triangular, rhs [..., C, n]) -> m^-1 rhs`.
  Returns the outputs `[..., C, dv]` and the state after the chunk.
  """
  if kind != "vector":
    intra, read, trans, write = _chunk_parts(prev_doc, q, k, v, log_a, beta, doc, solve=solve)
    s_new = (trans[..., None, None] * s if beta is None else jnp.einsum("...de,...ev->...dv", trans, s)) + write
    return intra + jnp.einsum("...id,...dv->...iv", read, s), s_new

  # Per-channel decay: A_ij = sum_d q_id k_jd exp(cum_id - cum_jd), exponent masked to <= 0 before exp.
  c = q.shape[-2]
  causal = jnp.tril(jnp.ones((c, c), bool))
  same = (doc[..., :, None] == doc[..., None, :]) & causal  # [..., C(i), C(j)]: j visible to i
  sees_state = doc == prev_doc[..., None]  # [..., C]: token still in the document the state holds
  last_doc = doc[..., -1:]
  to_last = doc == last_doc  # [..., C]: token's write survives to the end of the chunk
  keep_state = (last_doc[..., 0] == prev_doc)[..., None, None]
  cum = _cumulative(log_a, same, vector=True)
  diff = cum[..., :, None, :] - cum[..., None, :, :]  # [..., C, C, dk]
  ratio = jnp.exp(jnp.where(same[..., None], diff, -jnp.inf))
  scores = jnp.einsum("...id,...jd,...ijd->...ij", q, k, ratio)
  q_in = q * jnp.exp(cum) * sees_state[..., None]
  out = jnp.einsum("...ij,...jv->...iv", scores, v) + jnp.einsum("...id,...dv->...iv", q_in, s)
  k_out = k * jnp.exp(jnp.where(to_last[..., None], cum[..., -1:, :] - cum, -jnp.inf))
  s_new = jnp.exp(cum[..., -1, :])[..., :, None] * s * keep_state + jnp.einsum("...jd,...jv->...dv", k_out, v)
  return out, s_new


def _chunk_parts(prev_doc, q, k, v, log_a, beta, doc, *, solve):
  """Everything of a chunk that does not depend on the state entering it (no decay / one per head).

  Same arguments as `_chunk_step`, without the state. The chunk is affine in its entering state S:
      out    = intra + read @ S            intra [..., C, dv], read [..., C, dk]
      S_next = trans * S + write           trans [...] (decay forms) or trans @ S + write, trans
                                           [..., dk, dk] (delta rule); write [..., dk, dv]
  so every chunk's parts are computed at once and only the cheap state pass is sequential.
  """
  c = q.shape[-2]
  causal = jnp.tril(jnp.ones((c, c), bool))
  same = (doc[..., :, None] == doc[..., None, :]) & causal
  sees_state = doc == prev_doc[..., None]
  to_last = doc == doc[..., -1:]
  keep = doc[..., -1] == prev_doc
  cum = _cumulative(log_a, same, vector=False)
  gamma = jnp.exp(cum) * sees_state
  decay = jnp.exp(jnp.where(same, cum[..., :, None] - cum[..., None, :], -jnp.inf))
  to_end = jnp.exp(jnp.where(to_last, cum[..., -1:] - cum, -jnp.inf))
  carry = jnp.exp(cum[..., -1]) * keep
  qk = jnp.einsum("...id,...jd->...ij", q, k) * decay
  k_end = k * to_end[..., None]
  if beta is None:
    return (jnp.einsum("...ij,...jv->...iv", qk, v), q * gamma[..., None], carry,
            jnp.einsum("...jd,...jv->...dv", k_end, v))
  # Delta rule: U = U0 - W S with (I + diag(beta) strict_lower(decay * K K^T)) [U0, W] = diag(beta) [V, diag(gamma) K].
  dv = v.shape[-1]
  kk = jnp.einsum("...id,...jd->...ij", k, k) * decay * (1.0 - jnp.eye(c))
  m = jnp.eye(c) + beta[..., :, None] * kk
  sol = solve(m, beta[..., None] * jnp.concatenate([v, gamma[..., None] * k], axis=-1))
  u0, w = sol[..., :dv], sol[..., dv:]
  read = gamma[..., None] * q - jnp.einsum("...ij,...jd->...id", qk, w)
  trans = carry[..., None, None] * jnp.eye(k.shape[-1]) - jnp.einsum("...jd,...je->...de", k_end, w)
  return (jnp.einsum("...ij,...jv->...iv", qk, u0), read, trans,
          jnp.einsum("...jd,...jv->...dv", k_end, u0))


def _solve_unit_lower(m, rhs):
  """`m^-1 rhs` for unit lower-triangular `m [..., C, C]` (a triangular solve)."""
  return jax.scipy.linalg.solve_triangular(m, rhs, lower=True, unit_diagonal=True)


# ----------------------------------------------------------------------------- xla (chunked)


def _to_chunks(x, n, c):
  """`[batch, n*c, heads, ...]` -> `[n, batch, heads, c, ...]`."""
  b, _, h = x.shape[:3]
  x = x.reshape((b, n, c, h) + x.shape[3:])
  return jnp.moveaxis(jnp.moveaxis(x, 1, 0), 3, 2)


def _pad_inputs(q, k, v, log_decay, beta, segment_ids, chunk_size):
  """float32 inputs padded to whole chunks; padding tokens change nothing (k = v = 0, decay 1, beta 0)."""
  b, t, h, _ = q.shape
  n = -(-t // chunk_size)
  pad = n * chunk_size - t
  f32 = lambda x: x.astype(jnp.float32)
  padded = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
  log_a = jnp.zeros((b, t, h), jnp.float32) if log_decay is None else f32(log_decay)
  bt = None if beta is None else padded(f32(beta))
  doc = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  doc = jnp.pad(doc, [(0, 0), (0, pad)], mode="edge")
  return n, padded(f32(q)), padded(f32(k)), padded(f32(v)), padded(log_a), bt, doc


def _linear_recurrence_xla(q, k, v, log_decay, beta, segment_ids, initial_state, *, kind, chunk_size):
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  n, q, k, v, log_a, bt, doc = _pad_inputs(q, k, v, log_decay, beta, segment_ids, chunk_size)
  s0 = jnp.zeros((b, h, dk, dv), jnp.float32) if initial_state is None else initial_state.astype(jnp.float32)
  c = chunk_size
  if kind != "vector":
    # All chunks at once (batched matmuls), then a scan that only passes the state between chunks.
    in_chunks = lambda x: jnp.moveaxis(_to_chunks(x, n, c), 0, 2)  # [b, h, n, c, ...]
    doc_c = doc.reshape(b, 1, n, c)
    prev_doc = jnp.concatenate([doc_c[..., :1, 0], doc_c[..., :-1, -1]], axis=-1)  # [b, 1, n]
    intra, read, trans, write = _chunk_parts(
        prev_doc, in_chunks(q), in_chunks(k), in_chunks(v), in_chunks(log_a),
        None if bt is None else in_chunks(bt), doc_c, solve=_solve_unit_lower)
    trans = jnp.broadcast_to(trans, (b, h, n) + trans.shape[3:])
    if bt is None:
      apply = lambda tr, s: tr[..., None, None] * s
    else:
      apply = lambda tr, s: jnp.einsum("bhde,bhev->bhdv", tr, s)

    def pass_state(s, x):
      tr, wr = x
      return apply(tr, s) + wr, s

    s, entering = lax.scan(pass_state, s0, (jnp.moveaxis(trans, 2, 0), jnp.moveaxis(write, 2, 0)))
    out = intra + jnp.einsum("bhncd,nbhdv->bhncv", read, entering)
    out = out.reshape(b, h, n * c, dv)[:, :, :t]
    return jnp.swapaxes(out, 1, 2), s

  # Per-channel decay: the intra-chunk term needs [C, C, key_dim] decay ratios, so chunks are done one at a
  # time inside the scan (memory of one chunk, not of the whole sequence).
  doc_chunks = jnp.broadcast_to(jnp.moveaxis(doc.reshape(b, n, 1, c), 1, 0), (n, b, h, c))
  xs = (_to_chunks(q, n, c), _to_chunks(k, n, c), _to_chunks(v, n, c), _to_chunks(log_a, n, c),
        None, doc_chunks)

  def step(carry, x):
    s, prev_doc = carry
    qc, kc, vc, lac, bc, dc = x
    out, s = _chunk_step(s, prev_doc, qc, kc, vc, lac, bc, dc, kind=kind, solve=_solve_unit_lower)
    return (s, dc[..., -1]), out

  first_doc = jnp.broadcast_to(doc[:, :1], (b, h))
  (s, _), out = lax.scan(step, (s0, first_doc), xs)  # out [n, b, h, c, dv]
  out = jnp.moveaxis(out, 0, 2).reshape(b, h, n * c, dv)[:, :, :t]
  return jnp.swapaxes(out, 1, 2), s


# ----------------------------------------------------------------------------- pallas


def _chunk_decays(log_a, doc, c):
  """Per-chunk decay inputs of the kernels, formed in XLA (differentiable, so autodiff carries the kernels'
  dcum / dcarry back to the log decays).

  log_a `[b, h, T]` or `[b, h, T, dk]`, doc `[b, T]` (T = n c). Returns cum (`[b, h, T, 1]` or `[b, h, T, dk]`:
  the inclusive log decay from the chunk or document start, a segmented scan that never adds another
  document's terms) and carry (`[b, h, n, 1, 1]` or `[b, h, n, dk, 1]`: exp(the chunk's total) where the
  entering state's document runs through the whole chunk, else 0).
  """
  b, h, t = log_a.shape[:3]
  n = t // c
  vector = log_a.ndim == 4
  doc_c = doc.reshape(b, n, c)
  starts = jnp.concatenate([jnp.ones((b, n, 1), bool), doc_c[..., 1:] != doc_c[..., :-1]], axis=-1)
  la = log_a.reshape((b, h, n, c) + log_a.shape[3:])
  starts = jnp.broadcast_to(starts[:, None, :, :, None] if vector else starts[:, None], la.shape)

  def combine(a, z):
    return a[0] | z[0], jnp.where(z[0], z[1], a[1] + z[1])

  _, cum = lax.associative_scan(combine, (starts, la), axis=3)
  prev = jnp.concatenate([doc_c[:, :1, 0], doc_c[:, :-1, -1]], axis=1)  # [b, n]: the entering state's document
  keep = (doc_c[..., -1] == prev)[:, None]  # [b, 1, n]
  if vector:
    carry = (jnp.exp(cum[..., -1, :]) * keep[..., None])[..., None]
    return cum.reshape(b, h, t, -1), carry
  return cum.reshape(b, h, t, 1), (jnp.exp(cum[..., -1]) * keep)[..., None, None]


def _kernel_layouts(cum, doc, c):
  """The rows and columns the kernels read (kernels/linear_recurrence_tpu.py): cum_row `[b, h, n, 1, C]`
  (None per channel), doc `[b, T, 1]`, doc_row `[b, n, 1, C]`, prev `[b, n, 1, 1]`."""
  b, h, t, width = cum.shape
  n = t // c
  cum_row = None if width != 1 else cum.reshape(b, h, n, 1, c)
  doc_c = doc.reshape(b, n, c)
  prev = jnp.concatenate([doc_c[:, :1, 0], doc_c[:, :-1, -1]], axis=1)
  return cum_row, doc[..., None], doc_c[:, :, None, :], prev[..., None, None]


def _kernel_module(target):
  if target == "tpu":
    from longctx.kernels import linear_recurrence_tpu as module
  else:
    from longctx.kernels import linear_recurrence_gpu as module
  return module


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _pallas_op(q, k, v, cum, carry, beta, s0, doc, static):
  chunk_size, target, interpret = static
  cum_row, doc_col, doc_row, prev = _kernel_layouts(cum, doc, chunk_size)
  out, s, _ = _kernel_module(target).forward(q, k, v, cum, cum_row, doc_col, doc_row, prev, carry, beta, s0,
                                             chunk_size=chunk_size, save_states=False, interpret=interpret)
  return out, s


def _pallas_op_fwd(q, k, v, cum, carry, beta, s0, doc, static):
  chunk_size, target, interpret = static
  cum_row, doc_col, doc_row, prev = _kernel_layouts(cum, doc, chunk_size)
  out, s, states = _kernel_module(target).forward(q, k, v, cum, cum_row, doc_col, doc_row, prev, carry, beta, s0,
                                                  chunk_size=chunk_size, save_states=True, interpret=interpret)
  return (out, s), (q, k, v, cum, carry, beta, doc, states)


def _pallas_op_bwd(static, residuals, cotangents):
  chunk_size, target, interpret = static
  q, k, v, cum, carry, beta, doc, states = residuals
  d_out, ds_final = cotangents
  cum_row, doc_col, doc_row, prev = _kernel_layouts(cum, doc, chunk_size)
  dq, dk, dv, dcum, dcarry, dbeta, ds0 = _kernel_module(target).backward(
      q, k, v, cum, cum_row, doc_col, doc_row, prev, carry, beta, states, d_out, ds_final.astype(jnp.float32),
      chunk_size=chunk_size, interpret=interpret)
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dcum, dcarry, dbeta, ds0,
          np.zeros(doc.shape, jax.dtypes.float0))


_pallas_op.defvjp(_pallas_op_fwd, _pallas_op_bwd)


def _linear_recurrence_pallas(q, k, v, log_decay, beta, segment_ids, initial_state, *, chunk_size, target,
                              interpret):
  """The Pallas path: inputs to the kernels' layout (heads first, padded to whole chunks, decays prepared),
  the kernels through `_pallas_op`'s custom VJP, and back."""
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  c = chunk_size
  n = -(-t // c)
  pad = n * c - t
  heads_first = lambda x: jnp.swapaxes(jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)), 1, 2)
  log_a = jnp.zeros((b, t, h), jnp.float32) if log_decay is None else log_decay.astype(jnp.float32)
  doc = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  doc = jnp.pad(doc, [(0, 0), (0, pad)], mode="edge")
  cum, carry = _chunk_decays(heads_first(log_a), doc, c)
  bt = None if beta is None else heads_first(beta.astype(jnp.float32))[..., None]
  s0 = jnp.zeros((b, h, dk, dv), jnp.float32) if initial_state is None else initial_state.astype(jnp.float32)
  out, s = _pallas_op(heads_first(q), heads_first(k), heads_first(v), cum, carry, bt, s0, doc,
                      (c, target, interpret))
  return jnp.swapaxes(out, 1, 2)[:, :t], s


# ----------------------------------------------------------------------------- public


def linear_recurrence(q, k, v, *, log_decay=None, beta=None, segment_ids=None, initial_state=None,
                      impl: str = "xla", chunk_size: int = 64, interpret: bool | None = None):
  """o_t = q_t S_t over a sequence; see the module docstring for the recurrence and shapes.

  Args:
    impl: "reference" (token scan), "xla" (chunked, pure jnp), "pallas" (the platform's kernel), "pallas_tpu"
      or "pallas_gpu".
    chunk_size: tokens per chunk (not "reference"); the sequence need not be a multiple. The TPU kernel needs a
      multiple of 8, the GPU kernel a power of two >= 16.
    interpret: run a Pallas kernel in the interpreter; None = only on a CPU (kernels/pallas_target.py).
  Returns:
    `(o [batch, seq, heads, value_dim], final_state [batch, heads, key_dim, value_dim])`.
  """
  kind = _check(q, k, v, log_decay, beta, segment_ids, initial_state)
  if impl == "reference":
    return linear_recurrence_reference(q, k, v, log_decay=log_decay, beta=beta, segment_ids=segment_ids,
                                       initial_state=initial_state)
  if chunk_size < 1:
    raise ValueError(f"chunk_size={chunk_size} must be >= 1")
  if impl == "xla":
    return _linear_recurrence_xla(q, k, v, log_decay, beta, segment_ids, initial_state, kind=kind,
                                  chunk_size=chunk_size)
  if impl in PALLAS_IMPLS:
    target, interpret = pallas_target(impl, interpret)
    if target == "tpu" and chunk_size % 8:
      raise ValueError(f"chunk_size={chunk_size}: the TPU kernel needs a multiple of 8 (Mosaic's sublane tile)")
    if target == "gpu" and (chunk_size < 16 or chunk_size & (chunk_size - 1)):
      raise ValueError(f"chunk_size={chunk_size}: the GPU kernel needs a power of two >= 16 (Triton's tiles)")
    return _linear_recurrence_pallas(q, k, v, log_decay, beta, segment_ids, initial_state, chunk_size=chunk_size,
                                     target=target, interpret=interpret)
  raise ValueError(f"impl={impl!r} is not one of {IMPLS}")


# ----------------------------------------------------------------------------- sequence parallel


def sequence_parallel_linear_recurrence(q, k, v, *, axis_name: str, log_decay=None, beta=None, segment_ids=None,
                                        initial_state=None, impl: str = "xla", chunk_size: int = 64,
                                        interpret: bool | None = None, shard_index=None):
  """`linear_recurrence` on a sequence sharded over mesh axis `axis_name`; call inside `jax.shard_map`.

  Every argument is this shard's block along seq (`initial_state` the state
  entering the whole sequence, the same on every shard). Returns this shard's
  outputs and the final state of the whole sequence (the same on every shard).

  The state after a shard is an affine function of the state entering it,
  `S_out = P S_in + S_local`, where `S_local` is the shard's result from a zero
  state. P is `diag(exp(total log decay))` (zero if a document starts in the
  shard) for the decay forms, and a `[key_dim, key_dim]` matrix for the delta
  rule, found by running the shard's pass on the identity with v = 0. One
  all_gather of (P, S_local) lets every shard fold its predecessors into its
  entering state.

  `shard_index` (an int32 scalar or `[1]` array: this shard's place on the axis)
  replaces `lax.axis_index`, e.g. a sharded `jnp.arange(n)`; XLA:CPU's SPMD
  partitioner rejected axis_index's PartitionId inside deep rematerialised steps.
  """
  kind = _check(q, k, v, log_decay, beta, segment_ids, initial_state)
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  run = functools.partial(linear_recurrence, impl=impl, chunk_size=chunk_size, interpret=interpret)
  doc = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  me = lax.axis_index(axis_name) if shard_index is None else jnp.reshape(shard_index, ()).astype(jnp.int32)
  # The document open when this shard starts: the previous shard's last one (the first shard's: its first token's).
  last_docs = lax.all_gather(doc[:, -1], axis_name)  # [shards, b]
  entering_doc = jnp.where(me == 0, doc[:, 0], last_docs[jnp.maximum(me - 1, 0)])
  enters = doc == entering_doc[:, None]  # [b, t]: tokens that see the entering state
  keeps = enters[:, -1]  # [b]: the entering state survives the whole shard

  out_local, s_local = run(q, k, v, log_decay=log_decay, beta=beta, segment_ids=doc)
  if beta is None:
    la = jnp.zeros((b, t, h), jnp.float32) if log_decay is None else log_decay.astype(jnp.float32)
    total = jnp.exp(jnp.sum(la, axis=1))  # [b, h(, dk)]
    total = total[..., None] if kind == "vector" else total[..., None, None]
    transition = jnp.broadcast_to(total, (b, h, dk, 1)) * keeps[:, None, None, None]  # diag(P) as [.., dk, 1]
    apply = lambda p, s: p * s
  else:
    eye = jnp.broadcast_to(jnp.eye(dk, dtype=jnp.float32), (b, h, dk, dk)) * enters[:, 0, None, None, None]
    zeros = jnp.zeros((b, t, h, dk), jnp.float32)
    _, transition = run(q, k, zeros, log_decay=log_decay, beta=beta, segment_ids=doc, initial_state=eye)
    transition = transition * keeps[:, None, None, None]
    apply = lambda p, s: jnp.einsum("bhij,bhjv->bhiv", p, s)

  # Entering states of every shard: S(0) = initial, S(r + 1) = P(r) S(r) + S_local(r).
  all_p = lax.all_gather(transition, axis_name)
  all_s = lax.all_gather(s_local, axis_name)
  entering = [jnp.zeros((b, h, dk, dv), jnp.float32) if initial_state is None
              else initial_state.astype(jnp.float32)]
  for r in range(all_s.shape[0]):  # the shard count is static and small
    entering.append(apply(all_p[r], entering[-1]) + all_s[r])
  s_in = jnp.stack(entering[:-1])[me] * enters[:, 0, None, None, None]

  if beta is None:
    # Decay forms: the entering state adds q_t diag(exp(cum_t)) S_in to the tokens of the entering document.
    cum = jnp.exp(jnp.cumsum(la, axis=1))
    q_in = q.astype(jnp.float32) * (cum if kind == "vector" else cum[..., None]) * enters[:, :, None, None]
    out = out_local.astype(jnp.float32) + jnp.einsum("bthd,bhdv->bthv", q_in, s_in)
    return out.astype(v.dtype), entering[-1]
  # Delta rule: the outputs depend on the entering state through the chunk solve; run again from it.
  out, _ = run(q, k, v, log_decay=log_decay, beta=beta, segment_ids=doc, initial_state=s_in)
  return out, entering[-1]


__all__ = ["IMPLS", "linear_recurrence", "linear_recurrence_reference", "sequence_parallel_linear_recurrence"]
