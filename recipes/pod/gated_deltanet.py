"""Pod scale: Gated DeltaNet, 1.54B parameters, on a TPU v5p-128 slice.

Chip: TPU v5p-128 (64 chips, 95 GiB HBM each). Mesh: fsdp=16 x sequence=4 (context parallel: each
8K-token segment is split over 4 chips; the delta rule's shards exchange their state transitions and each
re-runs its pass from its true initial state). 16 lanes x 16 segments of 8,192 tokens = 2M tokens per step.
24 layers, d_model 2048, Qwen3-Next's head layout (16 key heads of 128, 32 value heads of 128), feed-forward
4096, the gated delta rule in 64-token chunks, no attention window; shared settings in `_pod.py`.
The run dir can be gs://BUCKET/...: launch_tpu_pod.sh mounts the bucket on every worker (gcsfuse), since
`longctx train` writes through the local filesystem.

    longctx train recipes/pod/gated_deltanet.py --dry-run   # estimate + compiled per-device memory
    scripts/launch_tpu_pod.sh TPU ZONE PROJECT recipes/pod/gated_deltanet.py gs://BUCKET/pod/gated_deltanet
    sbatch -N 8 --gpus-per-node=8 scripts/launch_slurm.sh recipes/pod/gated_deltanet.py /shared/pod/gated_deltanet
"""

from _pod import BACKBONE, CONTEXT_PARALLEL, pod_data, pod_train

from longctx.config import Config
from longctx.models import GatedDeltaNetConfig


def config() -> Config:
  return Config(model=GatedDeltaNetConfig(**BACKBONE, head_dim=128, num_value_heads=32, d_ff=4096, chunk_size=64),
                data=pod_data(lanes=16, seg_len=8192), train=pod_train(), mesh=CONTEXT_PARALLEL)
