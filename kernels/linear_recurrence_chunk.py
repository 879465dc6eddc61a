"""One chunk of the linear recurrence, forward and backward, written for the inside of a Pallas kernel.

kernels/linear_recurrence_tpu.py and kernels/linear_recurrence_gpu.py move the data (a TPU grid with the
state in VMEM, a GPU program looping over chunks with the state in registers); both run these functions on
the arrays of one (batch row, head) chunk. They use only what Mosaic and Triton both lower: 2-D arrays,
matmuls (`dot_general` with f32 accumulation), elementwise math, `where` on int32 comparisons of full
`[C, C]` broadcasts and reductions. No slicing (Triton has none: a row is taken by a one-hot masked sum),
no transposed vectors, no solves.

Per chunk of C tokens (module docstring of kernels/linear_recurrence.py for the recurrence):
  q, k `[C, dk]`, v `[C, dv]`     the chunk's inputs, in the operand dtype of the matmuls
  s `[dk, dv]` f32                 the state entering the chunk
  cum `[C, 1]` (no decay / one per head) or `[C, dk]` (one per key channel): inclusive log decay from the
                                   chunk start or the token's document start, whichever is later
  cum_row `[1, C]`                 cum as a row (scalar kinds; prepared outside, no in-kernel transpose)
  doc `[C, 1]`, doc_row `[1, C]`   int32 document ids; prev `[1, 1]`: the entering state's document
  carry `[1, 1]` or `[dk, 1]`      exp(the chunk's total log decay) if the state's document runs through the
                                   whole chunk, else 0 (prepared outside, differentiated there)
  beta `[C, 1]` f32 or None        the delta rule's write strength

Forward (decay forms), with D_ij = exp(cum_i - cum_j) on visible pairs (same document, j <= i):
    out = (q k^T * D) v + (gamma q) S            gamma_i = exp(cum_i) if token i sees the state
    S'  = carry S + (to_end k)^T v               to_end_j = exp(cum_last - cum_j) if j's document is the last
The delta rule (scalar decay) replaces v by U = T beta (v - gamma k S), T = (I + beta strict_lower(k k^T * D))^-1
(the WY / UT form of DeltaNet), T found by doubling: (I + N)^-1 = (I - N)(I + N^2)(I + N^4)...

Per-channel decays have D_ijd = exp(cum_id - cum_jd), so (q k^T * D) is no matmul: it is built one key j
at a time (`_per_channel_scores`), exactly (every exponent masked to <= 0 before exp, nothing can overflow).

Backward: the same chunk in reverse, given do `[C, dv]` and dS' (the gradient of the state leaving the
chunk), returns dq, dk, dv, dcum, dcarry, dbeta and dS. The log-decay gradient uses the identity that a term
q_i . x * exp(cum_i - cum_j) gives dcum_i = q_i . dq_i and dcum_j = -k_j . dk_j from its own dq, dk parts.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

F32 = jnp.float32
_NN = (((1,), (0,)), ((), ()))  # x @ y
_NT = (((1,), (1,)), ((), ()))  # x @ y^T
_TN = (((0,), (0,)), ((), ()))  # x^T @ y


def _dot(x, y, dims, dtype):
  """Matmul with operands in `dtype` (the inputs' dtype: bf16 runs the MXU / tensor cores at full rate) and
  f32 accumulation; f32 operands are multiplied in full f32 precision. The precision is always explicit: a
  global `jax_default_matmul_precision=highest` would otherwise ask Mosaic for an fp32 contraction of bf16
  operands, which it rejects."""
  precision = lax.Precision.HIGHEST if dtype == F32 else lax.Precision.DEFAULT
  return lax.dot_general(x.astype(dtype), y.astype(dtype), dims, precision=precision, preferred_element_type=F32)


def _iota(shape, axis):
  return lax.broadcasted_iota(jnp.int32, shape, axis)


def _last_row(x):
  """`x[-1:]` of a `[C, w]` array, as a one-hot masked sum (exact: one nonzero term)."""
  last = _iota((x.shape[0], 1), 0) == x.shape[0] - 1
  return jnp.sum(jnp.where(last, x, jnp.zeros_like(x)), axis=0, keepdims=True)


def _masks(doc, doc_row, prev):
  """`same [C, C]` (key j visible to query i), `sees [C, 1]` (token sees the entering state), `to_last [C, 1]`
  (token's write survives to the chunk's end)."""
  c = doc.shape[0]
  causal = _iota((c, c), 0) >= _iota((c, c), 1)
  same = (jnp.broadcast_to(doc, (c, c)) == jnp.broadcast_to(doc_row, (c, c))) & causal
  return same, doc == prev, doc == _last_row(doc)


def _unit_lower_inverse(m):
  """`m^-1` for unit lower-triangular `m [C, C]` by doubling (matmuls only; m = I + N, N^C = 0)."""
  c = m.shape[0]
  eye = (_iota((c, c), 0) == _iota((c, c), 1)).astype(F32)
  x = eye - m  # -N
  inv = eye + x
  power = 1
  while 2 * power < c:
    x = _dot(x, x, _NN, F32)
    inv = inv + _dot(inv, x, _NN, F32)
    power *= 2
  return inv


def _decays(cum, doc, doc_row, prev, cum_row):
  """The chunk's masks and decay factors: same, D `[C, C]` (scalar kinds; None per channel), gamma, to_end."""
  same, sees, to_last = _masks(doc, doc_row, prev)
  decay = None if cum_row is None else jnp.exp(jnp.where(same, cum - cum_row, -jnp.inf))
  gamma = jnp.where(sees, jnp.exp(cum), 0.0)
  to_end = jnp.exp(jnp.where(to_last, _last_row(cum) - cum, -jnp.inf))
  return same, decay, gamma, to_end


def _one_hot_column(j, c):
  return (_iota((c, 1), 0) == j).astype(F32)


def _one_hot_row(j, c):
  return (_iota((1, c), 1) == j).astype(F32)


def _per_channel_factor(j, cum, same):
  """Key j's per-channel decay to every query, `[C, dk]`: exp(cum_i - cum_j) where j is visible to i, else 0."""
  c = cum.shape[0]
  col = _one_hot_column(j, c)
  cum_j = jnp.sum(cum * col, axis=0, keepdims=True)  # [1, dk]
  visible = jnp.sum(jnp.where(same, 1.0, 0.0) * _one_hot_row(j, c), axis=1, keepdims=True) > 0  # [C, 1]
  return jnp.exp(jnp.where(visible, cum - cum_j, -jnp.inf)), col


def _per_channel_scores(q, k, cum, same):
  """A_ij = sum_d q_id k_jd exp(cum_id - cum_jd) over visible pairs, `[C, C]` f32, one key at a time."""
  c = q.shape[0]
  qf, kf = q.astype(F32), k.astype(F32)

  def key(j, scores):
    factor, col = _per_channel_factor(j, cum, same)
    k_j = jnp.sum(kf * col, axis=0, keepdims=True)  # [1, dk]
    return scores + jnp.sum(qf * k_j * factor, axis=1, keepdims=True) * _one_hot_row(j, c)

  return lax.fori_loop(0, c, key, jnp.zeros((c, c), F32))


def _per_channel_grads(q, k, cum, same, d_scores):
  """dq, dk `[C, dk]` of sum(d_scores * A) for A of `_per_channel_scores`."""
  c = q.shape[0]
  qf, kf = q.astype(F32), k.astype(F32)

  def key(j, grads):
    dq, dk = grads
    factor, col = _per_channel_factor(j, cum, same)
    k_j = jnp.sum(kf * col, axis=0, keepdims=True)
    d_col = jnp.sum(d_scores * _one_hot_row(j, c), axis=1, keepdims=True)  # [C, 1]: dA[:, j]
    dq = dq + d_col * k_j * factor
    dk = dk + col * jnp.sum(d_col * qf * factor, axis=0, keepdims=True)
    return dq, dk

  zeros = jnp.zeros(q.shape, F32)
  return lax.fori_loop(0, c, key, (zeros, zeros))


def _delta_solve(k, beta, decay, dtype):
  """T = (I + beta strict_lower(k k^T * D))^-1 and the strict-lower k k^T * D it inverts."""
  c = k.shape[0]
  strict = _iota((c, c), 0) > _iota((c, c), 1)
  kk = jnp.where(strict, _dot(k, k, _NT, dtype) * decay, 0.0)
  eye = (_iota((c, c), 0) == _iota((c, c), 1)).astype(F32)
  return _unit_lower_inverse(eye + beta * kk), kk


def chunk_forward(q, k, v, s, cum, cum_row, doc, doc_row, prev, carry, beta):
  """One chunk: returns out `[C, dv]` f32 and the state after it `[dk, dv]` f32 (shapes: module docstring)."""
  dtype = q.dtype
  same, decay, gamma, to_end = _decays(cum, doc, doc_row, prev, cum_row)
  if decay is None:
    scores = _per_channel_scores(q, k, cum, same)
  else:
    scores = _dot(q, k, _NT, dtype) * decay
  if beta is None:
    u = v.astype(F32)
  else:
    t, _ = _delta_solve(k, beta, decay, dtype)
    u = _dot(t, beta * (v.astype(F32) - gamma * _dot(k, s, _NN, dtype)), _NN, dtype)
  out = _dot(scores, u, _NN, dtype) + _dot(q.astype(F32) * gamma, s, _NN, dtype)
  s_new = carry * s + _dot(k.astype(F32) * to_end, u, _TN, dtype)
  return out, s_new


def chunk_backward(q, k, v, s, cum, cum_row, doc, doc_row, prev, carry, beta, do, ds_next):
  """Gradients of one chunk: dq, dk, dv, dcum (cum's shape), dcarry (carry's shape), dbeta `[C, 1]` (None
  without beta) and dS `[dk, dv]`, given do `[C, dv]` and ds_next `[dk, dv]` (the leaving state's gradient)."""
  dtype = q.dtype
  c = q.shape[0]
  qf, kf, vf = q.astype(F32), k.astype(F32), v.astype(F32)
  same, decay, gamma, to_end = _decays(cum, doc, doc_row, prev, cum_row)
  vector = decay is None
  if beta is None:
    u = vf
  else:
    t, kk = _delta_solve(k, beta, decay, dtype)
    ks = _dot(k, s, _NN, dtype)
    r = vf - gamma * ks
    u = _dot(t, beta * r, _NN, dtype)

  # out = (q k^T * D) u + (gamma q) S;  S' = carry S + (to_end k)^T u
  d_scores = jnp.where(same, _dot(do, u, _NT, dtype), 0.0)  # d(q k^T * D)
  if vector:
    scores = _per_channel_scores(q, k, cum, same)
    dq_a, dk_a = _per_channel_grads(q, k, cum, same, d_scores)
  else:
    scores = _dot(q, k, _NT, dtype) * decay
    g = d_scores * decay
    dq_a, dk_a = _dot(g, k, _NN, dtype), _dot(g, q, _TN, dtype)
  dq_s = gamma * _dot(do, s, _NT, dtype)  # from (gamma q) S
  dk_s = to_end * _dot(u, ds_next, _NT, dtype)  # from (to_end k)^T u
  du = _dot(scores, do, _TN, dtype) + _dot(kf * to_end, ds_next, _NN, dtype)
  ds = carry * ds_next + _dot(qf * gamma, do, _TN, dtype)
  dq, dk = dq_a + dq_s, dk_a + dk_s
  # d cum: q . dq - k . dk of the terms above, plus cum_last's share of to_end
  dcum = qf * dq - kf * dk
  last = jnp.sum(kf * dk_s, axis=0, keepdims=True)
  dbeta, dcum_column = None, 0.0
  if beta is not None:
    # U = T y, y = beta r, r = v - gamma k S, T = (I + beta L)^-1, L = strict_lower(k k^T * D)
    dy = _dot(t, du, _TN, dtype)
    dr = beta * dy
    dbeta = jnp.sum(r * dy, axis=1, keepdims=True)
    dv = dr
    d_gamma_r = -jnp.sum(ks * dr, axis=1, keepdims=True)
    dk_r = -gamma * _dot(dr, s, _NT, dtype)
    ds = ds - _dot(kf * gamma, dr, _TN, dtype)
    dm = -jnp.where(_iota((c, c), 0) > _iota((c, c), 1), _dot(dy, u, _NT, dtype), 0.0)  # d(beta L), strict lower
    dbeta = dbeta + jnp.sum(dm * kk, axis=1, keepdims=True)
    dl = beta * dm * decay
    a, b = _dot(dl, k, _NN, dtype), _dot(dl, k, _TN, dtype)
    dk = dk + dk_r + a + b
    dcum = dcum + kf * a - kf * b
    dcum_column = gamma * d_gamma_r  # [C, 1]: gamma is one factor per token (the delta rule has scalar decays)
  else:
    dv = du
  if not vector:
    dcum = jnp.sum(dcum, axis=1, keepdims=True)
    last = jnp.sum(last, axis=1, keepdims=True)
  dcum = dcum + dcum_column + _one_hot_column(c - 1, c) * last
  dcarry = jnp.sum(ds_next * s, axis=1, keepdims=True)  # [dk, 1]
  if not vector:
    dcarry = jnp.sum(dcarry, axis=0, keepdims=True)
  return dq, dk, dv, dcum, dcarry, dbeta, ds
