"""The one training loop shared by every model.

A train step consumes K consecutive segments per lane (truncated BPTT):

    batch = {tokens, labels, loss_mask, segment_ids: [K, lanes, seg_len], reset: [K, lanes]}
    (model_state, losses) = lax.scan(segment_forward, model_state, batch)   # unrolled for K <= train.unroll_segments

Gradients flow through the whole K-segment window, including through the
model state carried between segments; the state leaving the step is carried
(stop-gradient) into the next step. Parameters, optimizer state, batch and
model state all have explicit `NamedSharding`s on a (data, fsdp, tensor,
sequence) mesh; the step is `jax.jit`-compiled once with the train state
donated.

The train state is a plain dict pytree:
    step         int32 []
    params       pure dict of float32 arrays (nnx.to_pure_dict of the model)
    opt_state    optax state
    model_state  the model's per-lane state, every leaf [lanes, ...]
    rng          uint32 [2] raw key data
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from longctx import recipe as recipe_lib
from longctx import sharding as shd
from longctx.config import Config
from longctx.errors import ConfigError, TrainingError
from longctx.models import SegmentLM, build_model, get_model_class
from longctx.training.optim import make_optimizer

Batch = dict[str, Any]
TrainState = dict[str, Any]

BATCH_KEYS = ("tokens", "labels", "loss_mask", "segment_ids", "reset")
METRIC_KEYS = ("loss", "bits_per_token", "grad_norm", "learning_rate", "tokens", "skipped")


def token_cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Sum of masked token cross-entropies (nats) and the number of counted tokens.

  logits `[batch, seq, vocab]` float32; labels `[batch, seq]` int; mask `[batch, seq]`.
  """
  nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  mask = mask.astype(jnp.float32)
  return jnp.sum(nll * mask), jnp.sum(mask)


def cast_floats(tree: Any, dtype) -> Any:
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


@dataclasses.dataclass
class StepFunctions:
  """Pure step functions of one model; `Trainer` jits them with shardings."""

  graphdef: Any
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  compute_dtype: Any
  remat: bool
  stop_state_gradient: bool = False  # train.state_gradient == "stop": no gradient through the carried state
  unroll_segments: int = 0  # train.unroll_segments: K up to this runs as straight-line code, above it a lax.scan
  skip_nonfinite: bool = False  # train.nan_policy == "skip": a step with a non-finite loss or gradient changes nothing

  def scan_segments(self, params, model_state, batch):
    """Run the model over the K segments of `batch`; returns (state, nll_sum, count)."""
    p = cast_floats(params, self.compute_dtype)

    def segment(state, seg):
      if self.stop_state_gradient:
        state = jax.lax.stop_gradient(state)
      model = nnx.merge(self.graphdef, p)
      logits, state = model(seg["tokens"], state, reset=seg["reset"], segment_ids=seg["segment_ids"])
      nll, count = token_cross_entropy(logits, seg["labels"], seg["loss_mask"])
      return state, (nll, count)

    if self.remat:
      segment = jax.checkpoint(segment)
    state, (nll, count) = self.over_segments(segment, model_state, batch)
    return state, jnp.sum(nll), jnp.sum(count)

  def over_segments(self, segment, state, batch):
    """`lax.scan(segment, state, batch)` over the K segments, unrolled when K <= `unroll_segments`: a scan's
    backward stacks every segment's residuals into [K, ...] buffers and reads them back (on a CPU core 21-28%
    of a K=2 step); straight-line code has none of that and compiles no slower up to K ~ 4."""
    k = jax.tree.leaves(batch)[0].shape[0]
    return jax.lax.scan(segment, state, batch, unroll=k <= self.unroll_segments)

  def train_step(self, ts: TrainState, batch: Batch, *, with_grads: bool = False):
    """(new train state, metrics), and the step's gradients (like the parameters) if `with_grads`."""
    def loss_fn(params):
      state, nll, count = self.scan_segments(params, ts["model_state"], batch)
      return nll / jnp.maximum(count, 1.0), (state, count)

    (loss, (state, count)), grads = jax.value_and_grad(loss_fn, has_aux=True)(ts["params"])
    updates, opt_state = self.tx.update(grads, ts["opt_state"], ts["params"])
    params = optax.apply_updates(ts["params"], updates)
    state = jax.lax.stop_gradient(state)
    grad_norm = optax.tree.norm(grads)
    skipped = jnp.zeros((), jnp.float32)
    if self.skip_nonfinite:  # keep parameters, optimizer and lane states as they were before this batch
      finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
      keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
      params, opt_state, state = keep(params, ts["params"]), keep(opt_state, ts["opt_state"]), keep(
          state, ts["model_state"])
      skipped = 1.0 - finite.astype(jnp.float32)
    rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(ts["rng"]))[0])
    new_ts = {"step": ts["step"] + 1, "params": params, "opt_state": opt_state, "model_state": state, "rng": rng}
    metrics = dict(zip(METRIC_KEYS, (loss, loss / math.log(2), grad_norm, self.schedule(ts["step"]), count,
                                     skipped)))
    return (new_ts, metrics, grads) if with_grads else (new_ts, metrics)

  def eval_step(self, params, model_state, batch):
    state, nll, count = self.scan_segments(params, model_state, batch)
    return state, nll, count

  def score_step(self, params, model_state, batch):
    """Per-token scores of the K segments of `batch` (the streaming evaluation step).

    Returns the new state, nll `[K, lanes, seg_len]` float32 of each label and
    correct `[K, lanes, seg_len]` bool: the label is the argmax prediction.
    """
    p = cast_floats(params, self.compute_dtype)

    def segment(state, seg):
      model = nnx.merge(self.graphdef, p)
      logits, state = model(seg["tokens"], state, reset=seg["reset"], segment_ids=seg["segment_ids"])
      logits = logits.astype(jnp.float32)
      nll = optax.softmax_cross_entropy_with_integer_labels(logits, seg["labels"])
      return state, (nll, jnp.argmax(logits, axis=-1) == seg["labels"])

    state, (nll, correct) = self.over_segments(segment, model_state, batch)
    return state, nll, correct


class MeshJit:
  """A jitted function traced, lowered and run under `jax.set_mesh(mesh)`.

  Layers with a context-parallel form (ring attention, the sequence-parallel
  recurrence) read the mesh's `sequence` axis at trace time from that context.
  """

  def __init__(self, fn, mesh: Mesh):
    self.fn, self.mesh = fn, mesh

  def __call__(self, *args):
    with jax.set_mesh(self.mesh):
      return self.fn(*args)

  def lower(self, *args):
    with jax.set_mesh(self.mesh):
      return self.fn.lower(*args)


class Trainer:
  """Builds the mesh, shardings and compiled steps for one config.

  Usage:
      trainer = Trainer(cfg)
      ts = trainer.init_train_state()
      ts, metrics = trainer.train_step(ts, trainer.put_batch(np_batch))
  """

  def __init__(self, cfg: Config, *, devices=None):
    self.cfg = recipe_lib.validate(cfg)
    self.mesh: Mesh = shd.make_mesh(cfg.mesh, devices)
    self.model_class = get_model_class(cfg.model.name)
    recipe_lib.check_layout(cfg, self.mesh.shape)  # lanes over data shards, segments over sequence and blocks
    abstract_model = nnx.eval_shape(lambda: build_model(cfg.model, rngs=nnx.Rngs(0)))
    graphdef, abstract_params = nnx.split(abstract_model)
    self.graphdef = graphdef
    self.param_shardings = shd.param_shardings(abstract_params, self.mesh)
    self.num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.to_pure_dict(abstract_params)))
    tx, schedule = make_optimizer(cfg.train)
    dtype = jnp.bfloat16 if cfg.train.compute_dtype == "bfloat16" else jnp.float32
    self.fns = StepFunctions(graphdef=graphdef, tx=tx, schedule=schedule, compute_dtype=dtype,
                             remat=cfg.train.remat, stop_state_gradient=cfg.train.state_gradient == "stop",
                             unroll_segments=cfg.train.unroll_segments, skip_nonfinite=cfg.train.nan_policy == "skip")

    self.abstract_train_state = jax.eval_shape(self._init_fn)
    self.train_state_shardings = self._train_state_shardings(self.abstract_train_state)
    self.model_state_shardings = self.train_state_shardings["model_state"]
    example = self.abstract_batch()
    self.batch_shardings = {k: NamedSharding(self.mesh, self._batch_spec(k)) for k in example}
    rep = NamedSharding(self.mesh, P())
    metric_shardings = {k: rep for k in METRIC_KEYS}
    self._train_step = self._jit(
        self.fns.train_step, in_shardings=(self.train_state_shardings, self.batch_shardings),
        out_shardings=(self.train_state_shardings, metric_shardings), donate_argnums=(0,))
    self._eval_step = self._jit(
        self.fns.eval_step,
        in_shardings=(self.param_shardings, self.model_state_shardings, self.batch_shardings),
        out_shardings=(self.model_state_shardings, rep, rep), donate_argnums=(1,))
    token_sharding = self.batch_shardings["tokens"]
    self._score_step = self._jit(
        self.fns.score_step,
        in_shardings=(self.param_shardings, self.model_state_shardings, self.batch_shardings),
        out_shardings=(self.model_state_shardings, token_sharding, token_sharding), donate_argnums=(1,))
    self._train_step_with_grads = None  # compiled on first use (`train_step_with_grads`)
    self._init = self._jit(self._init_fn, out_shardings=self.train_state_shardings)
    # init_state needs no weights (a contract of SegmentLM), so the abstract model can build it.
    self._init_model_state = self._jit(lambda: abstract_model.init_state(self.cfg.data.batch_size),
                                       out_shardings=self.model_state_shardings)

  # ------------------------------------------------------------------ construction

  def _jit(self, fn, **kwargs):
    return MeshJit(jax.jit(fn, **kwargs), self.mesh)

  def _init_fn(self):
    cfg = self.cfg
    model: SegmentLM = build_model(cfg.model, rngs=nnx.Rngs(cfg.train.seed))
    params = nnx.to_pure_dict(nnx.state(model))
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": self.fns.tx.init(params),
        "model_state": model.init_state(cfg.data.batch_size),
        "rng": jax.random.key_data(jax.random.key(cfg.train.seed + 1)),
    }

  def _train_state_shardings(self, abstract_ts):
    rep = NamedSharding(self.mesh, P())
    opt = optax.tree_map_params(self.fns.tx, lambda _, s: s, abstract_ts["opt_state"], self.param_shardings,
                                transform_non_params=lambda _: rep)
    return {"step": rep, "params": self.param_shardings, "opt_state": opt,
            "model_state": shd.lane_shardings(abstract_ts["model_state"], self.mesh), "rng": rep}

  def _batch_spec(self, key: str) -> P:
    seq = "sequence" if self.mesh.shape["sequence"] > 1 else None
    return P(None, shd.BATCH_AXES) if key == "reset" else P(None, shd.BATCH_AXES, seq)

  def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
    d = self.cfg.data
    shape = (d.segments_per_step, d.batch_size, d.seg_len)
    return {"tokens": jax.ShapeDtypeStruct(shape, jnp.int32), "labels": jax.ShapeDtypeStruct(shape, jnp.int32),
            "loss_mask": jax.ShapeDtypeStruct(shape, jnp.float32),
            "segment_ids": jax.ShapeDtypeStruct(shape, jnp.int32),
            "reset": jax.ShapeDtypeStruct(shape[:2], jnp.bool_)}

  def local_lane_range(self) -> tuple[int, int]:
    """Lanes (batch rows) whose data this process must provide."""
    sharding = self.batch_shardings["reset"]
    shape = (self.cfg.data.segments_per_step, self.cfg.data.batch_size)
    rows = [idx[1] for idx in sharding.addressable_devices_indices_map(shape).values()]
    starts = [r.start or 0 for r in rows]
    stops = [shape[1] if r.stop is None else r.stop for r in rows]
    held = set().union(*(range(a, b) for a, b in zip(starts, stops)))
    if held != set(range(min(starts), max(stops))):  # a LaneBatcher reads one range of lanes
      raise ConfigError(f"this process's devices hold lanes {sorted(held)}, not one contiguous range; "
                        "order the mesh so that each host's devices are adjacent along (data, fsdp)")
    return min(starts), max(stops)

  # ------------------------------------------------------------------ steps

  def init_train_state(self) -> TrainState:
    return self._init()

  def init_model_state(self):
    return self._init_model_state()

  def put_batch(self, batch: dict[str, np.ndarray]) -> Batch:
    """Global sharded arrays from this process's lanes of a numpy batch."""
    expected = self.abstract_batch()
    lo, hi = self.local_lane_range()
    out = {}
    for k in BATCH_KEYS:
      if k not in batch:
        raise ConfigError(f"batch is missing {k!r}; a batch needs {BATCH_KEYS}")
      arr = np.asarray(batch[k], dtype=expected[k].dtype)
      local_shape = (expected[k].shape[0], hi - lo, *expected[k].shape[2:])
      if arr.shape != local_shape:
        raise ConfigError(f"batch[{k!r}] has shape {arr.shape}, expected {local_shape} "
                          "(segments_per_step, local lanes, seg_len)")
      out[k] = jax.make_array_from_process_local_data(self.batch_shardings[k], arr, expected[k].shape)
    return out

  def train_step(self, ts: TrainState, batch: Batch) -> tuple[TrainState, dict]:
    return self._train_step(ts, batch)

  def train_step_with_grads(self, ts: TrainState, batch: Batch) -> tuple[TrainState, dict, Any]:
    """`train_step` that also returns the step's gradients, sharded like the parameters (compiled on first
    use). For comparing layouts: Adam and global-norm clipping are blind to a uniform gradient scale, so
    equal parameters after an update do not prove equal gradients."""
    if self._train_step_with_grads is None:
      metric_shardings = {k: NamedSharding(self.mesh, P()) for k in METRIC_KEYS}
      self._train_step_with_grads = self._jit(
          functools.partial(self.fns.train_step, with_grads=True),
          in_shardings=(self.train_state_shardings, self.batch_shardings),
          out_shardings=(self.train_state_shardings, metric_shardings, self.param_shardings), donate_argnums=(0,))
    return self._train_step_with_grads(ts, batch)

  def evaluate(self, params, batches: Iterable[dict[str, np.ndarray]], *, max_batches: int = 0,
               progress: Callable[[Iterator], Iterator] | None = None) -> dict[str, float]:
    """Stream held-out documents (lanes reset at each document) and average the loss."""
    state = self.init_model_state()
    nll_total, count_total, n = 0.0, 0.0, 0
    it = iter(batches)
    if progress is not None:
      it = progress(it)
    for batch in it:
      state, nll, count = self._eval_step(params, state, self.put_batch(batch))
      nll_total += float(nll)
      count_total += float(count)
      n += 1
      if max_batches and n >= max_batches:
        break
    if count_total == 0:
      raise TrainingError("evaluation saw no target tokens; the held-out set is empty or fully masked")
    loss = nll_total / count_total
    return {"loss": loss, "bits_per_token": loss / math.log(2), "perplexity": math.exp(min(loss, 50.0)),
            "tokens": count_total, "batches": n}  # tokens: the summed loss weight (targets counted)

  def score_step(self, params, model_state, batch: Batch):
    """(state, nll, correct) of one batch; see `StepFunctions.score_step`."""
    return self._score_step(params, model_state, batch)

  def compiled_train_step(self):
    """AOT-compiled train step (for memory analysis and benchmarks)."""
    return self._train_step.lower(self.abstract_train_state_sharded(), self.abstract_batch_sharded()).compile()

  def compiled_score_step(self):
    """AOT-compiled streaming step (for memory analysis and benchmarks)."""
    ts = self.abstract_train_state_sharded()
    return self._score_step.lower(ts["params"], ts["model_state"], self.abstract_batch_sharded()).compile()

  def abstract_train_state_sharded(self):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        self.abstract_train_state, self.train_state_shardings)

  def abstract_batch_sharded(self):
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self.batch_shardings[k])
            for k, v in self.abstract_batch().items()}


