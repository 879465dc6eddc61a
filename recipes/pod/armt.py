"""Pod scale: ARMT (associative recurrent memory transformer), 1.45B parameters, on a TPU v5p-128 slice.

Chip: TPU v5p-128 (64 chips, 95 GiB HBM each). Mesh: data=4 x fsdp=16 (whole segments per chip: each
layer's memory passes from block to block). 64 lanes x 8 segments of 4,096 tokens = 2M tokens per step.
24 layers, d_model 2048, 16 write tokens every 1024-token block, associative memories with keys of 64
channels (384 after DPFP), a 1024-token window; shared settings in `_pod.py`.
The run dir can be gs://BUCKET/...: launch_tpu_pod.sh mounts the bucket on every worker (gcsfuse), since
`longctx train` writes through the local filesystem.

    longctx train recipes/pod/armt.py --dry-run   # estimate + compiled per-device memory
    scripts/launch_tpu_pod.sh TPU ZONE PROJECT recipes/pod/armt.py gs://BUCKET/pod/armt
    sbatch -N 8 --gpus-per-node=8 scripts/launch_slurm.sh recipes/pod/armt.py /shared/pod/armt
"""

from _pod import BACKBONE, DATA_PARALLEL, pod_data, pod_train

from longctx.config import Config
from longctx.models import ARMTConfig

BLOCK = 1024


def config() -> Config:
  return Config(model=ARMTConfig(**BACKBONE, window=BLOCK, block_len=BLOCK, num_memory=16, memory_dim=64),
                data=pod_data(lanes=64, seg_len=4096, align=BLOCK), train=pod_train(), mesh=DATA_PARALLEL)
