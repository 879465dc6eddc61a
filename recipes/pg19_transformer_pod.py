"""PG-19 sliding-window Transformer sized for a TPU v5p-128 slice (64 chips).

12 layers, d_model 1024, segments of 4096 tokens with a 512-token window
(Transformer-XL cache), 256 lanes x 2 segments per step (2M tokens), bf16
compute with float32 parameters, segment rematerialisation. Data streams from
the Hugging Face hub (`deepmind/pg19`, field `text`) through a 32K
sentencepiece model trained with `longctx tokenizer train`.

    longctx train recipes/pg19_transformer_pod.py --dry-run       # size, FLOPs, mesh, memory
    longctx tokenizer train --input pg19_sample/*.txt --vocab-size 32000 --out tokenizers/pg19_32k
    longctx train recipes/pg19_transformer_pod.py --run-dir gs://BUCKET/runs/pg19_xl
"""

from longctx.config import Config, DataConfig, MeshConfig, TrainConfig
from longctx.models import TransformerConfig


def config() -> Config:
  return Config(
      model=TransformerConfig(vocab_size=32000, d_model=1024, num_layers=12, num_heads=8, window=512,
                              attention_block=512, tie_embeddings=False),
      data=DataConfig(source="hub", hub_name="deepmind/pg19", text_field="text", split="train",
                      eval_split="validation", tokenizer="tokenizers/pg19_32k.model", batch_size=256,
                      seg_len=4096, segments_per_step=2),
      train=TrainConfig(steps=250_000, learning_rate=1e-3, warmup_steps=2000, weight_decay=0.1,
                        compute_dtype="bfloat16", remat=True, log_every=50, eval_every=5000,
                        eval_batches=64, checkpoint_every=2000, keep_checkpoints=5),
      mesh=MeshConfig(data=4, fsdp=16, tensor=1, sequence=1),
  )
