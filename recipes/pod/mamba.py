"""Pod scale: Mamba, 48 blocks of d_model 2048 (the 1.4B shape), on a TPU v5p-128 slice.

Chip: TPU v5p-128 (64 chips, 95 GiB HBM each). Mesh: fsdp=16 x sequence=4 (context parallel: each
8K-token segment is split over 4 chips). 16 lanes x 16 segments of 8,192 tokens = 2M tokens per step.
State size 16, d_inner 4096, conv 4; shared settings in `_pod.py`.

Does not fit yet: Mamba-1's selective scan (a decay per channel and state) materialises far more per token
and layer than the other models, and with whole-segment rematerialisation all 48 layers' worth is live in
the backward pass: the compiled step needs ~1.3 TiB per chip on XLA:CPU, and the TPU compiler refuses it
(HBM exceeded). It needs a fused scan kernel as in the Mamba paper (the state kept on chip) or per-layer
rematerialisation; this is the configuration to run then.

The run dir can be gs://BUCKET/...: launch_tpu_pod.sh mounts the bucket on every worker (gcsfuse), since
`longctx train` writes through the local filesystem.

    longctx train recipes/pod/mamba.py --dry-run   # estimate + compiled per-device memory
    scripts/launch_tpu_pod.sh TPU ZONE PROJECT recipes/pod/mamba.py gs://BUCKET/pod/mamba
    sbatch -N 8 --gpus-per-node=8 scripts/launch_slurm.sh recipes/pod/mamba.py /shared/pod/mamba
"""

from _pod import BACKBONE, CONTEXT_PARALLEL, pod_data, pod_train

from longctx.config import Config
from longctx.models import MambaConfig


def config() -> Config:
  return Config(model=MambaConfig(vocab_size=BACKBONE["vocab_size"], d_model=BACKBONE["d_model"],
                                  num_layers=2 * BACKBONE["num_layers"], state_size=16,
                                  tie_embeddings=BACKBONE["tie_embeddings"]),
                data=pod_data(lanes=16, seg_len=8192), train=pod_train(), mesh=CONTEXT_PARALLEL)
