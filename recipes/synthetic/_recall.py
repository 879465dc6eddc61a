"""Settings shared by the synthetic recall recipes (a helper module, not a recipe).

Every `<model>_recall.py` trains on the same curriculum with the same backbone size, window, optimiser
and number of steps, so `longctx eval --compare` reads as "what the memory buys"; `transformer_recall.py`
is the control, whose 2 layers x WINDOW (+ the embedding conv) is all it can see. Documents are
byte-tokenized. Evaluation asks for 1x, 4x, 16x and 64x WINDOW.

Why the data looks like this (issue 22's diagnosis of the earlier recipes, where no model retrieved beyond
its window): documents of at most 2 windows were within the control's own reach, few passkeys put the key
more than a window back, and documents packed back to back split key and answer over two train steps
(no gradient between them). Here:
  * the curriculum (`train.curriculum`, see longctx/data/curriculum.py) grows the documents from
    in-window to 16x WINDOW while each stage keeps short ones in the mixture (log-uniform lengths from
    task_min_length), so the in-window skill is not erased;
  * `data.align_documents` = one train step (segments_per_step x seg_len) starts every document at a
    step, so backpropagation through the memory spans key and answer (the step grows with the stage);
  * passkey dominates the mixture with copy beside it (copy is the densest induction signal);
  * the loss covers every token (prompt_loss_weight=1): with answer-only loss a model this small sees
    too few targets to form the induction heads retrieval needs.
"""

from longctx.config import Config, DataConfig, MeshConfig, TrainConfig
from longctx.models import config_for

WINDOW = 32  # attention window of every model (and the block length of the memory models)
SEG_LEN = 64  # tokens per segment (2 blocks)
# embed_conv: every model reads each token together with the 3 before it; without it, byte-level copying
# (and so passkey / MQAR retrieval) was not learned in 1000 steps, with it in ~500 (see transformer.py).
BACKBONE = dict(vocab_size=259, d_model=128, num_layers=2, num_heads=8, window=WINDOW, embed_conv=4)
MESH = MeshConfig(data=-1)
TASKS = "passkey,passkey,copy"

# (steps, longest document, segments per step): documents up to the step's length, aligned to it.
STAGES = ((120, 2 * SEG_LEN, 2), (200, 4 * SEG_LEN, 4), (150, 8 * SEG_LEN, 8))
# A model whose retrieval is position-free (memorizing_recall.py) needs no long documents to learn it: one
# stage of 128-token documents (the passkey ~60 tokens back, beyond the window) and many cheap steps.
SHORT_STAGES = ((900, 2 * SEG_LEN, 2),)


def curriculum(stages=STAGES) -> list[str]:
  """One `train.curriculum` string per stage: its documents' lengths, segments per step and alignment."""
  return [f"steps={steps} data.task_length={length} data.task_min_length={min(length // 2, 96)} "
          f"data.segments_per_step={k} data.align_documents={k * SEG_LEN}"
          for steps, length, k in stages]


def recall_data() -> DataConfig:
  """The first stage's data (the curriculum overrides lengths, segments per step and alignment);
  8 lanes of SEG_LEN-token segments (8, not 16: twice the updates for the same CPU time)."""
  _, length, k = STAGES[0]
  return DataConfig(source="synthetic", task=TASKS, task_min_length=length // 2, task_length=length,
                    prompt_loss_weight=1.0, tokenizer="byte", batch_size=8, seg_len=SEG_LEN,
                    segments_per_step=k, align_documents=k * SEG_LEN, num_docs=100_000)


def recall_train(stages=STAGES) -> TrainConfig:
  """The shared optimiser and logging, trained for the stages' steps (`STAGES` or `SHORT_STAGES`)."""
  return TrainConfig(steps=sum(s for s, _, _ in stages), learning_rate=3e-3, warmup_steps=30, log_every=25,
                     eval_batches=8, checkpoint_every=250, weight_decay=0.05, curriculum=curriculum(stages))


def recall_recipe(model: str, *, stages=STAGES, **settings) -> Config:
  """The recall recipe of registered model `model`: the shared backbone (those of its sizes the model's config
  has), blocks of WINDOW tokens for a model that reads blocks, `settings` on top, the shared data and
  schedule (`stages`: `STAGES` or `SHORT_STAGES`). A new model needs no recipe file of its own:
  `longctx train recipes/synthetic/recall.py:model=NAME`."""
  return Config(model=config_for(model, **{**BACKBONE, "block_len": WINDOW, **settings}), data=recall_data(),
                train=recall_train(stages=stages), mesh=MESH)
