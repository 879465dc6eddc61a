"""Pod scale: Recurrent Memory Transformer, 1.34B parameters, on a TPU v5p-128 slice.

Chip: TPU v5p-128 (64 chips, 95 GiB HBM each). Mesh: data=4 x fsdp=16 (whole segments per chip: the
memory tokens pass from block to block). 64 lanes x 8 segments of 4,096 tokens = 2M tokens per step.
24 layers, d_model 2048, 64 memory tokens read and written every 1024-token block, a 1024-token window;
shared settings in `_pod.py`.
The run dir can be gs://BUCKET/...: launch_tpu_pod.sh mounts the bucket on every worker (gcsfuse), since
`longctx train` writes through the local filesystem.

    longctx train recipes/pod/rmt.py --dry-run   # estimate + compiled per-device memory
    scripts/launch_tpu_pod.sh TPU ZONE PROJECT recipes/pod/rmt.py gs://BUCKET/pod/rmt
    sbatch -N 8 --gpus-per-node=8 scripts/launch_slurm.sh recipes/pod/rmt.py /shared/pod/rmt
"""

from _pod import BACKBONE, DATA_PARALLEL, pod_data, pod_train

from longctx.config import Config
from longctx.models import RMTConfig

BLOCK = 1024


def config() -> Config:
  return Config(model=RMTConfig(**BACKBONE, window=BLOCK, block_len=BLOCK, num_memory=64),
                data=pod_data(lanes=64, seg_len=4096, align=BLOCK), train=pod_train(), mesh=DATA_PARALLEL)
