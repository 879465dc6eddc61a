"""Pod scale: mLSTM (the xLSTM 7B layer), 1.37B parameters, on a TPU v5p-128 slice.

Chip: TPU v5p-128 (64 chips, 95 GiB HBM each). Mesh: fsdp=16 x sequence=4 (context parallel: each
8K-token segment is split over 4 chips; the shards exchange their state transitions once).
16 lanes x 16 segments of 8,192 tokens = 2M tokens per step. 24 layers, d_model 2048, 4 heads (q/k at
0.5 x d_model, values at 1 x d_model, as xLSTM 7B), feed-forward 5632, 64-token chunks, no attention
window; shared settings in `_pod.py`.
The run dir can be gs://BUCKET/...: launch_tpu_pod.sh mounts the bucket on every worker (gcsfuse), since
`longctx train` writes through the local filesystem.

    longctx train recipes/pod/mlstm.py --dry-run   # estimate + compiled per-device memory
    scripts/launch_tpu_pod.sh TPU ZONE PROJECT recipes/pod/mlstm.py gs://BUCKET/pod/mlstm
    sbatch -N 8 --gpus-per-node=8 scripts/launch_slurm.sh recipes/pod/mlstm.py /shared/pod/mlstm
"""

from _pod import BACKBONE, CONTEXT_PARALLEL, pod_data, pod_train

from longctx.config import Config
from longctx.models import MLSTMConfig


def config() -> Config:
  return Config(model=MLSTMConfig(**{**BACKBONE, "num_heads": 4}, d_ff=5632, chunk_size=64),
                data=pod_data(lanes=16, seg_len=8192), train=pod_train(), mesh=CONTEXT_PARALLEL)
