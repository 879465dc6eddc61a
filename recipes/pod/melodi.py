"""Pod scale: MELODI, 64 short-term slots per layer and an 8192-entry long-term FIFO in layer 12 of 24.

Chip: TPU v5p-128 (64 chips, 95 GiB HBM each). Mesh: data=4 x fsdp=16 (whole segments per chip: the
memories pass from window to window). 64 lanes x 8 segments of 4,096 tokens = 2M tokens per step.
24 layers, d_model 2048, 1024-token windows, 64 summary tokens, 64 FIFO entries appended per window;
shared settings in `_pod.py`.
The run dir can be gs://BUCKET/...: launch_tpu_pod.sh mounts the bucket on every worker (gcsfuse), since
`longctx train` writes through the local filesystem.

    longctx train recipes/pod/melodi.py --dry-run   # estimate + compiled per-device memory
    scripts/launch_tpu_pod.sh TPU ZONE PROJECT recipes/pod/melodi.py gs://BUCKET/pod/melodi
    sbatch -N 8 --gpus-per-node=8 scripts/launch_slurm.sh recipes/pod/melodi.py /shared/pod/melodi
"""

from _pod import BACKBONE, DATA_PARALLEL, pod_data, pod_train

from longctx.config import Config
from longctx.models import MelodiConfig

BLOCK = 1024


def config() -> Config:
  return Config(model=MelodiConfig(**BACKBONE, window=BLOCK, block_len=BLOCK, short_memory=64, summary_tokens=64,
                                   long_memory_size=8192, long_append=64, long_layer=12),
                data=pod_data(lanes=64, seg_len=4096, align=BLOCK), train=pod_train(), mesh=DATA_PARALLEL)
