"""Pod scale: Block-Recurrent Transformer, 1024 recurrent states in layer 20 of 24, on a TPU v5p-128 slice.

Chip: TPU v5p-128 (64 chips, 95 GiB HBM each). Mesh: data=4 x fsdp=16 (whole segments per chip: the
recurrent states pass from block to block). 64 lanes x 4 segments of 8,192 tokens = 2M tokens per step.
24 layers, d_model 2048, 1024-token blocks and window, LSTM gates and the state feed-forward (the paper's
"Rec:lstm:dual" near the top); shared settings in `_pod.py`.
The run dir can be gs://BUCKET/...: launch_tpu_pod.sh mounts the bucket on every worker (gcsfuse), since
`longctx train` writes through the local filesystem.

    longctx train recipes/pod/block_recurrent.py --dry-run   # estimate + compiled per-device memory
    scripts/launch_tpu_pod.sh TPU ZONE PROJECT recipes/pod/block_recurrent.py gs://BUCKET/pod/block_recurrent
    sbatch -N 8 --gpus-per-node=8 scripts/launch_slurm.sh recipes/pod/block_recurrent.py /shared/pod/block_recurrent
"""

from _pod import BACKBONE, DATA_PARALLEL, pod_data, pod_train

from longctx.config import Config
from longctx.models import BlockRecurrentConfig

BLOCK = 1024


def config() -> Config:
  return Config(model=BlockRecurrentConfig(**BACKBONE, window=BLOCK, block_len=BLOCK, recurrent_layers=[19],
                                           num_states=1024, gate="lstm", state_ffn=True),
                data=pod_data(lanes=64, seg_len=8192, align=BLOCK), train=pod_train(), mesh=DATA_PARALLEL)
