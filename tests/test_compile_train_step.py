"""A sharded train step with the Pallas kernels in it, compiled by the real TPU compiler (no TPU needed).

The kernels' own compile tests (tests/test_compile_*.py) compile each kernel alone on one chip. A train step on
a mesh adds what only a sharded program has: XLA cannot partition a Mosaic kernel ("Mosaic kernels cannot be
automatically partitioned"), so the layers run their Pallas paths in one shard_map over the whole mesh
(sharding.over_mesh), with the ring / sequence-parallel forms inside. Here the trainer's step of a tiny
attention, selective-scan and linear-recurrence model is compiled for the 4 chips of a v5p 2x2x1 slice, fsdp 2 x
sequence 2, with the kernels a TPU would pick (`compiling_for("tpu")`, as `longctx train --dry-run
--tpu-topology` does), and its lowered program checked to hold the kernels.
"""

import dataclasses

import pytest

import compile_only
from longctx import dryrun
from longctx.config import Config, DataConfig, MeshConfig, TrainConfig
from longctx.layers.kernel import compiling_for
from longctx.models import tiny_config

KERNEL_NAMES = {"transformer": "flash_attention_forward", "mamba": "selective_scan_forward", "mamba2": "linear_recurrence_forward"}


@pytest.mark.parametrize("name", sorted(KERNEL_NAMES))
def test_sharded_train_step_with_pallas_kernels_compiles_for_tpu(name):
  compile_only.tpu_device()  # fails, with the reason, where libtpu is missing
  from jax.experimental import topologies

  devices = list(topologies.get_topology_desc(platform="tpu", topology_name=compile_only.TOPOLOGY).devices)
  model = dataclasses.replace(tiny_config(name, vocab_size=256), d_model=128)
  cfg = Config(model=model, data=DataConfig(source="synthetic", seg_len=256, batch_size=4, segments_per_step=1),
               train=TrainConfig(steps=1), mesh=MeshConfig(data=1, fsdp=2, tensor=1, sequence=2))
  with compiling_for("tpu"):
    from longctx.training.trainer import Trainer

    trainer = Trainer(cfg, devices=devices)
    text = trainer._train_step.lower(trainer.abstract_train_state_sharded(),
                                     trainer.abstract_batch_sharded()).as_text()
    assert "tpu_custom_call" in text and KERNEL_NAMES[name] in text, "the step holds no Pallas kernel"
    [result] = dryrun.compile_depths(cfg, (model.num_layers,), devices=devices)
  assert result["bytes"]["temp"] > 0
