"""Synthetic recall, baseline control: a sliding-window Transformer on passkey / MQAR / qa1 / qa2.

Documents are a mixture of the four recall tasks with lengths log-uniform in
[64, 512] tokens (byte-level), and the attention window is only 128 tokens, so
an answer whose evidence lies more than 128 tokens back can only come from a
memory. The baseline has none beyond its K/V cache: it is the control, and
should answer inside its window and fall to chance beyond it.

The loss covers every token (prompt_loss_weight=1): with answer-only loss a
model this small sees too few copy targets to form the induction heads that
retrieval needs within a CPU budget (measured: no in-window passkey hits after
1400 steps at weight 0.5, in-sentence copying by step 300 at weight 1).

    longctx train recipes/synthetic/transformer_recall.py --run-dir runs/recall/transformer
    longctx eval runs/recall/transformer --task passkey,mqar,qa1,qa2 --lengths 128,512,2k,8k

Every `recipes/synthetic/<model>_recall.py` shares `recall_data()` and
`recall_train()` so the models are compared on the same data and budget.
"""

from longctx.config import Config, DataConfig, MeshConfig, TrainConfig
from longctx.models import TransformerConfig

WINDOW = 128


def recall_data() -> DataConfig:
  return DataConfig(source="synthetic", task="passkey,mqar,qa1,qa2", task_min_length=64, task_length=512,
                    prompt_loss_weight=1.0, tokenizer="byte", batch_size=16, seg_len=128, segments_per_step=2,
                    num_docs=100_000)


def recall_train() -> TrainConfig:
  return TrainConfig(steps=1200, learning_rate=3e-3, warmup_steps=50, log_every=25, eval_batches=16,
                     checkpoint_every=300, weight_decay=0.05)


def config() -> Config:
  return Config(
      model=TransformerConfig(vocab_size=259, d_model=128, num_layers=2, num_heads=4, window=WINDOW),
      data=recall_data(), train=recall_train(), mesh=MeshConfig(data=-1))
