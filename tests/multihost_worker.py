"""One process of the 2-process training run in tests/test_multihost.py (and the recipe both sides train).

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/multihost_worker.py \\
        --coordinator 127.0.0.1:PORT --num-processes 2 --process-id I --run-dir DIR --out DIR/worker_I

Each process joins the run through the `longctx train` CLI (flags, or the
LONGCTX_* env vars when a flag is left out), trains to step `STOP_AT` and stops
with a checkpoint, then calls `run_training` again to resume from that
checkpoint to the end. It writes OUT.json (its lanes, losses, eval) and, on
process 0, OUT.npz with the final parameters gathered from all processes.
As a recipe file, `config()` is the tiny run that the test also trains in one
process on 8 devices.
"""

from __future__ import annotations

import argparse
import json
import sys

STOP_AT = 3


def config():
  from longctx.config import Config, DataConfig, MeshConfig, TrainConfig
  from longctx.models import TransformerConfig

  # Synthetic documents of 24-96 bytes: the held-out lanes of the two processes end after different numbers of
  # batches (11 and 10), so the final full evaluation must keep both in step.
  return Config(
      model=TransformerConfig(vocab_size=259, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, window=16),
      data=DataConfig(source="synthetic", task="passkey,mqar,copy", task_length=96, task_min_length=24,
                      num_docs=64, prompt_loss_weight=1.0, batch_size=8, seg_len=32, segments_per_step=2),
      train=TrainConfig(steps=6, learning_rate=3e-3, warmup_steps=2, log_every=1, checkpoint_every=STOP_AT,
                        eval_batches=0),
      mesh=MeshConfig(data=2, fsdp=4))


def main(argv=None) -> int:
  p = argparse.ArgumentParser()
  p.add_argument("--coordinator")
  p.add_argument("--num-processes")
  p.add_argument("--process-id")
  p.add_argument("--run-dir", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--straight", action="store_true", help="train to the end in one go (the reference run)")
  args = p.parse_args(argv)

  import jax
  import numpy as np
  from jax.experimental import multihost_utils

  from longctx import cli
  from longctx.training.loop import run_training

  flags = [f for name in ("coordinator", "num_processes", "process_id") if getattr(args, name) is not None
           for f in ("--" + name.replace("_", "-"), getattr(args, name))]
  if args.straight:
    summary = run_training(config(), args.run_dir, progress=False)
  else:
    code = cli.main(["train", __file__, "--run-dir", args.run_dir, "--no-progress", "--stop-at-step", str(STOP_AT),
                     *flags])
    if code != 0:
      return code
    summary = run_training(config(), args.run_dir, progress=False)  # resumes from step STOP_AT
  params = multihost_utils.process_allgather(summary["train_state"]["params"], tiled=True)
  result = {"process_index": jax.process_index(), "process_count": jax.process_count(),
            "local_devices": jax.local_device_count(), "lanes": list(summary["lanes"]),
            "start_step": summary["start_step"], "losses": summary["losses"], "eval": summary["eval"]}
  with open(args.out + ".json", "w") as f:
    json.dump(result, f)
  if jax.process_index() == 0:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    np.savez(args.out + ".npz", **{jax.tree_util.keystr(k): np.asarray(v) for k, v in flat})
  return 0


if __name__ == "__main__":
  sys.exit(main())
