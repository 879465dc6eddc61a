"""Mamba's selective scan (S6): a diagonal recurrence per (channel, state), fused so the states stay on chip.

Per batch row, channel d and state n (Gu & Dao 2023, Algorithm 2):

    h_t[d, n] = exp(dt_t[d] A[d, n]) h_{t-1}[d, n] + dt_t[d] B_t[n] x_t[d]        y_t[d] = sum_n C_t[n] h_t[d, n]

Shapes: x, dt `[batch, seq, channels]`; a `[channels, N]` (A, negative); b, c `[batch, seq, N]` (shared by every
channel); segment_ids `[batch, seq]` int (h restarts from zeros where a document starts); initial_state
`[batch, channels, N]` (belongs to the first token's document). Returns `y [batch, seq, channels]` and the final
state `[batch, channels, N]`, float32 (no D skip term: the model adds it).

The states h are `[batch, seq, channels, N]`, N times the size of x: what a plain associative scan
materialises (1.8 GiB of temporaries at d_model 128 in a train step) and what the Mamba paper's kernel never
writes to memory. Implementations behind `impl`:
  "reference"  a `lax.scan` over tokens: the definition.
  "xla"        the kernels' algorithm in plain XLA (kernels/selective_scan_xla.py): a `lax.scan` over chunks of
               `chunk_size` carries h, the chunk's tokens unrolled inside; the backward recomputes each chunk's
               states from the state saved at its start, so only one chunk's states are alive at a time.
  "pallas"     fused kernels (kernels/selective_scan_tpu.py, kernels/selective_scan_gpu.py): a block of
               channels' states `[N, channels]` stays in VMEM / registers while the tokens stream through; the
               forward saves the state at each chunk boundary, the backward recomputes a chunk's states from it
               and walks the chunk in reverse (the paper's recomputation). "pallas_tpu" / "pallas_gpu" name one
               (kernels/pallas_target.py; interpreted on a CPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from longctx.kernels.pallas_target import PALLAS_IMPLS, pallas_target

IMPLS = ("reference", "xla") + PALLAS_IMPLS
F32 = jnp.float32


def _check(x, dt, a, b, c, segment_ids, initial_state):
  if x.ndim != 3 or dt.shape != x.shape:
    raise ValueError(f"x and dt must both be [batch, seq, channels]; got {x.shape} and {dt.shape}")
  bs, t, d = x.shape
  if a.ndim != 2 or a.shape[0] != d:
    raise ValueError(f"a must be [channels, N] = [{d}, N]; got {a.shape}")
  n = a.shape[1]
  for name, arr in (("b", b), ("c", c)):
    if arr.shape != (bs, t, n):
      raise ValueError(f"{name} must be [batch, seq, N] = {(bs, t, n)}; got {arr.shape}")
  if segment_ids is not None and segment_ids.shape != (bs, t):
    raise ValueError(f"segment_ids must be [batch, seq] = {(bs, t)}; got {segment_ids.shape}")
  if initial_state is not None and initial_state.shape != (bs, d, n):
    raise ValueError(f"initial_state must be [batch, channels, N] = {(bs, d, n)}; got {initial_state.shape}")


def _keep(segment_ids, shape):
  """`[batch, seq]` f32: 0 where a document starts (the state before it is dropped), else 1."""
  if segment_ids is None:
    return jnp.ones(shape, F32)
  starts = jnp.concatenate([jnp.zeros_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
                           axis=1)
  return jnp.where(starts, 0.0, 1.0).astype(F32)


def selective_scan_reference(x, dt, a, b, c, *, segment_ids=None, initial_state=None):
  """The recurrence one token at a time. Same contract as `selective_scan`."""
  _check(x, dt, a, b, c, segment_ids, initial_state)
  bs, _, d = x.shape
  h0 = jnp.zeros((bs, d, a.shape[1]), F32) if initial_state is None else initial_state.astype(F32)
  keep = _keep(segment_ids, x.shape[:2])

  def step(h, xs):
    x_t, dt_t, b_t, c_t, keep_t = xs  # [bs, d], [bs, d], [bs, n], [bs, n], [bs]
    h = keep_t[:, None, None] * jnp.exp(dt_t[..., None] * a) * h + (dt_t * x_t)[..., None] * b_t[:, None, :]
    return h, jnp.einsum("bdn,bn->bd", h, c_t)

  xs = tuple(jnp.moveaxis(v.astype(F32), 1, 0) for v in (x, dt, b, c, keep))
  h, y = lax.scan(step, h0, xs)
  return jnp.moveaxis(y, 0, 1), h


# ----------------------------------------------------------------------------- fused (xla and pallas)


def _kernel_module(target):
  """The forward / backward pair of a target: "xla", "tpu" or "gpu" (one contract, selective_scan_tpu.py)."""
  if target == "tpu":
    from longctx.kernels import selective_scan_tpu as module
  elif target == "gpu":
    from longctx.kernels import selective_scan_gpu as module
  else:
    from longctx.kernels import selective_scan_xla as module
  return module


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _fused_op(x, dt, a_t, b, c, keep, h0_t, unused, static):
  y, h, _ = _kernel_module(static[1]).forward(x, dt, a_t, b, c, keep, h0_t, chunk_size=static[0],
                                              save_states=False, interpret=static[2])
  return y, h


def _fused_op_fwd(x, dt, a_t, b, c, keep, h0_t, unused, static):
  y, h, states = _kernel_module(static[1]).forward(x, dt, a_t, b, c, keep, h0_t, chunk_size=static[0],
                                                   save_states=True, interpret=static[2])
  return (y, h), (x, dt, a_t, b, c, keep, states)


def _fused_op_bwd(static, residuals, cotangents):
  x, dt, a_t, b, c, keep, states = residuals
  dy, dh = cotangents
  dx, ddt, da, db, dc, dh0 = _kernel_module(static[1]).backward(x, dt, a_t, b, c, keep, states, dy,
                                                                dh.astype(F32), chunk_size=static[0],
                                                                interpret=static[2])
  return dx, ddt, da, db, dc, jnp.zeros_like(keep), dh0, np.zeros((), jax.dtypes.float0)


_fused_op.defvjp(_fused_op_fwd, _fused_op_bwd)


def _selective_scan_fused(x, dt, a, b, c, segment_ids, initial_state, *, chunk_size, target, interpret):
  """The kernels' layout: channels last (lanes) and the states as `[N, channels]` (a and the states transposed);
  the sequence padded to whole chunks (dt = 0 there, so the state passes through unchanged)."""
  bs, t, d = x.shape
  n = a.shape[1]
  chunks = -(-t // chunk_size)
  pad = chunks * chunk_size - t
  padded = lambda v: jnp.pad(v.astype(F32), [(0, 0), (0, pad), (0, 0)])
  keep = jnp.pad(_keep(segment_ids, (bs, t)), [(0, 0), (0, pad)], constant_values=1.0)[..., None]
  h0 = jnp.zeros((bs, d, n), F32) if initial_state is None else initial_state.astype(F32)
  y, h = _fused_op(padded(x), padded(dt), a.astype(F32).T, padded(b), padded(c), keep, jnp.swapaxes(h0, 1, 2),
                    np.zeros((), np.float32), (chunk_size, target, interpret))
  return y[:, :t], jnp.swapaxes(h, 1, 2)


# ----------------------------------------------------------------------------- public


def selective_scan(x, dt, a, b, c, *, segment_ids=None, initial_state=None, impl: str = "xla", chunk_size: int = 16,
                   interpret: bool | None = None):
  """Mamba's selective scan; see the module docstring for the recurrence and shapes.

  Args:
    impl: "reference", "xla", "pallas" (the platform's kernel), "pallas_tpu" or "pallas_gpu".
    chunk_size: tokens between the states saved for the backward (each chunk's states are recomputed from
      them); "xla" unrolls a chunk's tokens, "pallas" needs a multiple of 8. The sequence need not be a multiple.
    interpret: run a Pallas kernel in the interpreter; None = only on a CPU.
  Returns:
    `(y [batch, seq, channels], final_state [batch, channels, N])`, float32.
  """
  _check(x, dt, a, b, c, segment_ids, initial_state)
  if impl == "reference":
    return selective_scan_reference(x, dt, a, b, c, segment_ids=segment_ids, initial_state=initial_state)
  if chunk_size < 1:
    raise ValueError(f"chunk_size={chunk_size} must be >= 1")
  if impl == "xla":
    return _selective_scan_fused(x, dt, a, b, c, segment_ids, initial_state, chunk_size=chunk_size, target="xla",
                                 interpret=False)
  if impl in PALLAS_IMPLS:
    target, interpret = pallas_target(impl, interpret)
    if chunk_size % 8:
      raise ValueError(f"chunk_size={chunk_size}: the selective-scan kernels need a multiple of 8")
    return _selective_scan_fused(x, dt, a, b, c, segment_ids, initial_state, chunk_size=chunk_size, target=target,
                                  interpret=interpret)
  raise ValueError(f"impl={impl!r} is not one of {IMPLS}")


# ----------------------------------------------------------------------------- sequence parallel


def sequence_parallel_selective_scan(x, dt, a, b, c, *, axis_name: str, segment_ids=None, initial_state=None,
                                     impl: str = "xla", chunk_size: int = 16, interpret: bool | None = None,
                                     shard_index=None):
  """`selective_scan` on a sequence sharded over mesh axis `axis_name`; call inside `jax.shard_map`.

  Every argument is this shard's block along seq (`initial_state` the state entering the whole sequence, the
  same on every shard). Returns this shard's y and the final state of the whole sequence (the same on every
  shard). As in `sequence_parallel_linear_recurrence`: the state after a shard is `P h_in + h_local`, with
  P = exp(sum_t dt_t A) per (channel, state) (zero if a document starts in the shard) and h_local the
  shard's final state from zeros; one all_gather of (P, h_local) gives every shard its entering state. The
  outputs are then a second pass from that state: the correction in closed form would need the cumulative
  decay of every token and state, `[batch, seq, channels, N]`, the tensor the fused scan exists to avoid.
  `shard_index` replaces `lax.axis_index` (see `sequence_parallel_linear_recurrence`).
  """
  _check(x, dt, a, b, c, segment_ids, initial_state)
  bs, t, d = x.shape
  n = a.shape[1]
  run = functools.partial(selective_scan, impl=impl, chunk_size=chunk_size, interpret=interpret)
  doc = jnp.zeros((bs, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  me = lax.axis_index(axis_name) if shard_index is None else jnp.reshape(shard_index, ()).astype(jnp.int32)
  last_docs = lax.all_gather(doc[:, -1], axis_name)  # [shards, bs]
  entering_doc = jnp.where(me == 0, doc[:, 0], last_docs[jnp.maximum(me - 1, 0)])
  enters = (doc[:, 0] == entering_doc).astype(F32)  # [bs]: the first token continues the entering document
  keeps = (doc[:, -1] == entering_doc).astype(F32)  # [bs]: the entering state survives the whole shard

  _, h_local = run(x, dt, a, b, c, segment_ids=doc)
  transition = jnp.exp(jnp.einsum("btd,dn->bdn", dt.astype(F32), a.astype(F32))) * keeps[:, None, None]
  all_p, all_h = lax.all_gather(transition, axis_name), lax.all_gather(h_local, axis_name)
  entering = [jnp.zeros((bs, d, n), F32) if initial_state is None else initial_state.astype(F32)]
  for r in range(all_h.shape[0]):  # the shard count is static and small
    entering.append(all_p[r] * entering[-1] + all_h[r])
  h_in = jnp.stack(entering[:-1])[me] * enters[:, None, None]
  y, _ = run(x, dt, a, b, c, segment_ids=doc, initial_state=h_in)
  return y, entering[-1]


__all__ = ["IMPLS", "selective_scan", "selective_scan_reference", "sequence_parallel_selective_scan"]
