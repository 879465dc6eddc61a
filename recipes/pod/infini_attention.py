"""Pod scale: Infini-attention, 1024-token blocks + a compressive memory per layer and head, on a TPU v5p-128.

Chip: TPU v5p-128 (64 chips, 95 GiB HBM each). Mesh: data=4 x fsdp=16 (whole segments per chip: the
memory passes from block to block). 64 lanes x 8 segments of 4,096 tokens = 2M tokens per step.
24 layers, d_model 2048, 16 heads, 1K blocks (the paper's 2K take 1.7x the memory), linear memory update
(`--set model.memory_update=delta` for the delta rule); shared settings in `_pod.py`.
The run dir can be gs://BUCKET/...: launch_tpu_pod.sh mounts the bucket on every worker (gcsfuse), since
`longctx train` writes through the local filesystem.

    longctx train recipes/pod/infini_attention.py --dry-run   # estimate + compiled per-device memory
    scripts/launch_tpu_pod.sh TPU ZONE PROJECT recipes/pod/infini_attention.py gs://BUCKET/pod/infini_attention
    sbatch -N 8 --gpus-per-node=8 scripts/launch_slurm.sh recipes/pod/infini_attention.py /shared/pod/infini_attention
"""

from _pod import BACKBONE, DATA_PARALLEL, pod_data, pod_train

from longctx.config import Config
from longctx.models import InfiniAttentionConfig


def config() -> Config:
  return Config(model=InfiniAttentionConfig(**BACKBONE, block_len=1024, memory_update="linear"),
                data=pod_data(lanes=64, seg_len=4096), train=pod_train(), mesh=DATA_PARALLEL)
