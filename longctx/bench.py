"""`longctx bench`: train and streaming-inference throughput, FLOPs, MFU and memory, as ratios in one run.

Two tables, one per kind of work:

  train   per model, d_model and segment length: tokens/s of the full train step
          (forward + backward + AdamW), 3x forward FLOPs per token.
  stream  per model and total length (up to 1M tokens and beyond): tokens/s of
          streaming inference, one segment at a time through the model state,
          forward FLOPs per token; memory must not grow with the length.

FLOPs per token are analytic (`SegmentLM.flops_per_token`): matmul FLOPs only,
attention counted over the keys a query actually sees (a causal block
counts half of its square). MFU = achieved model FLOP/s / a matmul peak
measured in the same process (a large square matmul in the compute dtype),
so the figure means the same thing on a laptop CPU and on a TPU. Memory is
the compiled step's `memory_analysis()` (temporaries, arguments) and the
process's peak RSS so far (lengths run in increasing order, so growth with
the length would show). Absolute times are only worth quoting on a real
accelerator; the ratio columns are the figures to use:

  x base   tokens/s relative to the first --models entry at the same size and length
  x first  (stream) tokens/s relative to the same model at the shortest length
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import resource
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from longctx import config as config_lib
from longctx.config import Config, DataConfig, MeshConfig, TrainConfig
from longctx.errors import ConfigError
from longctx import recipe as recipe_lib
from longctx.models import config_for, get_model_class


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


def current_rss_bytes() -> int:
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * resource.getpagesize()
  except OSError:
    return peak_rss_bytes()


@dataclasses.dataclass
class BenchResult:
  kind: str  # "train" or "stream"
  model: str
  d_model: int
  seg_len: int
  length: int  # tokens per lane: seg_len x segments per step (train) or the streamed total (stream)
  lanes: int
  params_m: float
  seconds: float
  tokens_per_s: float
  flops_per_token: float
  mfu: float
  compiled_temp_mib: float
  compiled_args_mib: float
  state_kib_per_lane: float  # bytes of the model state (cache + memory) that one lane carries
  rss_mib: float
  peak_rss_mib: float
  x_base: float = 1.0
  x_first: float = 1.0
  error: str = ""  # why this measurement did not run (e.g. the step did not fit in memory); numbers are NaN


# What a measurement may fail with and the benchmark go on: the runtime's errors (out of memory above all).
MEASUREMENT_ERRORS = (jax.errors.JaxRuntimeError, MemoryError)


def failed_result(kind: str, cfg: Config, length: int, error: BaseException) -> BenchResult:
  """A row saying why `kind` at this config was not measured: the error's type and first line."""
  lines = str(error).strip().splitlines()
  reason = f"{type(error).__name__}: {lines[0] if lines else ''}"[:200]
  nan = float("nan")
  return BenchResult(kind=kind, model=cfg.model.name, d_model=cfg.model.d_model, seg_len=cfg.data.seg_len,
                     length=length, lanes=cfg.data.batch_size, params_m=nan, seconds=nan, tokens_per_s=nan,
                     flops_per_token=nan, mfu=nan, compiled_temp_mib=nan, compiled_args_mib=nan,
                     state_kib_per_lane=nan, rss_mib=nan, peak_rss_mib=nan, x_base=nan, x_first=nan, error=reason)


def random_batch(cfg: Config, seed: int, *, reset_first: bool = True) -> dict[str, np.ndarray]:
  d = cfg.data
  rng = np.random.default_rng(seed)
  shape = (d.segments_per_step, d.batch_size, d.seg_len)
  tokens = rng.integers(0, cfg.model.vocab_size, shape, dtype=np.int32)
  reset = np.zeros(shape[:2], bool)
  reset[0] = reset_first
  return {"tokens": tokens, "labels": np.roll(tokens, -1, axis=2), "loss_mask": np.ones(shape, np.float32),
          "segment_ids": np.zeros(shape, np.int32), "reset": reset}


def _memory(compiled) -> tuple[float, float]:
  mem = compiled.memory_analysis()
  temp = (getattr(mem, "temp_size_in_bytes", 0) or 0) if mem is not None else 0
  args = (getattr(mem, "argument_size_in_bytes", 0) or 0) if mem is not None else 0
  return temp / 2**20, args / 2**20


def state_kib_per_lane(trainer) -> float:
  state = trainer.abstract_train_state["model_state"]
  total = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state))
  return total / trainer.cfg.data.batch_size / 1024


def bench_train_step(cfg: Config, *, steps: int, peak_flops: float) -> BenchResult:
  from longctx.training.trainer import Trainer

  trainer = Trainer(cfg, devices=jax.devices()[:1])
  temp, args = _memory(trainer.compiled_train_step())
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
      kind="train", model=cfg.model.name, d_model=cfg.model.d_model, seg_len=d.seg_len,
      length=d.seg_len * d.segments_per_step, lanes=d.batch_size, params_m=trainer.num_params / 1e6,
      seconds=step_s, tokens_per_s=tps, flops_per_token=flops, mfu=tps * flops / peak_flops,
      compiled_temp_mib=temp, compiled_args_mib=args, state_kib_per_lane=state_kib_per_lane(trainer),
      rss_mib=current_rss_bytes() / 2**20, peak_rss_mib=peak_rss_bytes() / 2**20)


def bench_stream(cfg: Config, *, lengths: list[int], peak_flops: float, progress: bool = True,
                 min_tokens: int = 65536) -> list[BenchResult]:
  """Streaming inference over each total length, one segment per call, state carried (donated).

  Short lengths are streamed repeatedly (fresh state each time) until `min_tokens`
  tokens were timed, so every row's tokens/s averages over enough work.
  """
  from tqdm.auto import tqdm

  from longctx.training.trainer import Trainer

  trainer = Trainer(cfg, devices=jax.devices()[:1])
  temp, args = _memory(trainer.compiled_score_step())
  params = trainer.init_train_state()["params"]
  d = cfg.data
  first = trainer.put_batch(random_batch(cfg, 0, reset_first=True))
  rest = [trainer.put_batch(random_batch(cfg, i, reset_first=False)) for i in (1, 2)]
  state, *_ = trainer.score_step(params, trainer.init_model_state(), first)  # compile + warm up
  jax.block_until_ready(state)
  flops = get_model_class(cfg.model.name).flops_per_token(cfg.model, seg_len=d.seg_len)
  out = []
  for length in sorted(lengths):
    calls = math.ceil(length / d.seg_len)
    repeats = max(1, math.ceil(min_tokens / (calls * d.seg_len)))
    bar = tqdm(total=calls * repeats, disable=not progress or calls < 64, unit="seg", dynamic_ncols=True,
               desc=f"stream {cfg.model.name} {length} tokens", mininterval=1.0, leave=False)
    t0 = time.perf_counter()
    for _ in range(repeats):
      state = trainer.init_model_state()
      for c in range(calls):
        state, nll, _ = trainer.score_step(params, state, first if c == 0 else rest[c % 2])
        if c % 16 == 15:  # bound the async dispatch queue (and memory) without stalling each call
          nll.block_until_ready()
          bar.update(16)
      jax.block_until_ready(state)
    seconds = (time.perf_counter() - t0) / repeats
    bar.close()
    tps = calls * d.seg_len * d.batch_size / seconds
    out.append(BenchResult(
        kind="stream", model=cfg.model.name, d_model=cfg.model.d_model, seg_len=d.seg_len, length=length,
        lanes=d.batch_size, params_m=trainer.num_params / 1e6, seconds=seconds, tokens_per_s=tps,
        flops_per_token=flops, mfu=tps * flops / peak_flops, compiled_temp_mib=temp, compiled_args_mib=args,
        state_kib_per_lane=state_kib_per_lane(trainer), rss_mib=current_rss_bytes() / 2**20, peak_rss_mib=peak_rss_bytes() / 2**20))
  return out


def bench_config(model: str, *, d_model: int, seg_len: int, lanes: int, layers: int, window: int, dtype: str,
                 segments: int = 1, overrides: Sequence[str] = ()) -> Config:
  """A small one-device config of any registered model, sized by the common fields (`models.config_for`).

  `overrides` are `model.FIELD=VALUE` strings; each applies to the models whose
  config has FIELD (e.g. `model.memory_size=65536` only to the Memorizing Transformer).
  """
  model_cls = get_model_class(model)
  defaults = {f.name: f.default for f in dataclasses.fields(model_cls.config_class)}
  sizes = {"d_model": d_model, "num_layers": layers, "vocab_size": 259, "window": window}
  if defaults.get("num_heads"):  # 0 = the model derives its heads (Mamba-2: expand x d_model / head_dim)
    sizes["num_heads"] = max(1, d_model // 64)
  cfg = Config(model=config_for(model, **sizes),
               data=DataConfig(batch_size=lanes, seg_len=seg_len, segments_per_step=segments),
               train=TrainConfig(steps=1000, compute_dtype=dtype), mesh=MeshConfig(data=1))
  mine = [o for o in overrides if o.split("=", 1)[0].removeprefix("model.") in defaults]
  return recipe_lib.validate(config_lib.apply_overrides(cfg, mine) if mine else cfg)


def check_overrides(models: Sequence[str], overrides: Sequence[str]) -> None:
  """Every `--set` must be `model.FIELD=VALUE` with FIELD in at least one benchmarked model's config."""
  all_fields = set()
  for m in models:
    all_fields |= {f.name for f in dataclasses.fields(get_model_class(m).config_class)}
  for o in overrides:
    key = o.split("=", 1)[0]
    if "=" not in o or not key.startswith("model.") or key.removeprefix("model.") not in all_fields:
      raise ConfigError(f"bench --set {o!r}: expected model.FIELD=VALUE with FIELD a config field of one of "
                        f"{list(models)}")


def add_ratios(results: list[BenchResult]) -> None:
  base_model = results[0].model if results else None
  for r in results:
    key = (r.kind, r.d_model, r.seg_len, r.length)
    base = next((b for b in results if b.model == base_model and (b.kind, b.d_model, b.seg_len, b.length) == key),
                None)
    r.x_base = r.tokens_per_s / base.tokens_per_s if base else float("nan")
    first = next(b for b in results if (b.kind, b.model, b.d_model, b.seg_len) == (r.kind, r.model, r.d_model,
                                                                                      r.seg_len))
    r.x_first = r.tokens_per_s / first.tokens_per_s  # NaN where either was not measured


def format_table(results: list[BenchResult], peak_flops: float) -> str:
  from longctx.eval.streaming import format_length

  lines = [f"matmul peak (measured, this process, {jax.default_backend()}): {peak_flops / 1e9:.1f} GFLOP/s"]
  for kind, title in (("train", "train step (fwd + bwd + update)"), ("stream", "streaming inference")):
    rows = [r for r in results if r.kind == kind]
    if not rows:
      continue
    head = (f"{'model':<14}{'d_model':>8}{'seg':>6}{'length':>8}{'lanes':>6}{'params':>9}{'tok/s':>11}"
            f"{'x base':>8}{'x first':>8}{'GFLOP/tok':>10}{'MFU':>7}{'temp MiB':>9}{'args MiB':>9}{'state KiB':>10}"
            f"{'RSS MiB':>9}{'peak RSS':>9}")
    lines += ["", title, head, "-" * len(head)]
    for r in rows:
      if r.error:
        lines.append(f"{r.model:<14}{r.d_model:>8}{r.seg_len:>6}{format_length(r.length):>8}{r.lanes:>6}   "
                     f"not measured: {r.error}")
        continue
      lines.append(
          f"{r.model:<14}{r.d_model:>8}{r.seg_len:>6}{format_length(r.length):>8}{r.lanes:>6}{r.params_m:>8.2f}M"
          f"{r.tokens_per_s:>11.0f}{r.x_base:>8.2f}{r.x_first:>8.2f}{r.flops_per_token / 1e9:>10.4f}"
          f"{100 * r.mfu:>6.1f}%{r.compiled_temp_mib:>9.1f}{r.compiled_args_mib:>9.1f}{r.state_kib_per_lane:>10.1f}"
          f"{r.rss_mib:>9.0f}"
          f"{r.peak_rss_mib:>9.0f}")
  return "\n".join(lines)


def _ints(spec: str, flag: str) -> list[int]:
  from longctx.eval.streaming import parse_lengths

  try:
    values = parse_lengths(spec) if spec else []
  except ConfigError as e:
    raise ConfigError(f"{flag}: {e}") from None
  if not values:
    raise ConfigError(f"{flag} needs at least one value")
  return values


def run_bench_cli(args) -> int:
  from longctx.models import list_models

  models = [m.strip() for m in args.models.split(",") if m.strip()]
  unknown = [m for m in models if m not in list_models()]
  if not models or unknown:
    raise ConfigError(f"--models {args.models!r}: {unknown or 'empty'} not in {sorted(list_models())}")
  check_overrides(models, args.set)
  d_models = _ints(args.d_models, "--d-models")
  seg_lens = _ints(args.seg_lens, "--seg-lens") if args.seg_lens else []
  stream_lengths = _ints(args.stream_lengths, "--stream-lengths") if args.stream_lengths else []
  for flag in ("steps", "layers", "window", "tokens_per_step", "stream_seg_len", "stream_lanes"):
    if getattr(args, flag) < 1:
      raise ConfigError(f"--{flag.replace('_', '-')}={getattr(args, flag)} must be >= 1")
  if args.json and not (pathlib.Path(args.json).parent.is_dir() and not pathlib.Path(args.json).is_dir()):
    raise ConfigError(f"--json {args.json!r}: its directory does not exist (or it is a directory itself); "
                      "create the directory or pass another file")
  # Every configuration is built (and validated) before anything runs: a bad one fails in a second,
  # not after the configurations before it have been measured.
  plan = []  # (model, stream config or None, [train configs])
  for model in models:
    stream_cfg = bench_config(model, d_model=d_models[0], seg_len=args.stream_seg_len, lanes=args.stream_lanes,
                              layers=args.layers, window=args.window, dtype=args.dtype,
                              overrides=args.set) if stream_lengths else None
    train_cfgs = [bench_config(model, d_model=d_model, seg_len=seg_len,
                               lanes=max(1, args.tokens_per_step // seg_len), layers=args.layers,
                               window=min(args.window, seg_len), dtype=args.dtype, overrides=args.set)
                  for d_model in d_models for seg_len in seg_lens]
    plan.append((model, stream_cfg, train_cfgs))
  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  peak = measure_matmul_peak(dtype=dtype)
  results: list[BenchResult] = []
  # One configuration that fails (most often: its step does not fit in memory) becomes a row saying so and
  # the benchmark goes on; the exit status is 1 if any did.
  for model, stream_cfg, train_cfgs in plan:
    if stream_cfg is not None:  # first, so its peak RSS is its own
      try:
        rows = bench_stream(stream_cfg, lengths=stream_lengths, peak_flops=peak, progress=not args.no_progress)
      except MEASUREMENT_ERRORS as e:
        rows = [failed_result("stream", stream_cfg, n, e) for n in sorted(stream_lengths)]
      for r in rows:
        results.append(r)
        print(f"  stream {model} d_model={r.d_model} length={r.length}: " + (
            f"not measured: {r.error}" if r.error else
            f"{r.tokens_per_s:.0f} tok/s, peak RSS {r.peak_rss_mib:.0f} MiB"), flush=True)
    for cfg in train_cfgs:
      try:
        results.append(bench_train_step(cfg, steps=args.steps, peak_flops=peak))
      except MEASUREMENT_ERRORS as e:
        results.append(failed_result("train", cfg, cfg.data.seg_len * cfg.data.segments_per_step, e))
      r = results[-1]
      print(f"  train {model} d_model={r.d_model} seg={r.seg_len}: " + (
          f"not measured: {r.error}" if r.error else f"{r.tokens_per_s:.0f} tok/s"), flush=True)
  add_ratios(results)
  print(format_table(results, peak))
  if args.json:
    finite = lambda v: None if isinstance(v, float) and math.isnan(v) else v  # JSON has no NaN
    with open(args.json, "w") as f:
      json.dump({"matmul_peak_flops": peak, "backend": jax.default_backend(),
                 "results": [{k: finite(v) for k, v in dataclasses.asdict(r).items()} for r in results]}, f, indent=2)
    print(f"wrote {args.json}")
  failed = [r for r in results if r.error]
  if failed:
    print(f"bench: {len(failed)} of {len(results)} measurements did not run (rows marked 'not measured')",
          file=sys.stderr)
  return 1 if failed else 0
