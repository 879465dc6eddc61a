"""Pod scale: the sliding-window Transformer-XL baseline, 1.34B parameters, on a TPU v5p-128 slice.

Chip: TPU v5p-128 (64 chips, 95 GiB HBM each). Mesh: fsdp=16 x sequence=4 (context parallel: each
32K-token segment is split over 4 chips). 16 lanes x 4 segments of 32,768 tokens = 2M tokens per step.
24 layers, d_model 2048, 16 heads, a 4096-token window over a Transformer-XL cache; the settings shared
with the other pod recipes are in `_pod.py`.
The run dir can be gs://BUCKET/...: launch_tpu_pod.sh mounts the bucket on every worker (gcsfuse), since
`longctx train` writes through the local filesystem.

    longctx train recipes/pod/transformer.py --dry-run   # estimate + compiled per-device memory
    scripts/launch_tpu_pod.sh TPU ZONE PROJECT recipes/pod/transformer.py gs://BUCKET/pod/transformer
    sbatch -N 8 --gpus-per-node=8 scripts/launch_slurm.sh recipes/pod/transformer.py /shared/pod/transformer
"""

from _pod import BACKBONE, CONTEXT_PARALLEL, pod_data, pod_train

from longctx.config import Config
from longctx.models import TransformerConfig


def config() -> Config:
  return Config(model=TransformerConfig(**BACKBONE, window=4096), data=pod_data(lanes=16, seg_len=32768),
                train=pod_train(), mesh=CONTEXT_PARALLEL)
