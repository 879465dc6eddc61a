"""Pod scale: Memorizing Transformer, one kNN layer (18 of 24) over 65,536 past keys per head, on a TPU v5p-128.

Chip: TPU v5p-128 (64 chips, 95 GiB HBM each). Mesh: data=4 x fsdp=16 (whole segments per chip: the kNN
memory is written block by block). 64 lanes x 4 segments of 8,192 tokens = 2M tokens per step.
24 layers, d_model 2048, 1024-token blocks and window; approximate top-32 retrieval (`lax.approx_max_k`,
fast on TPU), keys and values stored in bf16; shared settings in `_pod.py`.
The run dir can be gs://BUCKET/...: launch_tpu_pod.sh mounts the bucket on every worker (gcsfuse), since
`longctx train` writes through the local filesystem.

    longctx train recipes/pod/memorizing.py --dry-run   # estimate + compiled per-device memory
    scripts/launch_tpu_pod.sh TPU ZONE PROJECT recipes/pod/memorizing.py gs://BUCKET/pod/memorizing
    sbatch -N 8 --gpus-per-node=8 scripts/launch_slurm.sh recipes/pod/memorizing.py /shared/pod/memorizing
"""

from _pod import BACKBONE, DATA_PARALLEL, pod_data, pod_train

from longctx.config import Config
from longctx.models import MemorizingConfig

BLOCK = 1024


def config() -> Config:
  return Config(model=MemorizingConfig(**BACKBONE, window=BLOCK, block_len=BLOCK, knn_layers=[17],
                                       memory_size=65536, top_k=32, retrieval="approx", knn_query_chunk=128,
                                       memory_dtype="bfloat16"),
                data=pod_data(lanes=64, seg_len=8192, align=BLOCK), train=pod_train(), mesh=DATA_PARALLEL)
