#!/usr/bin/env python
"""Benchmark ring attention: per-device compiled memory and time as the sequence axis grows.

For each number of sequence devices N (1 = single-device flash attention) it
compiles causal attention forward + backward over one sequence of --length
tokens split N ways (`jax.shard_map` over a 1-D mesh), and prints the
per-device temporaries and arguments from `compiled.memory_analysis()`, their
ratio to N = 1, and the time of one call. The dense reference (the full
[heads, T, T] score matrix) is the first row. FLOPs are causal attention's
(4 * T^2 / 2 * heads * head_dim, x3.5 with the backward's recomputation);
MFU is against a matmul peak measured in the same process.

On a CPU host the N "devices" are virtual (`--xla_force_host_platform_device_count`)
and share the host's cores, so memory ratios are meaningful and times are not
(N devices run on the same cores); take times on real accelerators.

    python scripts/bench_ring_attention.py --length 16k --devices 1,2,4,8
    python scripts/bench_ring_attention.py --length 32k --layout zigzag --window 4096
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--length", default="8k", help="total sequence length (k = 1024)")
  p.add_argument("--devices", default="1,2,4,8", help="comma-separated sequence-axis sizes")
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--kv-heads", type=int, default=8)
  p.add_argument("--head-dim", type=int, default=64)
  p.add_argument("--block", type=int, default=512, help="block_q = block_k")
  p.add_argument("--window", type=int, default=0, help="sliding window (0 = full causal)")
  p.add_argument("--layout", default="contiguous", choices=("contiguous", "zigzag", "striped"))
  p.add_argument("--impl", default="xla", choices=("xla", "pallas", "pallas_tpu", "pallas_gpu"))
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--no-dense", action="store_true", help="skip the dense reference row")
  p.add_argument("--repeats", type=int, default=2)
  args = p.parse_args(argv)
  counts = [int(x) for x in args.devices.split(",")]
  if "jax" not in sys.modules:  # virtual CPU devices must be requested before jax starts
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={max(counts)}").strip()

  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, PartitionSpec as P

  from longctx.bench import measure_matmul_peak
  from longctx.eval.streaming import parse_lengths
  from longctx.kernels import ring_attention as ra

  (length,) = parse_lengths(args.length)
  if len(jax.devices()) < max(counts):
    print(f"error: {max(counts)} devices requested, {len(jax.devices())} available", file=sys.stderr)
    return 2
  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  window = args.window or None
  b, h, kvh, d = 1, args.heads, args.kv_heads, args.head_dim
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (b, length, h, d), dtype)
  k = jax.random.normal(keys[1], (b, length, kvh, d), dtype)
  v = jax.random.normal(keys[2], (b, length, kvh, d), dtype)
  doc = jnp.zeros((b, length), jnp.int32)
  visible_pairs = length * (length + 1) / 2 if window is None else length * min(window + 1, length)
  flops = 3.5 * 4 * visible_pairs * h * d
  peak = measure_matmul_peak()

  def grad_step(attend):
    def loss(q, k, v):
      return jnp.sum(attend(q, k, v).astype(jnp.float32) ** 2)

    return jax.grad(loss, argnums=(0, 1, 2))

  def build(n):
    if n == 0:  # dense reference
      pos = jnp.arange(length)
      return jax.jit(grad_step(lambda q, k, v: ra.flash_attention(
          q, k, v, q_pos=pos, k_pos=pos, q_doc=doc, k_doc=doc, window=window, impl="reference")))
    order = ra.load_balance_order(length, n, args.layout)
    pos = jnp.asarray(order)
    mesh = Mesh(np.array(jax.devices()[:n]), ("seq",))
    local = length // n
    steps = ra.ring_steps_for_window(window, local, n) if args.layout == "contiguous" else None

    def body(q, k, v, pos, doc):
      return ra.ring_attention(q, k, v, axis_name="seq", q_pos=pos, k_pos=pos, q_doc=doc, k_doc=doc, window=window,
                               num_steps=steps, block_q=args.block, block_k=args.block, impl=args.impl)

    s = P(None, "seq")
    ring = jax.shard_map(body, mesh=mesh, in_specs=(s, s, s, P("seq"), s), out_specs=s, check_vma=False)
    step = grad_step(lambda q, k, v: ring(q, k, v, pos, doc))
    sharding = jax.sharding.NamedSharding(mesh, s)
    return jax.jit(step, in_shardings=(sharding,) * 3, out_shardings=(sharding,) * 3)

  print(f"causal attention fwd+bwd: length {length:,}, heads {h} (kv {kvh}), head_dim {d}, {args.dtype}, "
        f"block {args.block}, window {window or 'none'}, layout {args.layout}, impl {args.impl}; "
        f"backend {jax.default_backend()}, matmul peak {peak / 1e9:.1f} GFLOP/s")
  header = f"{'form':<12} {'N':>3} {'temp MiB/dev':>13} {'x N=1':>7} {'args MiB/dev':>13} {'ms':>9} {'MFU':>7}"
  print(header)
  print("-" * len(header))
  base_temp = None
  rows = ([0] if not args.no_dense else []) + counts
  for n in rows:
    fn = build(n)
    compiled = fn.lower(q, k, v).compile()
    mem = compiled.memory_analysis()
    temp = mem.temp_size_in_bytes / 2**20
    arg = mem.argument_size_in_bytes / 2**20
    jax.block_until_ready(compiled(q, k, v))
    best = float("inf")
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(q, k, v))
      best = min(best, time.perf_counter() - t0)
    if n == 1:
      base_temp = temp
    ratio = f"{temp / base_temp:.3f}" if base_temp and n else "-"
    mfu = flops / best / (peak * max(n, 1))
    name = "dense" if n == 0 else ("flash" if n == 1 else "ring")
    print(f"{name:<12} {max(n, 1):>3} {temp:>13.1f} {ratio:>7} {arg:>13.1f} {best * 1e3:>9.1f} {mfu:>7.1%}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
