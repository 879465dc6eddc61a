"""Context parallelism: the `sequence` mesh axis shards each segment across devices.

For every model with a context-parallel form, two train steps on a mesh with
sequence > 1 give the same losses, updated parameters and carried state as one
device, and the compiled step really runs the sharded form (its collectives
are in the HLO), not XLA gathering the segment onto every device.
"""

import jax
import pytest

import model_contract as contract
from longctx.config import MeshConfig
from longctx.models import TransformerConfig


_runs_sharded_form = contract.runs_context_parallel_form


@pytest.mark.parametrize("window,seq_devices", [(20, 4), (12, 8)], ids=["4-shards-full-ring", "8-shards-cut-ring"])
def test_transformer_ring_matches_one_device(window, seq_devices, eight_devices):
  """Segments of 32: over 4 devices (8 tokens each) a window of 20 needs all 4 ring steps; over 8 devices
  (4 tokens each) a window of 12 needs 4 of the 8."""
  cfg = TransformerConfig(vocab_size=259, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, window=window,
                          attention_block=4)
  mesh = MeshConfig(data=8 // seq_devices, sequence=seq_devices)
  results = contract.sharded_matches_one_device(cfg, eight_devices, seg_len=32, mesh=mesh)
  assert _runs_sharded_form(results["8-trainer"])


def test_memorizing_local_attention_runs_the_ring(eight_devices):
  from longctx.models import MemorizingConfig

  cfg = MemorizingConfig(vocab_size=259, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, window=8,
                         block_len=16, memory_size=40, top_k=4, attention_block=4)
  results = contract.sharded_matches_one_device(cfg, eight_devices, seg_len=32, align=16,
                                                mesh=MeshConfig(data=2, sequence=4))
  assert _runs_sharded_form(results["8-trainer"])


def _recurrent_configs():
  from longctx.models import Mamba2Config, MambaConfig, RetNetConfig

  return {
      "retnet": RetNetConfig(vocab_size=259, d_model=32, num_layers=2, num_heads=4, chunk_size=4),
      "mamba2": Mamba2Config(vocab_size=259, d_model=32, num_layers=2, head_dim=16, state_size=8, chunk_size=4),
      "mamba": MambaConfig(vocab_size=259, d_model=32, num_layers=2, state_size=8, chunk_size=4),
  }


@pytest.mark.parametrize("name", ["retnet", "mamba2", "mamba"])
def test_linear_recurrence_models_run_sequence_parallel(name, eight_devices):
  """Segments of 32 over 4 devices, with documents starting inside segments (real lanes)."""
  results = contract.sharded_matches_one_device(_recurrent_configs()[name], eight_devices, seg_len=32,
                                                mesh=MeshConfig(data=2, sequence=4))
  assert _runs_sharded_form(results["8-trainer"])


def test_rmt_block_tokens_run_the_ring(eight_devices):
  """Blocks of 16 over 4 devices: 4 tokens each, a window of 6 (3 of 4 ring steps), 4 memory slots."""
  from longctx.models import RMTConfig

  cfg = RMTConfig(vocab_size=259, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, window=6, block_len=16,
                  num_memory=4, attention_block=4)
  results = contract.sharded_matches_one_device(cfg, eight_devices, seg_len=32, align=16,
                                                mesh=MeshConfig(data=2, sequence=4))
  assert _runs_sharded_form(results["8-trainer"])
