"""Pod scale: Mamba-2, 48 blocks of d_model 2048 (the 1.3B shape), on a TPU v5p-128 slice.

Chip: TPU v5p-128 (64 chips, 95 GiB HBM each). Mesh: fsdp=16 x sequence=4 (context parallel: each
8K-token segment is split over 4 chips). 16 lanes x 16 segments of 8,192 tokens = 2M tokens per step.
64 heads of 64 channels, state 128, 128-token SSD chunks; shared settings in `_pod.py`.
The run dir can be gs://BUCKET/...: launch_tpu_pod.sh mounts the bucket on every worker (gcsfuse), since
`longctx train` writes through the local filesystem.

    longctx train recipes/pod/mamba2.py --dry-run   # estimate + compiled per-device memory
    scripts/launch_tpu_pod.sh TPU ZONE PROJECT recipes/pod/mamba2.py gs://BUCKET/pod/mamba2
    sbatch -N 8 --gpus-per-node=8 scripts/launch_slurm.sh recipes/pod/mamba2.py /shared/pod/mamba2
"""

from _pod import BACKBONE, CONTEXT_PARALLEL, pod_data, pod_train

from longctx.config import Config
from longctx.models import Mamba2Config


def config() -> Config:
  return Config(model=Mamba2Config(vocab_size=BACKBONE["vocab_size"], d_model=BACKBONE["d_model"],
                                   num_layers=2 * BACKBONE["num_layers"], head_dim=64, state_size=128,
                                   chunk_size=128, tie_embeddings=BACKBONE["tie_embeddings"]),
                data=pod_data(lanes=16, seg_len=8192), train=pod_train(), mesh=CONTEXT_PARALLEL)
