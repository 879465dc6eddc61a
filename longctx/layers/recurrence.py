"""The recurrence kernels as models call them: one device, or context-parallel over the `sequence` axis."""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from longctx import sharding as shd
from longctx.kernels.linear_recurrence import linear_recurrence, sequence_parallel_linear_recurrence
from longctx.kernels.selective_scan import selective_scan, sequence_parallel_selective_scan
from longctx.layers.kernel import resolve


def recurrence(q, k, v, *, log_decay=None, beta=None, segment_ids=None, initial_state=None, kernel: str = "auto",
               chunk_size: int = 64):
  """`kernels.linear_recurrence` (same arguments, shapes and results), its implementation chosen by
  `kernel` (`model.kernel`: "reference" is the token scan, "xla" the chunked form, "pallas" the kernel).

  When the mesh in context (`jax.set_mesh`, as the trainer traces its steps)
  has a `sequence` axis of n > 1 devices dividing seq, each device runs its
  seq/n tokens and `sequence_parallel_linear_recurrence` passes the states
  between them (one all_gather of per-shard transitions); the final state is
  the whole sequence's, on every device. A Pallas kernel runs on each device's
  batch rows (`sharding.over_mesh`).
  """
  choice = resolve(kernel, "linear_recurrence" if beta is None else "delta_rule", chunk_size=chunk_size)
  common = dict(impl=choice.impl, chunk_size=chunk_size, interpret=choice.interpret)
  return _run(functools.partial(linear_recurrence, **common),
              functools.partial(sequence_parallel_linear_recurrence, axis_name=shd.SEQUENCE_AXIS, **common),
              {"q": q, "k": k, "v": v, "log_decay": log_decay, "beta": beta, "segment_ids": segment_ids,
               "initial_state": initial_state}, pallas=choice.impl == "pallas")


def fused_selective_scan(x, dt, a, b, c, *, segment_ids=None, initial_state=None, kernel: str = "auto",
                         chunk_size: int = 16):
  """`kernels.selective_scan` (Mamba's S6 scan; same arguments, shapes and results), its implementation chosen
  by `kernel` ("reference" the token scan, "xla" the chunked XLA form, "pallas" the fused kernels), and
  context-parallel like `recurrence` (`sequence_parallel_selective_scan`) where the mesh has a `sequence` axis."""
  choice = resolve(kernel, "selective_scan", chunk_size=chunk_size)
  common = dict(impl=choice.impl, chunk_size=chunk_size, interpret=choice.interpret)
  return _run(functools.partial(selective_scan, **common),
              functools.partial(sequence_parallel_selective_scan, axis_name=shd.SEQUENCE_AXIS, **common),
              {"x": x, "dt": dt, "a": a, "b": b, "c": c, "segment_ids": segment_ids, "initial_state": initial_state},
              pallas=choice.impl == "pallas", unbatched=("a",))


def diagonal_recurrence(a, x, *, initial_state=None, kernel: str = "auto"):
  """The elementwise linear recurrence `h_t = a_t * h_{t-1} + x_t` (Griffin's RG-LRU, LRU-style layers).

  Args:
    a, x: `[batch, seq, *channels]`; a document starts where `a_t = 0` (nothing of h_{t-1} survives).
    initial_state: `[batch, *channels]` h before the first token (None: zeros).
    kernel: `model.kernel`; "reference" is a `lax.scan` over tokens, every other choice the associative scan
      (`lax.associative_scan`, O(log seq) depth; this op has no Pallas kernel, so the caller refuses "pallas").
  Returns:
    `h [batch, seq, *channels]` and the final `h [batch, *channels]`, float32.

  With a `sequence` axis of n > 1 devices in the mesh, each device scans its share from zero and one
  all_gather of (the share's product of a, its last h) folds the states entering every share
  (`sequence_parallel_diagonal_recurrence`).
  """
  impl = "reference" if kernel == "reference" else "associative"
  return _run(functools.partial(_diagonal_scan, impl=impl),
              functools.partial(sequence_parallel_diagonal_recurrence, axis_name=shd.SEQUENCE_AXIS, impl=impl),
              {"a": a, "x": x, "initial_state": initial_state}, pallas=False)


def _diagonal_scan(a, x, initial_state=None, *, impl: str):
  a, x = a.astype(jnp.float32), x.astype(jnp.float32)
  if initial_state is not None:
    x = x.at[:, 0].add(a[:, 0] * initial_state.astype(jnp.float32))
  if impl == "reference":
    def step(h, inputs):
      a_t, x_t = inputs
      h = a_t * h + x_t
      return h, h

    _, h = lax.scan(step, jnp.zeros_like(x[:, 0]), (a.swapaxes(0, 1), x.swapaxes(0, 1)))
    h = h.swapaxes(0, 1)
  else:
    _, h = lax.associative_scan(lambda l, r: (l[0] * r[0], r[0] * l[1] + r[1]), (a, x), axis=1)
  return h, h[:, -1]


def sequence_parallel_diagonal_recurrence(a, x, *, axis_name: str, initial_state=None, impl: str = "associative",
                                          shard_index=None):
  """`diagonal_recurrence` on a sequence sharded over mesh axis `axis_name` (inside `jax.shard_map`): this
  shard's `h` and the whole sequence's final state (the same on every shard). The state after a shard is
  `P h_in + h_local` with P the shard's product of a; `shard_index` as in
  `kernels.linear_recurrence.sequence_parallel_linear_recurrence`."""
  me = lax.axis_index(axis_name) if shard_index is None else jnp.reshape(shard_index, ()).astype(jnp.int32)
  h, last = _diagonal_scan(a, x, impl=impl)
  carry = jnp.cumprod(a.astype(jnp.float32), axis=1)  # [b, t, ...]: what of the entering state reaches token t
  all_p = lax.all_gather(carry[:, -1], axis_name)
  all_last = lax.all_gather(last, axis_name)
  entering = [jnp.zeros_like(last) if initial_state is None else initial_state.astype(jnp.float32)]
  for r in range(all_p.shape[0]):  # the shard count is static and small
    entering.append(all_p[r] * entering[-1] + all_last[r])
  h_in = jnp.stack(entering[:-1])[me]
  return h + carry * h_in[:, None], entering[-1]


def _run(one_device, sequence_parallel, named, *, pallas, unbatched=()):
  """`one_device(**named)`, or `sequence_parallel(**named, shard_index=...)` in a `shard_map` over the
  `sequence` axis when the mesh has one dividing seq. Every array is `[batch, seq, ...]` but the initial state
  `[batch, ...]` and those in `unbatched` (parameters, whole on every device). Returns (outputs `[batch, seq,
  ...]`, the final state). Pallas runs in a `shard_map` over the whole mesh (`sharding.over_mesh`)."""
  names = [name for name, x in named.items() if x is not None]
  arrays = [named[name] for name in names]
  n = shd.context_parallel_size()
  # Arrays whole on every shard enter in float32: their gradient is summed over the axis, and XLA:CPU crashed on
  # that sum in bfloat16 ("Invalid binary instruction opcode copy"; a bf16 train step with Mamba's A). The
  # kernels compute in float32 anyway.
  arrays = [x.astype(jnp.float32) if name in (*unbatched, "initial_state") and jnp.issubdtype(x.dtype, jnp.floating)
            else x for name, x in zip(names, arrays)]
  split_sequence = n > 1 and arrays[0].shape[1] % n == 0
  tokens = P(shd.BATCH, shd.SEQUENCE_AXIS) if split_sequence else P(shd.BATCH)
  specs = tuple(P() if name in unbatched else P(shd.BATCH) if name == "initial_state" else tokens for name in names)
  out_specs = (tokens, P(shd.BATCH))
  if split_sequence:
    fn = lambda index, *args: sequence_parallel(**dict(zip(names, args)), shard_index=index)
    specs, arrays = (P(shd.SEQUENCE_AXIS),) + specs, [jnp.arange(n, dtype=jnp.int32)] + arrays
  else:
    fn = lambda *args: one_device(**dict(zip(names, args)))
  if pallas:
    return shd.over_mesh(fn, in_specs=specs, out_specs=out_specs)(*arrays)
  if not split_sequence:
    return fn(*arrays)
  no_batch = lambda spec: P(*[None if name == shd.BATCH else name for name in spec])  # batch axes left to XLA
  return shd.over_sequence(fn, in_specs=tuple(map(no_batch, specs)), out_specs=tuple(map(no_batch, out_specs)))(
      *arrays)


__all__ = ["diagonal_recurrence", "fused_selective_scan", "recurrence"]
