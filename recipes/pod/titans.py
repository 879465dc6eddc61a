"""Pod scale: Titans (MAG), a 1024-token sliding window gated by a neural memory per layer, on a TPU v5p-128.

Chip: TPU v5p-128 (64 chips, 95 GiB HBM each). Mesh: data=4 x fsdp=16 (whole segments per chip: the
memory is updated chunk by chunk). 64 lanes x 32 segments of 1,024 tokens = 2M tokens per step.
24 layers, d_model 2048; each layer's memory is 16 heads of a 2-layer MLP (128 -> 256 -> 128) updated every
64 tokens (4 heads of 512 -> 1024 -> 512 take twice the memory), documents padded to whole chunks; shared
settings in `_pod.py`.
The run dir can be gs://BUCKET/...: launch_tpu_pod.sh mounts the bucket on every worker (gcsfuse), since
`longctx train` writes through the local filesystem.

    longctx train recipes/pod/titans.py --dry-run   # estimate + compiled per-device memory
    scripts/launch_tpu_pod.sh TPU ZONE PROJECT recipes/pod/titans.py gs://BUCKET/pod/titans
    sbatch -N 8 --gpus-per-node=8 scripts/launch_slurm.sh recipes/pod/titans.py /shared/pod/titans
"""

from _pod import BACKBONE, DATA_PARALLEL, pod_data, pod_train

from longctx.config import Config
from longctx.models import TitansConfig

CHUNK = 64


def config() -> Config:
  return Config(model=TitansConfig(**BACKBONE, window=1024, variant="mag", chunk_size=CHUNK, memory_heads=16,
                                   memory_hidden=256, num_persistent=16),
                data=pod_data(lanes=64, seg_len=1024, align=CHUNK), train=pod_train(), mesh=DATA_PARALLEL)
