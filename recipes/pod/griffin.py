"""Pod scale: Griffin (RecurrentGemma's architecture), 1.31B parameters, on a TPU v5p-128 slice.

Chip: TPU v5p-128 (64 chips, 95 GiB HBM each). Mesh: fsdp=16 x sequence=4 (context parallel: each
32K-token segment is split over 4 chips; attention layers pass key blocks round a ring, RG-LRU layers
exchange their shards' state transitions once). 16 lanes x 4 segments of 32,768 tokens = 2M tokens per step.
24 layers (16 RG-LRU, 8 local attention), d_model 2048, 16 heads, one key/value head, a 2,048-token window
(RecurrentGemma's), MLP width 6144; shared settings in `_pod.py`.
The run dir can be gs://BUCKET/...: launch_tpu_pod.sh mounts the bucket on every worker (gcsfuse), since
`longctx train` writes through the local filesystem.

    longctx train recipes/pod/griffin.py --dry-run   # estimate + compiled per-device memory
    scripts/launch_tpu_pod.sh TPU ZONE PROJECT recipes/pod/griffin.py gs://BUCKET/pod/griffin
    sbatch -N 8 --gpus-per-node=8 scripts/launch_slurm.sh recipes/pod/griffin.py /shared/pod/griffin
"""

from _pod import BACKBONE, CONTEXT_PARALLEL, pod_data, pod_train

from longctx.config import Config
from longctx.models import GriffinConfig


def config() -> Config:
  return Config(model=GriffinConfig(**BACKBONE, num_kv_heads=1), data=pod_data(lanes=16, seg_len=32768),
                train=pod_train(), mesh=CONTEXT_PARALLEL)
