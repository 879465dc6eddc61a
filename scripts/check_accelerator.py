#!/usr/bin/env python
"""Check and time every Pallas kernel on the accelerator at hand, then benchmark models on it.

    python scripts/check_accelerator.py                      # on a GPU or TPU machine
    python scripts/check_accelerator.py --json acc.json      # also keep every number
    python scripts/check_accelerator.py --quick              # small shapes: a dry run of this script (on a CPU
                                                             # the kernels run in the Pallas interpreter)

1. Peaks measured in this process: a square matmul (bf16 and f32) and an elementwise pass over a large array
   (read + write bytes / time), the two roofs of the roofline.
2. Correctness: each kernel ("pallas": the platform's own, compiled) against its reference (the token scan,
   dense attention) on fresh random inputs with documents and a ragged length: the relative error of the
   outputs and of every gradient, PASS under a tolerance.
3. Speed, bf16 at benchmark shapes: forward and forward + backward of the Pallas kernel and of the XLA path
   (and, for attention, the dense XLA form and cuDNN's flash attention where jax has it), with the achieved
   FLOP rate and bandwidth as fractions of the measured peaks, and the roofline fraction
   (max(FLOPs / peak, bytes / bandwidth) over the measured time; 1.0 is the roof).
4. `longctx bench` train steps for the chosen models (their `model.kernel=auto` picks for this platform).

Tests never depend on an accelerator; this script is how the README's accelerator numbers are made.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from longctx.kernels import linear_recurrence as lr
from longctx.kernels import ring_attention as ra
from longctx.kernels import selective_scan as ss

LR_KINDS = {"scalar": ("head", False), "none": (None, False), "vector": ("channel", False),
            "gated_delta": ("head", True)}


# ----------------------------------------------------------------------------- measuring


def best_time(fn, *args, repeats: int) -> float:
  """Seconds of the fastest of `repeats` calls of a compiled `fn` (after one warm-up call)."""
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t0)
  return best


def measure_peaks(quick: bool) -> dict:
  n = 1024 if quick else 8192
  peaks = {}
  for name, dtype in (("bf16", jnp.bfloat16), ("f32", jnp.float32)):
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    peaks[f"matmul_{name}_flops"] = 2 * n**3 / best_time(f, a, repeats=5)
  size = (1 << 24) if quick else (1 << 29)  # f32 elements: 64 MiB / 2 GiB
  x = jnp.ones((size,), jnp.float32)
  peaks["bandwidth_bytes"] = 2 * 4 * size / best_time(jax.jit(lambda y: y * 1.5 + 1.0), x, repeats=5)
  return peaks


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
    return float("inf")
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _loss_of(fn):
  """A scalar touching every output (and the final state, if any), for gradients."""

  def loss(*args):
    outs = fn(*args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    total = 0.0
    for i, o in enumerate(outs):
      o = o.astype(jnp.float32)
      w = jnp.cos(jnp.arange(o.size, dtype=jnp.float32).reshape(o.shape) * (0.37 + i))
      total = total + jnp.sum(jnp.where(jnp.isfinite(o), o, 0.0) * w)
    return total

  return loss


def compare(fast, slow, args, diff: tuple[int, ...]) -> dict:
  """Relative errors of `fast` vs `slow` on `args`: each output, then the gradient of each arg in `diff`."""
  got, want = jax.jit(fast)(*args), jax.jit(slow)(*args)
  got, want = (got if isinstance(got, tuple) else (got,)), (want if isinstance(want, tuple) else (want,))
  errs = {f"out{i}": rel_err(g, w) for i, (g, w) in enumerate(zip(got, want))}
  g_fast = jax.jit(jax.grad(_loss_of(fast), argnums=diff))(*args)
  g_slow = jax.jit(jax.grad(_loss_of(slow), argnums=diff))(*args)
  errs.update({f"d{i}": rel_err(g, w) for i, g, w in zip(diff, g_fast, g_slow)})
  return errs


def roofline(seconds: float, flops: float, bytes_: float, peaks: dict, dtype: str) -> dict:
  peak = peaks[f"matmul_{dtype}_flops"]
  bound = max(flops / peak, bytes_ / peaks["bandwidth_bytes"])
  return dict(ms=seconds * 1e3, tflops=flops / seconds / 1e12, flop_fraction=flops / seconds / peak,
              gbps=bytes_ / seconds / 1e9, bandwidth_fraction=bytes_ / seconds / peaks["bandwidth_bytes"],
              roofline_fraction=bound / seconds)


def _print_row(name, row):
  print(f"  {name:<34}{row['ms']:>10.3f} ms{row['tflops']:>9.2f} TFLOP/s ({row['flop_fraction']:>6.1%})"
        f"{row['gbps']:>9.0f} GB/s ({row['bandwidth_fraction']:>6.1%})   roofline {row['roofline_fraction']:>6.1%}",
        flush=True)


# ----------------------------------------------------------------------------- linear recurrence


def lr_inputs(kind, *, batch, seq, heads, dim, dtype, seed=0):
  decay, delta = LR_KINDS[kind]
  keys = jax.random.split(jax.random.key(seed), 7)
  q = jax.random.normal(keys[0], (batch, seq, heads, dim)) / dim**0.5
  k = jax.random.normal(keys[1], (batch, seq, heads, dim))
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True) if delta else k / dim**0.5
  v = jax.random.normal(keys[2], (batch, seq, heads, dim))
  shape = {None: None, "head": (batch, seq, heads), "channel": (batch, seq, heads, dim)}[decay]
  log_decay = None if shape is None else -jax.nn.softplus(jax.random.normal(keys[3], shape) - 2)
  beta = jax.nn.sigmoid(jax.random.normal(keys[4], (batch, seq, heads))) if delta else None
  doc = jnp.cumsum(jax.random.uniform(keys[5], (batch, seq)) < 4.0 / seq, axis=1).astype(jnp.int32)
  s0 = jax.random.normal(keys[6], (batch, heads, dim, dim)) * 0.1
  floats = [q.astype(dtype), k.astype(dtype), v.astype(dtype)] + [x for x in (log_decay, beta) if x is not None]
  return floats, doc, s0


def lr_fn(kind, impl, doc, s0, chunk):
  decay, delta = LR_KINDS[kind]

  def fn(q, k, v, *rest):
    rest = list(rest)
    log_decay = rest.pop(0) if decay else None
    beta = rest.pop(0) if delta else None
    kw = {} if impl == "reference" else dict(chunk_size=chunk)
    return lr.linear_recurrence(q, k, v, log_decay=log_decay, beta=beta, segment_ids=doc, initial_state=s0,
                                impl=impl, **kw)

  return fn


def check_linear_recurrence(args, peaks, report):
  print("\nlinear recurrence (kernels/linear_recurrence*.py)", flush=True)
  small = dict(batch=2, seq=37 if args.quick else 300, heads=2, dim=16 if args.quick else 64)
  for kind in LR_KINDS:
    floats, doc, s0 = lr_inputs(kind, dtype=jnp.float32, **small)
    errs = compare(lr_fn(kind, "pallas", doc, s0, 16 if args.quick else 64),
                   lr_fn(kind, "reference", doc, s0, 0), floats, tuple(range(len(floats))))
    worst = max(errs.values())
    ok = worst < 1e-4
    report["checks"].append(dict(op="linear_recurrence", kind=kind, worst_rel_err=worst, errs=errs, ok=ok))
    print(f"  {kind:<12} pallas vs token scan, f32: worst rel err {worst:.1e} over outputs + "
          f"{len(floats)} gradients  {'PASS' if ok else 'FAIL'}", flush=True)

  b, t, h, d = (1, 512, 2, 32) if args.quick else (args.batch, args.seq, args.heads, 64)
  chunk = 64
  for kind in ("scalar", "gated_delta"):
    floats, doc, s0 = lr_inputs(kind, batch=b, seq=t, heads=h, dim=d, dtype=jnp.bfloat16)
    flops_fwd = b * t * h * (2 * chunk * d * 2 + 4 * d * d) * (2 if LR_KINDS[kind][1] else 1)
    bytes_fwd = b * t * h * (4 * d * 2 + 4 + (4 if LR_KINDS[kind][1] else 0))
    for impl in ("pallas", "xla"):
      fn = lr_fn(kind, impl, doc, s0, chunk)
      fwd = best_time(jax.jit(fn), *floats, repeats=args.repeats)
      grad = best_time(jax.jit(jax.grad(_loss_of(fn), argnums=tuple(range(len(floats))))), *floats,
                       repeats=args.repeats)
      for mode, seconds, mult in (("fwd", fwd, 1), ("fwd+bwd", grad, 3)):
        row = roofline(seconds, flops_fwd * mult, bytes_fwd * mult, peaks, "bf16")
        row.update(op="linear_recurrence", kind=kind, impl=impl, mode=mode, shape=[b, t, h, d], chunk=chunk)
        report["timings"].append(row)
        _print_row(f"{kind} {impl} {mode} [{b},{t},{h},{d}]", row)


# ----------------------------------------------------------------------------- attention


def attn_inputs(*, batch, seq, heads, kv_heads, dim, dtype, seed=0, docs=True):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (batch, seq, heads, dim), dtype)
  k = jax.random.normal(keys[1], (batch, seq, kv_heads, dim), dtype)
  v = jax.random.normal(keys[2], (batch, seq, kv_heads, dim), dtype)
  doc = (jnp.cumsum(jax.random.uniform(keys[3], (batch, seq)) < 3.0 / seq, axis=1) if docs
         else jnp.zeros((batch, seq))).astype(jnp.int32)
  return [q, k, v], doc


def attn_fn(impl, doc, window):
  pos = jnp.arange(doc.shape[1])
  return lambda q, k, v: ra.flash_attention(q, k, v, q_pos=pos, k_pos=pos, q_doc=doc, k_doc=doc, window=window,
                                            impl=impl, return_lse=True)


def check_attention(args, peaks, report):
  print("\nflash attention (kernels/ring_attention.py and its Pallas kernels)", flush=True)
  small = dict(batch=2, seq=45 if args.quick else 300, heads=4, kv_heads=2, dim=16 if args.quick else 64)
  for window in (None, 32 if args.quick else 128):
    x, doc = attn_inputs(dtype=jnp.float32, **small)
    errs = compare(attn_fn("pallas", doc, window), attn_fn("reference", doc, window), x, (0, 1, 2))
    worst = max(errs.values())
    ok = worst < 1e-4
    report["checks"].append(dict(op="attention", window=window, worst_rel_err=worst, errs=errs, ok=ok))
    print(f"  window {str(window):<6} pallas vs dense, f32, GQA 4/2, documents: worst rel err {worst:.1e}  "
          f"{'PASS' if ok else 'FAIL'}", flush=True)

  b, t, h, d = (1, 512, 2, 64) if args.quick else (args.batch, args.seq, args.heads, 128)
  x, doc = attn_inputs(batch=b, seq=t, heads=h, kv_heads=h, dim=d, dtype=jnp.bfloat16, docs=False)
  flops_fwd = 4 * b * h * d * t * (t + 1) / 2  # causal: half the score matrix, two matmuls
  bytes_fwd = b * t * h * d * 2 * 4
  impls = {"pallas": attn_fn("pallas", doc, None), "xla": attn_fn("xla", doc, None),
           "dense": attn_fn("reference", doc, None)}
  if jax.default_backend() == "gpu":
    impls["cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
  for name, fn in impls.items():
    try:
      fwd = best_time(jax.jit(fn), *x, repeats=args.repeats)
      grad = best_time(jax.jit(jax.grad(_loss_of(fn), argnums=(0, 1, 2))), *x, repeats=args.repeats)
    except Exception as e:  # a peer this jax / device lacks (cuDNN's flash attention), reported, not fatal
      print(f"  {name}: not available here ({type(e).__name__}: {str(e).splitlines()[0][:120]})", flush=True)
      continue
    for mode, seconds, mult, bmult in (("fwd", fwd, 1, 1), ("fwd+bwd", grad, 3.5, 2.5)):
      row = roofline(seconds, flops_fwd * mult, bytes_fwd * bmult, peaks, "bf16")
      row.update(op="attention", impl=name, mode=mode, shape=[b, t, h, d])
      report["timings"].append(row)
      _print_row(f"causal {name} {mode} [{b},{t},{h},{d}]", row)


# ----------------------------------------------------------------------------- selective scan


def ss_inputs(*, batch, seq, channels, state, seed=0):
  keys = jax.random.split(jax.random.key(seed), 7)
  x = jax.random.normal(keys[0], (batch, seq, channels))
  dt = jax.nn.softplus(jax.random.normal(keys[1], (batch, seq, channels)) - 3)
  a = -jnp.exp(0.5 * jax.random.normal(keys[2], (channels, state)))
  b, c = (jax.random.normal(k, (batch, seq, state)) for k in keys[3:5])
  doc = jnp.cumsum(jax.random.uniform(keys[5], (batch, seq)) < 3.0 / seq, axis=1).astype(jnp.int32)
  h0 = 0.1 * jax.random.normal(keys[6], (batch, channels, state))
  return [x, dt, a, b, c], doc, h0


def ss_fn(impl, doc, h0, chunk):
  return lambda x, dt, a, b, c: ss.selective_scan(x, dt, a, b, c, segment_ids=doc, initial_state=h0, impl=impl,
                                                  chunk_size=chunk)


def check_selective_scan(args, peaks, report):
  print("\nselective scan (kernels/selective_scan*.py)", flush=True)
  small = dict(batch=2, seq=37 if args.quick else 300, channels=48 if args.quick else 640, state=4 if args.quick else 16)
  floats, doc, h0 = ss_inputs(**small)
  for impl in ("pallas", "xla"):
    errs = compare(ss_fn(impl, doc, h0, 16), ss_fn("reference", doc, h0, 16), floats, (0, 1, 2, 3, 4))
    worst = max(errs.values())
    ok = worst < 1e-4
    report["checks"].append(dict(op="selective_scan", impl=impl, worst_rel_err=worst, errs=errs, ok=ok))
    print(f"  {impl:<8} vs token scan, f32, documents, ragged: worst rel err {worst:.1e} over outputs + 5 gradients  "
          f"{'PASS' if ok else 'FAIL'}", flush=True)

  b, t, d, n = (1, 256, 64, 16) if args.quick else (args.batch, args.seq, 2048, 16)
  floats, doc, h0 = ss_inputs(batch=b, seq=t, channels=d, state=n)
  flops_fwd = b * t * d * n * 6  # decay multiply-add, input, output dot; exp counted as one
  bytes_fwd = b * t * (3 * d + 2 * n) * 4  # x, dt, y and b, c in f32: what a fused scan must move
  for impl in ("pallas", "xla"):
    fn = ss_fn(impl, doc, h0, 64 if impl == "pallas" else 16)
    fwd = best_time(jax.jit(fn), *floats, repeats=args.repeats)
    grad = best_time(jax.jit(jax.grad(_loss_of(fn), argnums=(0, 1, 2, 3, 4))), *floats, repeats=args.repeats)
    for mode, seconds, mult in (("fwd", fwd, 1), ("fwd+bwd", grad, 3)):
      row = roofline(seconds, flops_fwd * mult, bytes_fwd * mult, peaks, "f32")
      row.update(op="selective_scan", impl=impl, mode=mode, shape=[b, t, d, n])
      report["timings"].append(row)
      _print_row(f"{impl} {mode} [{b},{t},{d},{n}]", row)


# ----------------------------------------------------------------------------- models


def bench_models(args, report):
  print(f"\nlongctx bench: {args.models} (d_model {args.d_model}, segments of {args.seg_len}, bf16)", flush=True)
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "bench.json")
    cmd = [sys.executable, "-m", "longctx.cli", "bench", "--models", args.models, "--d-models", str(args.d_model),
           "--seg-lens", str(args.seg_len), "--tokens-per-step", str(args.tokens_per_step), "--dtype", "bfloat16",
           "--steps", "3" if args.quick else "5", "--layers", "2" if args.quick else "4", "--json", out]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    print(proc.stdout[-6000:], flush=True)
    if proc.returncode != 0:
      print(f"  bench failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}", flush=True)
      report["bench_error"] = proc.stderr[-2000:]
      return
    with open(out) as f:
      report["bench"] = json.load(f)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  p.add_argument("--quick", action="store_true", help="small shapes, few repeats (a dry run; interpreted on CPU)")
  p.add_argument("--only", choices=("kernels", "bench", "all"), default="all", help="which parts to run")
  p.add_argument("--batch", type=int, default=4, help="batch of the kernel timings")
  p.add_argument("--seq", type=int, default=4096, help="sequence length of the kernel timings")
  p.add_argument("--heads", type=int, default=16, help="heads of the kernel timings")
  p.add_argument("--repeats", type=int, default=5, help="timed calls per point (the fastest counts)")
  p.add_argument("--models", default="transformer,mamba2,retnet,mamba", help="models for `longctx bench`")
  p.add_argument("--d-model", type=int, default=1024, help="d_model of the model benchmarks")
  p.add_argument("--seg-len", type=int, default=1024, help="segment length of the model benchmarks")
  p.add_argument("--tokens-per-step", type=int, default=32768, help="tokens per train step of the model benchmarks")
  p.add_argument("--json", help="write every number to this file")
  args = p.parse_args(argv)
  if args.quick:
    args.repeats, args.d_model, args.seg_len, args.tokens_per_step = 2, 128, 128, 512
  device = jax.devices()[0]
  report = {"platform": jax.default_backend(), "device": device.device_kind, "jax": jax.__version__,
            "checks": [], "timings": []}
  print(f"{jax.default_backend()}: {device.device_kind} x {jax.device_count()} | jax {jax.__version__}", flush=True)
  if jax.default_backend() == "cpu" and not args.quick:
    print("no accelerator: the Pallas kernels would run in the interpreter; use --quick for a dry run", flush=True)
    return 2
  if args.only in ("kernels", "all"):
    peaks = measure_peaks(args.quick)
    report["peaks"] = peaks
    print(f"peaks (measured here): matmul bf16 {peaks['matmul_bf16_flops'] / 1e12:.1f} TFLOP/s, f32 "
          f"{peaks['matmul_f32_flops'] / 1e12:.1f} TFLOP/s, elementwise {peaks['bandwidth_bytes'] / 1e9:.0f} GB/s",
          flush=True)
    for name, check in (("linear_recurrence", check_linear_recurrence), ("attention", check_attention),
                        ("selective_scan", check_selective_scan)):
      try:
        check(args, peaks, report)
      except Exception as e:  # one kernel failing to compile or run must not hide the others
        report["checks"].append(dict(op=name, error=f"{type(e).__name__}: {e}"[:2000], ok=False))
        print(f"  {name}: ERROR {type(e).__name__}: {str(e)[:1500]}", flush=True)
  if args.only in ("bench", "all"):
    bench_models(args, report)
  failed = [c for c in report["checks"] if not c["ok"]]
  print(f"\n{len(report['checks']) - len(failed)} of {len(report['checks'])} kernel checks passed", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=1, default=float)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
