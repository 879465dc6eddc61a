"""Settings shared by the pod-scale recipes (a helper module, not a recipe).

Target: a TPU v5p-128 slice, 64 chips (16 hosts of 4) with 95 GiB of HBM each;
every recipe's mesh has 64 devices. Models are ~1.3-1.5B parameters: d_model
2048, 16 heads of 128, 24 layers (48 Mamba blocks, two per Transformer layer),
an untied 32K sentencepiece vocabulary; bf16 compute with float32 parameters
and Adam state, segment rematerialisation; 2M tokens per step. One lane per
data-parallel shard: each step carries K = 2M / (lanes x seg_len) segments per
lane (truncated BPTT through the state across all K), so the activations of
one segment on one chip bound the memory.

Meshes: the attention baseline and the linear recurrences (transformer,
retnet, mamba, mamba2) split each lane's segments over `sequence=4` (context
parallelism) and shard parameters and lanes over `fsdp=16`. The memory
models, which read a segment block after block through their memory, keep
whole segments on one chip: `data=4 x fsdp=16`.

Data: PG-19 from the Hugging Face hub, as in recipes/pg19/ (swap the corpus
with `--set data.hub_name=... --set data.text_field=...`). The run dir must be
one directory every host sees; `longctx train` writes it through the local
filesystem, so give launch_tpu_pod.sh a gs://BUCKET/PATH run dir and it mounts
the bucket with gcsfuse on every worker (SLURM: a shared filesystem).

    longctx train recipes/pod/<model>.py --dry-run     # estimate + compiled per-device memory
    longctx tokenizer train --input pg19_sample/*.txt --vocab-size 32000 --out tokenizers/pg19_32k
    scripts/launch_tpu_pod.sh TPU_NAME ZONE PROJECT recipes/pod/<model>.py gs://BUCKET/pod/<model>
    sbatch -N 8 --gpus-per-node=8 scripts/launch_slurm.sh recipes/pod/<model>.py /shared/pod/<model>
"""

from longctx.config import DataConfig, MeshConfig, TrainConfig

TOKENS_PER_STEP = 2 ** 21  # 2,097,152
BACKBONE = dict(vocab_size=32000, d_model=2048, num_layers=24, num_heads=16, tie_embeddings=False)
# Context parallel: lanes and parameters over fsdp (16), each segment's tokens over sequence (4).
CONTEXT_PARALLEL = MeshConfig(data=1, fsdp=16, tensor=1, sequence=4)
# Whole segments per chip: lanes over data x fsdp (64), parameters over fsdp.
DATA_PARALLEL = MeshConfig(data=4, fsdp=16, tensor=1, sequence=1)


def pod_data(*, lanes: int, seg_len: int, align: int = 0) -> DataConfig:
  """PG-19 from the hub: `lanes` x `seg_len` tokens per segment, as many segments per step as make 2M tokens."""
  segments, rest = divmod(TOKENS_PER_STEP, lanes * seg_len)
  assert segments and not rest, f"{lanes} lanes x {seg_len} tokens do not divide {TOKENS_PER_STEP} tokens per step"
  return DataConfig(source="hub", hub_name="deepmind/pg19", text_field="text", split="train",
                    eval_split="validation", tokenizer="tokenizers/pg19_32k.model", batch_size=lanes,
                    seg_len=seg_len, segments_per_step=segments, align_documents=align)


def pod_train() -> TrainConfig:
  """50K steps of 2M tokens (105B tokens), cosine from 3e-4 after 2K warmup steps."""
  return TrainConfig(steps=50_000, learning_rate=3e-4, warmup_steps=2000, weight_decay=0.1,
                     compute_dtype="bfloat16", remat=True, log_every=10, eval_every=2000, eval_batches=32,
                     checkpoint_every=1000, keep_checkpoints=3)
