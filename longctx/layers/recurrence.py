"""The linear recurrence as models call it: one device, or context-parallel over the `sequence` axis."""

from __future__ import annotations

import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from longctx import sharding as shd
from longctx.kernels.linear_recurrence import linear_recurrence, sequence_parallel_linear_recurrence
from longctx.layers.kernel import resolve


def recurrence(q, k, v, *, log_decay=None, beta=None, segment_ids=None, initial_state=None, kernel: str = "auto",
               chunk_size: int = 64):
  """`kernels.linear_recurrence` (same arguments, shapes and results), its implementation chosen by
  `kernel` (`model.kernel`: "reference" is the token scan, "xla" the chunked form, "pallas" the kernel).

  When the mesh in context (`jax.set_mesh`, as the trainer traces its steps)
  has a `sequence` axis of n > 1 devices dividing seq, each device runs its
  seq/n tokens and `sequence_parallel_linear_recurrence` passes the states
  between them (one all_gather of per-shard transitions); the final state is
  the whole sequence's, on every device.
  """
  choice = resolve(kernel, "linear_recurrence")
  impl = choice.impl
  n = shd.context_parallel_size()
  if n == 1 or q.shape[1] % n:
    return linear_recurrence(q, k, v, log_decay=log_decay, beta=beta, segment_ids=segment_ids,
                             initial_state=initial_state, impl=impl, chunk_size=chunk_size, interpret=choice.interpret)
  seq = P(None, shd.SEQUENCE_AXIS)
  named = {"q": q, "k": k, "v": v, "log_decay": log_decay, "beta": beta, "segment_ids": segment_ids,
           "initial_state": initial_state}
  names = [name for name, x in named.items() if x is not None]

  def shard(shard_index, *args):
    return sequence_parallel_linear_recurrence(**dict(zip(names, args)), axis_name=shd.SEQUENCE_AXIS, impl=impl,
                                               chunk_size=chunk_size, shard_index=shard_index)

  in_specs = (P(shd.SEQUENCE_AXIS),) + tuple(P() if name == "initial_state" else seq for name in names)
  return shd.over_sequence(shard, in_specs=in_specs, out_specs=(seq, P()))(
      jnp.arange(n, dtype=jnp.int32), *(named[name] for name in names))


__all__ = ["recurrence"]
