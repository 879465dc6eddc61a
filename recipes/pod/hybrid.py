"""Pod scale: a hybrid stack, three Mamba-2 layers to one windowed-attention layer (Jamba's ratio), 1.16B
parameters, on a TPU v5p-128 slice.

Chip: TPU v5p-128 (64 chips, 95 GiB HBM each). Mesh: fsdp=16 x sequence=4 (context parallel: each
8K-token segment is split over 4 chips; Mamba-2 layers exchange their shards' state transitions, attention
layers pass key blocks round a ring). 16 lanes x 16 segments of 8,192 tokens = 2M tokens per step.
32 layers (24 Mamba-2, 8 attention with the gated MLP), d_model 2048, Mamba-2 heads of 64 with state 128
in 128-token chunks, 16 attention heads over a 4096-token window; shared settings in `_pod.py`.
The run dir can be gs://BUCKET/...: launch_tpu_pod.sh mounts the bucket on every worker (gcsfuse), since
`longctx train` writes through the local filesystem.

    longctx train recipes/pod/hybrid.py --dry-run   # estimate + compiled per-device memory
    scripts/launch_tpu_pod.sh TPU ZONE PROJECT recipes/pod/hybrid.py gs://BUCKET/pod/hybrid
    sbatch -N 8 --gpus-per-node=8 scripts/launch_slurm.sh recipes/pod/hybrid.py /shared/pod/hybrid
"""

from _pod import BACKBONE, CONTEXT_PARALLEL, pod_data, pod_train

from longctx.config import Config
from longctx.models import HybridConfig


def config() -> Config:
  return Config(model=HybridConfig(**{**BACKBONE, "num_layers": 32}, layers="mamba2,mamba2,mamba2,transformer",
                                   window=4096, settings=["mamba2.head_dim=64", "mamba2.state_size=128",
                                                          "mamba2.chunk_size=128"]),
                data=pod_data(lanes=16, seg_len=8192), train=pod_train(), mesh=CONTEXT_PARALLEL)
