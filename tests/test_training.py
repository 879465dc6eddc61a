"""The shared training loop: sharded == unsharded, exact resume, quickstart end to end."""


import jax
import numpy as np
import pytest

from conftest import rel_err
from longctx import config as config_lib
from longctx.config import Config, DataConfig, MeshConfig, TrainConfig
from longctx.models import TransformerConfig
from longctx.training.loop import run_training
from longctx.training.metrics import read_metrics
from longctx.training.trainer import Trainer


def tiny_config(**train) -> Config:
  return Config(
      model=TransformerConfig(vocab_size=259, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, window=16),
      data=DataConfig(source="stdlib", num_docs=64, batch_size=8, seg_len=32,
                      segments_per_step=2),
      train=TrainConfig(**{"steps": 6, "learning_rate": 3e-3, "warmup_steps": 2, "log_every": 1,
                           "checkpoint_every": 3, "eval_batches": 2, "async_checkpoint": False, **train}),
      mesh=MeshConfig(data=-1))


def real_batches(cfg, n):
  from longctx.training.loop import build_pipeline

  pipeline = build_pipeline(cfg)
  from longctx.data.lanes import LaneBatcher

  d = cfg.data
  lanes = LaneBatcher(pipeline.train_source, num_lanes=d.batch_size, seg_len=d.seg_len,
                      segments_per_step=d.segments_per_step, pad_id=pipeline.tokenizer.pad_id)
  return [next(lanes) for _ in range(n)]


def test_sharded_loss_and_update_match_one_device(eight_devices):
  """data 2 x fsdp 2 x tensor 2 against 1 device: losses, grad norms, every gradient leaf of three real
  steps, then parameters and carried state (model_contract.sharded_matches_one_device, which records the
  gradient-scale mutation it catches)."""
  import model_contract as contract

  cfg = tiny_config().model
  results = contract.sharded_matches_one_device(cfg, eight_devices, seg_len=32)
  trainer = results["8-trainer"]  # really sharded: a weight split over fsdp x tensor, lanes over data x fsdp
  assert trainer.param_shardings["blocks"][0]["mlp"]["gate"].spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert trainer.model_state_shardings["blocks"][0]["k"].spec[0] == ("data", "fsdp")


def test_resume_is_exact(tmp_path):
  cfg = tiny_config()
  straight = run_training(cfg, tmp_path / "straight", progress=False, log=lambda *_: None)
  first = run_training(tiny_config(), tmp_path / "resumed", stop_at_step=3, progress=False, log=lambda *_: None)
  assert first["end_step"] == 3 and len(first["losses"]) == 3
  messages = []
  second = run_training(tiny_config(), tmp_path / "resumed", progress=False, log=messages.append)
  assert second["start_step"] == 3 and any("resumed from" in m for m in messages)
  assert straight["losses"] == first["losses"] + second["losses"]  # bitwise on CPU
  for a, b in zip(jax.tree.leaves(jax.device_get(straight["train_state"])),
                  jax.tree.leaves(jax.device_get(second["train_state"]))):
    np.testing.assert_array_equal(a, b)
  # Logs: JSONL with every metric, TensorBoard events, a loss plot, eval at the end.
  records = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
  train = [r for r in records if r["split"] == "train"]
  assert [r["step"] for r in train] == list(range(1, 7))
  assert {"loss", "bits_per_token", "grad_norm", "learning_rate"} <= set(train[0])
  # A process's first step includes compiling: no throughput is logged for it (steps 1 and 4, the resume).
  assert [s["step"] for s in train if "tokens_per_s" not in s] == [1, 4]
  assert any(r["split"] == "eval" for r in records)
  assert list((tmp_path / "resumed" / "tensorboard").glob("events.out.tfevents.*"))
  assert (tmp_path / "resumed" / "loss.png").stat().st_size > 1000


def test_resume_refuses_a_different_model(tmp_path):
  from longctx.errors import CheckpointError

  run_training(tiny_config(steps=1, checkpoint_every=1), tmp_path, progress=False, log=lambda *_: None)
  other = tiny_config(steps=2)
  other.model.d_model = 64
  with pytest.raises(CheckpointError, match=r"trained with another model than this recipe.s \(model.d_model 32 -> 64\); use a new --run-dir"):
    run_training(other, tmp_path, progress=False, log=lambda *_: None)


def test_bf16_remat_step_runs_and_learns(tmp_path):
  cfg = tiny_config(steps=8, compute_dtype="bfloat16", remat=True, learning_rate=1e-2)
  out = run_training(cfg, tmp_path, progress=False, log=lambda *_: None)
  assert all(np.isfinite(out["losses"])) and out["losses"][-1] < out["losses"][0]


def _one_device_step(cfg, batch):
  """(metrics, gradients, lane states) of one train step on one device from the initial train state."""
  trainer = Trainer(cfg, devices=jax.devices()[:1])
  ts, metrics, grads = trainer.train_step_with_grads(trainer.init_train_state(), trainer.put_batch(batch))
  return jax.device_get((metrics, grads, ts["model_state"])), trainer


def test_unrolled_and_scanned_segment_loops_agree():
  """K=3 segments as straight-line code (train.unroll_segments >= K) and as a lax.scan (0): same loss,
  gradients and carried state."""
  cfg = lambda unroll: config_lib.apply_overrides(tiny_config(unroll_segments=unroll), ["data.segments_per_step=3"])
  batch = real_batches(cfg(0), 1)[0]
  (m_scan, g_scan, s_scan), _ = _one_device_step(cfg(0), batch)
  (m_unrolled, g_unrolled, s_unrolled), _ = _one_device_step(cfg(4), batch)
  assert abs(m_scan["loss"] - m_unrolled["loss"]) <= 1e-6 * abs(m_scan["loss"])
  for a, b in zip(jax.tree.leaves(g_scan) + jax.tree.leaves(s_scan), jax.tree.leaves(g_unrolled) +
                  jax.tree.leaves(s_unrolled)):
    assert rel_err(a, b) < 1e-5


def test_state_gradient_stop_is_the_sum_of_per_segment_gradients():
  """train.state_gradient="stop": the step's gradient is that of each segment's loss with its incoming state
  a constant (Transformer-XL's SG); "carry" backpropagates through the state and differs."""
  import jax.numpy as jnp

  cfg = tiny_config(state_gradient="stop")
  batch = real_batches(cfg, 1)[0]
  (_, grads, _), trainer = _one_device_step(cfg, batch)
  fns, ts, put = trainer.fns, trainer.init_train_state(), trainer.put_batch(batch)

  def nll(params, state, segment):
    new_state, value, count = fns.scan_segments(params, state, segment)
    return value, (new_state, count)

  grad = jax.jit(jax.grad(nll, has_aux=True))  # one compile for both segments
  state, total_grad, total_count = ts["model_state"], None, 0.0
  for i in range(2):
    g, (state, count) = grad(ts["params"], state, {k: v[i:i + 1] for k, v in put.items()})
    total_grad = g if total_grad is None else jax.tree.map(jnp.add, total_grad, g)
    total_count += float(count)
  expected = jax.tree.map(lambda x: x / total_count, total_grad)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
    assert rel_err(a, b) < 1e-5
  (_, carried, _), _ = _one_device_step(tiny_config(), batch)
  assert rel_err(carried["blocks"][0]["mixer"]["wk"], grads["blocks"][0]["mixer"]["wk"]) > 1e-3
