"""Per-device memory of the compiled train step on a recipe's target mesh (`longctx train --dry-run`).

`estimate.py` is the paper estimate; this module compiles the real train step
(`Trainer.compiled_train_step()`, the program training runs) for the recipe's
mesh and reads the compiler's buffer assignment (`compiled.memory_analysis()`).

Where the compile happens:
  * `tpu_topology="v5p:4x4x4"` (`--tpu-topology`): the TPU compiler, compile-only,
    on any host with libtpu installed (`pip install "jax[tpu]"`; no TPU needed):
    `jax.experimental.topologies` describes the slice's chips and the step is
    compiled for them. These are the TPU's own numbers.
  * jax already sees exactly the mesh's device count (a host with that many
    chips, or tests with virtual CPU devices): in this process, on that backend.
  * otherwise (a 64-chip pod mesh on a laptop): a subprocess on the CPU backend
    with `XLA_FLAGS=--xla_force_host_platform_device_count=N`, a flag jax reads
    only when it starts. The same sharded program, compiled by XLA:CPU: sizes
    of arguments (params, optimizer state, model state, batch shards) are
    exact; temporaries are larger than on TPU (no native bf16 math, other
    fusion; e.g. 19.3 vs 9.4 GiB for a 2-layer copy of recipes/pod/transformer.py).

Depth: compiling a 24-layer model for 64 devices takes tens of seconds (minutes
with the TPU compiler) on a small host, and per-device memory grows by the same
amount with each layer once there are enough of them. How many is enough
varies (measured on XLA:CPU: the Transformer from 2 layers, Block-Recurrent
from 5, Memorizing from 6; below that layers add less, and extrapolating from
5 and 6 layers put Memorizing 22% low). So by default the step is compiled at 6
and 8 ordinary layers and every figure is extrapolated linearly to the
recipe's depth; `full=True` compiles the recipe as it is. Layers that differ
from the others (those the model config names in `layer_lists` / `layer_indices`,
e.g. `knn_layers`; where they sit changed temporaries by under 2%) are kept in
both reduced copies, so the difference is two ordinary layers.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import time

from longctx import config as config_lib
from longctx import recipe as recipe_lib
from longctx.config import Config, ModelConfig
from longctx.errors import ConfigError, LongctxError
from longctx.layers.kernel import compiling_for

FIELDS = ("argument", "output", "alias", "temp", "generated_code")
REDUCED = (6, 8)  # ordinary layers in the two reduced copies
# XLA:CPU flags that skip LLVM optimisation: the buffer assignment (all we read) is unchanged, compiles ~2x faster.
FAST_CPU_FLAGS = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


@dataclasses.dataclass
class CompiledMemory:
  """Per-device bytes of the compiled train step at the recipe's depth."""

  backend: str  # "cpu", "tpu", "gpu"
  where: str  # which compiler and devices, in words
  num_devices: int
  num_layers: int  # the recipe's depth
  compiled_layers: tuple[int, ...]  # depths compiled: (num_layers,) or two reduced depths
  bytes: dict[str, float]  # FIELDS -> per-device bytes (extrapolated if compiled_layers are reduced)
  compile_seconds: tuple[float, ...]

  @property
  def extrapolated(self) -> bool:
    return self.compiled_layers != (self.num_layers,)

  @property
  def total(self) -> float:
    """Live at once: arguments + outputs not aliased to (donated) arguments + temporaries + code."""
    b = self.bytes
    return b["argument"] + b["output"] - b["alias"] + b["temp"] + b["generated_code"]

  def lines(self) -> list[str]:
    gib = lambda x: f"{x / 2**30:.3f} GiB"
    b = self.bytes
    out = [f"per-device memory (compiled train step, {self.where}):"]
    if self.extrapolated:
      a, c = self.compiled_layers
      out.append(f"  extrapolated linearly from compiles at {a} and {c} layers to {self.num_layers} "
                 "(--full-compile compiles every layer)")
    out += [
        f"  arguments        {gib(b['argument'])}  (params, optimizer and model state, batch)",
        f"  outputs          {gib(b['output'])}  ({gib(b['alias'])} of it reuses the donated arguments)",
        f"  temporaries      {gib(b['temp'])}",
        f"  generated code   {gib(b['generated_code'])}",
        f"  total            {gib(self.total)}  (arguments + outputs - reused + temporaries + code)",
        "  compiled in " + ", ".join(f"{s:.1f} s ({n} layers)" for n, s in zip(self.compiled_layers,
                                                                             self.compile_seconds)),
    ]
    if self.backend == "cpu":
      out.append("  note: XLA:CPU's buffer assignment: arguments carry over to TPU/GPU, temporaries there are smaller "
                 "(native bf16, other fusion); --tpu-topology compiles with the TPU compiler")
    return out


# ----------------------------------------------------------------------------- reduced depth


def special_layers(model: ModelConfig) -> tuple[int, ...]:
  """Indices (sorted, non-negative) of the layers that differ from the ordinary ones."""
  n = model.num_layers
  found = set()
  for name in model.layer_lists:
    found.update(i % n for i in getattr(model, name) or ())
  for name in model.layer_indices:
    resolved = getattr(model, f"resolved_{name}")
    if resolved is not None:
      found.add(resolved)
  return tuple(sorted(found))


def reduced_model(model: ModelConfig, ordinary: int) -> ModelConfig:
  """A copy of `model` with `ordinary` ordinary layers and every special layer.

  A special layer keeps its place relative to the ordinary layers, up to the
  reduced depth: one after 17 ordinary layers sits after all `ordinary` of them.
  """
  special = special_layers(model)
  placed = {i: min(i - k, ordinary) + k for k, i in enumerate(special)}  # i - k ordinary layers come before it
  changes = {"num_layers": ordinary + len(special)}
  n = model.num_layers
  for name in model.layer_lists:
    if getattr(model, name):
      changes[name] = [placed[i % n] for i in getattr(model, name)]
  for name in model.layer_indices:
    if getattr(model, f"resolved_{name}") is not None:
      changes[name] = placed[getattr(model, f"resolved_{name}")]
  return dataclasses.replace(model, **changes)


def pattern_period(model: ModelConfig) -> int:
  """The length of the shortest unit the layer pattern repeats (Griffin's recurrent, recurrent, attention: 3)."""
  pattern = model.layer_pattern()
  return next(p for p in range(1, len(pattern) + 1) if all(m == pattern[i % p] for i, m in enumerate(pattern)))


def depth_plan(model: ModelConfig, *, full: bool) -> tuple[int, ...]:
  """Ordinary-layer counts to compile: the recipe's own, or the two reduced depths, each a whole number of
  the layer pattern's repeating units (so the line through them has every kind of layer in its share)."""
  ordinary = model.num_layers - len(special_layers(model))
  period = 1 if special_layers(model) else pattern_period(model)
  low, high = (-(-n // period) * period for n in REDUCED)
  reduced = (low, high if high > low else low + period)
  if full or ordinary <= reduced[-1]:
    return (ordinary,)
  return reduced


# ----------------------------------------------------------------------------- compiling


def compile_depths(cfg: Config, ordinary: tuple[int, ...], *, devices=None) -> list[dict]:
  """Compile the train step at each ordinary-layer count; per-device bytes and seconds of each."""
  from longctx.training.trainer import Trainer

  results = []
  for n in ordinary:
    model = reduced_model(cfg.model, n)
    sub = dataclasses.replace(cfg, model=model)
    start = time.perf_counter()
    trainer = Trainer(sub, devices=devices)
    stats = trainer.compiled_train_step().memory_analysis()
    seconds = time.perf_counter() - start
    if stats is None:
      raise LongctxError(f"the {sub.model.name} train step compiled, but this backend reports no memory analysis")
    results.append({"num_layers": model.num_layers, "seconds": seconds,
                    "bytes": {f: float(getattr(stats, f"{f}_size_in_bytes")) for f in FIELDS}})
  return results


def extrapolate(results: list[dict], num_layers: int) -> dict[str, float]:
  """Bytes at `num_layers`: the one result, or the line through two results at different depths."""
  if len(results) == 1:
    return dict(results[0]["bytes"])
  (a, b) = results
  per_layer = {f: (b["bytes"][f] - a["bytes"][f]) / (b["num_layers"] - a["num_layers"]) for f in FIELDS}
  return {f: a["bytes"][f] + (num_layers - a["num_layers"]) * per_layer[f] for f in FIELDS}


def compiled_memory(cfg: Config, *, num_devices: int, full: bool = False,
                    tpu_topology: str | None = None) -> CompiledMemory:
  """Compile `cfg`'s train step for its `num_devices`-device mesh and read per-device memory.

  With `tpu_topology` (e.g. "v5p:4x4x4"): the TPU compiler for that slice, in
  a subprocess. Otherwise in this process when jax sees exactly `num_devices`
  devices, else in a CPU subprocess with that many virtual devices.
  """
  import jax

  ordinary = depth_plan(cfg.model, full=full)
  if tpu_topology:
    results, where = _compile_in_subprocess(cfg, ordinary, num_devices, tpu_topology=tpu_topology)
    backend = "tpu"
  elif jax.process_count() == 1 and jax.device_count() == num_devices:
    results = compile_depths(cfg, ordinary)
    backend = jax.default_backend()
    where = f"{num_devices} {jax.devices()[0].device_kind} devices of this host"
  else:
    results, where = _compile_in_subprocess(cfg, ordinary, num_devices)
    backend = "cpu"
  return CompiledMemory(backend=backend, where=where, num_devices=num_devices, num_layers=cfg.model.num_layers,
                        compiled_layers=tuple(r["num_layers"] for r in results),
                        bytes=extrapolate(results, cfg.model.num_layers),
                        compile_seconds=tuple(r["seconds"] for r in results))


def subprocess_env(num_devices: int, *, fast_cpu: bool = True) -> dict[str, str]:
  """This environment, on the CPU backend with `num_devices` virtual devices (and unoptimised CPU codegen)."""
  env = dict(os.environ)
  flags = re.sub(rf"{DEVICE_COUNT_FLAG}=\S+", "", env.get("XLA_FLAGS", "")).split()
  env["XLA_FLAGS"] = " ".join([*flags, f"{DEVICE_COUNT_FLAG}={num_devices}", *(FAST_CPU_FLAGS if fast_cpu else ())])
  env["JAX_PLATFORMS"] = "cpu"
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  return env


def _compile_in_subprocess(cfg: Config, ordinary: tuple[int, ...], num_devices: int, *,
                           tpu_topology: str | None = None) -> tuple[list[dict], str]:
  request = json.dumps({"config": config_lib.to_dict(cfg), "ordinary": list(ordinary), "tpu_topology": tpu_topology})
  env = subprocess_env(1, fast_cpu=False) if tpu_topology else subprocess_env(num_devices)
  if tpu_topology:  # compile-only: libtpu opens no TPU, so another process holding its lock file does no harm
    env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
  proc = subprocess.run([sys.executable, "-m", "longctx.dryrun", "--devices", str(num_devices)], input=request,
                        capture_output=True, text=True, env=env)
  if proc.returncode == 0:
    reply = json.loads(proc.stdout.strip().splitlines()[-1])
    return reply["results"], reply["where"]
  lines = proc.stderr.splitlines()
  errors = [l[len("error: "):] for l in lines if l.startswith("error: ")]
  if errors:  # a LongctxError in the child (e.g. lanes or seg_len vs the mesh): its own one-line message
    raise ConfigError(errors[-1])
  failed = [l[len("failed: "):] for l in lines if l.startswith("failed: ")]
  tail = failed[-1] if failed else next((l.strip() for l in reversed(lines) if l.strip()),
                                        f"exit code {proc.returncode}")
  what = f"TPU topology {tpu_topology}" if tpu_topology else f"{num_devices} virtual CPU devices"
  raise LongctxError(f"compiling the train step for {what} failed: {tail[:300]} (--no-compile skips this part)")


def tpu_devices(topology: str, num_devices: int) -> list:
  """The chips of a TPU slice, compile-only (needs libtpu, not a TPU), e.g. "v5p:4x4x4" = a v5p-128."""
  from jax.experimental import topologies

  try:
    devices = list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
  except Exception as e:  # no libtpu, or a name it does not know
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    raise ConfigError(f"--tpu-topology {topology}: the TPU compiler could not describe it ({first}); it needs "
                      "libtpu (pip install \"jax[tpu]\") and a name like v5p:4x4x4 (v5p-128) or v4:2x2x2") from None
  if len(devices) != num_devices:
    raise ConfigError(f"--tpu-topology {topology} has {len(devices)} chips but the recipe's mesh needs {num_devices}")
  return devices


def _main(argv: list[str] | None = None) -> int:
  """Subprocess entry point: a request as JSON on stdin, {"results", "where"} as one JSON line on stdout."""
  import jax

  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--devices", type=int, required=True)
  args = p.parse_args(argv)
  request = json.loads(sys.stdin.read())
  try:
    topology = request.get("tpu_topology")
    if topology:
      devices = tpu_devices(topology, args.devices)
      where = f"TPU compiler, compile-only, {topology} = {len(devices)} x {devices[0].device_kind}"
    else:
      if jax.device_count() != args.devices:
        raise LongctxError(f"expected {args.devices} virtual devices, jax sees {jax.device_count()} "
                           f"({DEVICE_COUNT_FLAG} must be set before jax starts)")
      devices = None
      where = f"XLA:CPU, {args.devices} virtual host devices as the mesh"
    cfg = recipe_lib.validate(recipe_lib.from_dict(request["config"]))
    with compiling_for("tpu") if topology else contextlib.nullcontext():  # a TPU's kernels, e.g. Pallas
      results = compile_depths(cfg, tuple(request["ordinary"]), devices=devices)
  except LongctxError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except Exception as e:  # an XLA failure: its first line, and no teardown (XLA may abort on exit after one)
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    print(f"failed: {type(e).__name__}: {first}", file=sys.stderr, flush=True)
    os._exit(3)
  print(json.dumps({"results": results, "where": where}))
  return 0


if __name__ == "__main__":
  sys.exit(_main())
