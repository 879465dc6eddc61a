#!/usr/bin/env python
"""Benchmark the linear recurrence kernel: chunked (xla, pallas) against the token-scan reference.

For each sequence length prints the time of one call (forward, or forward +
backward with --grad), tokens/s, MFU and the compiled temporaries, with the
speed-up over the reference measured in the same run. Model FLOPs are the
recurrence's own, 4 * key_dim * value_dim per token and head forward (write
k^T v, read q S; x3 with the backward), whatever the implementation does, so
MFU compares implementations on the same work; the peak is a square matmul
measured in this process. The pallas path is only timed on TPU (elsewhere it
runs in interpret mode, which is for correctness, not speed).

    python scripts/bench_linear_recurrence.py --lengths 1k,2k,4k,8k,16k,32k,64k
    python scripts/bench_linear_recurrence.py --decay vector --grad --chunk-sizes 32,64,128
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time

import jax
import jax.numpy as jnp

from longctx.bench import measure_matmul_peak, peak_rss_bytes
from longctx.eval.streaming import parse_lengths
from longctx.kernels import linear_recurrence as lr


def inputs(*, length, batch, heads, key_dim, value_dim, decay, delta, seed=0):
  keys = jax.random.split(jax.random.key(seed), 5)
  q = jax.random.normal(keys[0], (batch, length, heads, key_dim)) / key_dim**0.5
  k = jax.random.normal(keys[1], (batch, length, heads, key_dim))
  if delta:
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  v = jax.random.normal(keys[2], (batch, length, heads, value_dim))
  shape = {"none": None, "scalar": (batch, length, heads), "vector": (batch, length, heads, key_dim)}[decay]
  log_decay = None if shape is None else -jax.nn.softplus(jax.random.normal(keys[3], shape) - 3)
  beta = jax.nn.sigmoid(jax.random.normal(keys[4], (batch, length, heads))) if delta else None
  return dict(q=q, k=k, v=v, log_decay=log_decay, beta=beta)


def build(impl, chunk_size, grad):
  fn = functools.partial(lr.linear_recurrence, impl=impl, chunk_size=chunk_size)
  if not grad:
    return jax.jit(lambda x: fn(**x))

  def loss(diff, rest):
    out, state = fn(**diff, **rest)
    return jnp.sum(out.astype(jnp.float32) ** 2) + jnp.sum(state**2)

  def step(x):
    diff = {n: a for n, a in x.items() if a is not None}
    rest = {n: a for n, a in x.items() if a is None}
    return jax.grad(loss)(diff, rest)

  return jax.jit(step)


def time_call(fn, x, repeats):
  compiled = fn.lower(x).compile()
  jax.block_until_ready(compiled(x))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(x))
    best = min(best, time.perf_counter() - t0)
  mem = compiled.memory_analysis()
  temp = (getattr(mem, "temp_size_in_bytes", 0) or 0) / 2**20 if mem is not None else float("nan")
  return best, temp


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--lengths", default="1k,2k,4k,8k,16k,32k,64k", help="sequence lengths (k = 1024)")
  p.add_argument("--impls", default="reference,xla,pallas",
                 help="implementations to time; the first is the baseline of the x-ref column (pallas: TPU only)")
  p.add_argument("--chunk-sizes", default="64", help="chunk sizes of the chunked implementations")
  p.add_argument("--batch", type=int, default=1, help="batch rows")
  p.add_argument("--heads", type=int, default=4, help="heads")
  p.add_argument("--key-dim", type=int, default=64, help="key (and query) dimension per head")
  p.add_argument("--value-dim", type=int, default=64, help="value dimension per head")
  p.add_argument("--decay", choices=("none", "scalar", "vector"), default="scalar",
                 help="no decay, one per head (RetNet, Mamba-2) or one per key channel (GLA)")
  p.add_argument("--delta", action="store_true", help="the delta rule (DeltaNet) instead of the additive write")
  p.add_argument("--grad", action="store_true", help="time forward + backward instead of forward")
  p.add_argument("--repeats", type=int, default=3, help="timed calls per point (the best counts)")
  p.add_argument("--json", help="also write the rows to this JSON file")
  args = p.parse_args(argv)
  try:
    lengths = parse_lengths(args.lengths)
    chunks = [int(c) for c in args.chunk_sizes.split(",")]
  except ValueError as e:
    p.error(str(e))
  impls = [i.strip() for i in args.impls.split(",") if i.strip()]
  bad = [i for i in impls if i not in lr.IMPLS]
  if bad:
    p.error(f"--impls: {bad} not in {lr.IMPLS}")
  if "pallas" in impls and jax.default_backend() != "tpu":
    print(f"pallas: not timed on {jax.default_backend()} (interpret mode there checks correctness, not speed)")
    impls.remove("pallas")

  peak = measure_matmul_peak()
  flops_per_token = 4 * args.heads * args.key_dim * args.value_dim * (3 if args.grad else 1)
  print(f"device {jax.devices()[0].device_kind} | matmul peak {peak / 1e9:.1f} GFLOP/s | decay {args.decay}"
        f"{' + delta rule' if args.delta else ''} | {'forward+backward' if args.grad else 'forward'} | "
        f"batch {args.batch} x heads {args.heads} x dk {args.key_dim} x dv {args.value_dim}")
  header = f"{'impl':<10}{'chunk':>6}{'length':>8}{'ms':>10}{'tok/s':>12}{'x ref':>8}{'MFU':>8}{'temp MiB':>10}"
  print(header)
  print("-" * len(header))
  rows = []
  for length in lengths:
    x = inputs(length=length, batch=args.batch, heads=args.heads, key_dim=args.key_dim, value_dim=args.value_dim,
               decay=args.decay, delta=args.delta)
    base = None
    for impl in impls:
      for chunk in ([0] if impl == "reference" else chunks):
        seconds, temp = time_call(build(impl, chunk or 1, args.grad), x, args.repeats)
        base = base or seconds
        tok_s = args.batch * length / seconds
        row = dict(impl=impl, chunk=chunk, length=length, ms=seconds * 1e3, tokens_per_s=tok_s,
                   x_ref=base / seconds, mfu=tok_s * flops_per_token / peak, temp_mib=temp)
        rows.append(row)
        print(f"{impl:<10}{chunk or '-':>6}{length:>8}{row['ms']:>10.2f}{tok_s:>12.0f}{row['x_ref']:>8.1f}"
              f"{row['mfu']:>8.1%}{temp:>10.1f}", flush=True)
  print(f"peak RSS {peak_rss_bytes() / 2**20:.0f} MiB")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"peak_flops": peak, "args": vars(args), "rows": rows}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
