"""`longctx bench`: train-step throughput, FLOPs, MFU and memory, as ratios within one run.

MFU = achieved model FLOP/s / matmul peak, where the peak is measured in the
same process (a large square matmul in the compute dtype), so the figure means
the same thing on a laptop CPU and on a TPU. Absolute times are only worth
quoting on a real accelerator; the ratios between rows are the figures to use.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from longctx.config import Config, DataConfig, MeshConfig, TrainConfig
from longctx.models import get_model_class


def measure_matmul_peak(*, dtype=jnp.float32, n: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of the best of `repeats` jitted [n, n] @ [n, n] matmuls on the default device."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  f = jax.jit(lambda x, y: x @ y)
  f(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n**3 / best


def peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


@dataclasses.dataclass
class BenchResult:
  model: str
  d_model: int
  seg_len: int
  lanes: int
  params_m: float
  step_s: float
  tokens_per_s: float
  train_flops_per_token: float
  mfu: float
  compiled_temp_mib: float
  compiled_args_mib: float
  peak_rss_mib: float


def random_batch(cfg: Config, seed: int) -> dict[str, np.ndarray]:
  d = cfg.data
  rng = np.random.default_rng(seed)
  shape = (d.segments_per_step, d.batch_size, d.seg_len)
  tokens = rng.integers(0, cfg.model.vocab_size, shape, dtype=np.int32)
  return {"tokens": tokens, "labels": np.roll(tokens, -1, axis=2), "loss_mask": np.ones(shape, np.float32),
          "segment_ids": np.zeros(shape, np.int32),
          "reset": np.broadcast_to((np.arange(shape[0]) == 0)[:, None], shape[:2]).copy()}


def bench_train_step(cfg: Config, *, steps: int, peak_flops: float) -> BenchResult:
  from longctx.training.trainer import Trainer

  trainer = Trainer(cfg)
  compiled = trainer.compiled_train_step()
  mem = compiled.memory_analysis()
  ts = trainer.init_train_state()
  batches = [trainer.put_batch(random_batch(cfg, i)) for i in range(2)]
  ts, m = trainer.train_step(ts, batches[0])  # compile + warm up
  jax.block_until_ready(m)
  times = []
  for i in range(steps):
    t0 = time.perf_counter()
    ts, m = trainer.train_step(ts, batches[i % 2])
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  step_s = float(np.median(times))
  d = cfg.data
  tokens = d.batch_size * d.seg_len * d.segments_per_step
  flops = 3 * get_model_class(cfg.model.name).flops_per_token(cfg.model, seg_len=d.seg_len)
  tps = tokens / step_s
  return BenchResult(
      model=cfg.model.name, d_model=cfg.model.d_model, seg_len=d.seg_len, lanes=d.batch_size,
      params_m=trainer.num_params / 1e6, step_s=step_s, tokens_per_s=tps, train_flops_per_token=flops,
      mfu=tps * flops / peak_flops,
      compiled_temp_mib=(getattr(mem, "temp_size_in_bytes", 0) or 0) / 2**20,
      compiled_args_mib=(getattr(mem, "argument_size_in_bytes", 0) or 0) / 2**20,
      peak_rss_mib=peak_rss_bytes() / 2**20)


def bench_config(model: str, *, d_model: int, seg_len: int, tokens_per_step: int, layers: int, window: int,
                 dtype: str) -> Config:
  model_cls = get_model_class(model)
  heads = max(1, d_model // 64)
  kwargs = {"d_model": d_model, "num_layers": layers, "num_heads": heads, "vocab_size": 259}
  fields = {f.name for f in dataclasses.fields(model_cls.config_class)}
  if "window" in fields:
    kwargs["window"] = min(window, seg_len)
  return Config(model=model_cls.config_class(**kwargs),
                data=DataConfig(batch_size=max(1, tokens_per_step // seg_len), seg_len=seg_len, segments_per_step=1),
                train=TrainConfig(steps=1000, compute_dtype=dtype), mesh=MeshConfig(data=1)).validate()


def format_table(results: list[BenchResult], peak_flops: float) -> str:
  base = results[0]
  head = (f"{'model':<12}{'d_model':>8}{'seg':>7}{'lanes':>6}{'params':>9}{'tok/s':>10}{'x base':>8}"
          f"{'GFLOP/tok':>10}{'MFU':>7}{'temp MiB':>10}{'args MiB':>10}{'RSS MiB':>9}")
  lines = [f"matmul peak (measured, this process): {peak_flops / 1e9:.1f} GFLOP/s", head, "-" * len(head)]
  for r in results:
    lines.append(f"{r.model:<12}{r.d_model:>8}{r.seg_len:>7}{r.lanes:>6}{r.params_m:>8.2f}M{r.tokens_per_s:>10.0f}"
                 f"{r.tokens_per_s / base.tokens_per_s:>8.2f}{r.train_flops_per_token / 1e9:>10.4f}"
                 f"{100 * r.mfu:>6.1f}%{r.compiled_temp_mib:>10.1f}{r.compiled_args_mib:>10.1f}{r.peak_rss_mib:>9.0f}")
  return "\n".join(lines)


def run_bench_cli(args) -> int:
  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  peak = measure_matmul_peak(dtype=dtype)
  results = []
  for d_model in [int(x) for x in args.d_models.split(",")]:
    for seg_len in [int(x) for x in args.seg_lens.split(",")]:
      cfg = bench_config(args.model, d_model=d_model, seg_len=seg_len, tokens_per_step=args.tokens_per_step,
                         layers=args.layers, window=args.window, dtype=args.dtype)
      results.append(bench_train_step(cfg, steps=args.steps, peak_flops=peak))
      print(f"  {args.model} d_model={d_model} seg={seg_len}: {results[-1].tokens_per_s:.0f} tok/s", flush=True)
  print(format_table(results, peak))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"matmul_peak_flops": peak, "backend": jax.default_backend(),
                 "results": [dataclasses.asdict(r) for r in results]}, f, indent=2)
  return 0
