"""Settings shared by the synthetic recall recipes (a helper module, not a recipe).

Every `<model>_recall.py` trains on the same task mixture with the same
backbone size, window, optimiser and number of steps, so `longctx eval
--compare` reads as "what the memory buys". Documents are byte-tokenized,
their lengths log-uniform in [min_length, max_length]; the attention window is
WINDOW tokens, so evidence further back than that is only reachable through a
model's memory. The loss covers every token (prompt_loss_weight=1): with
answer-only loss a model this small sees too few copy targets to form the
induction heads that retrieval needs within a CPU budget. Copy is in the mixture
twice (a task named twice is drawn twice as often) because it is the densest
induction signal: every code character is a target. Two layers, not four: on
2 CPU cores that buys twice the steps, and with embed_conv one layer can
already match and a second can copy (measured: with four layers and copy drawn
1 in 5, copying was still at chance after 1000 steps).
"""

from longctx.config import DataConfig, MeshConfig, TrainConfig

WINDOW = 128  # attention window of every model (and the block length of the memory models)
STEPS = 2500
# embed_conv: every model reads each token together with the 3 before it; without it, byte-level copying
# (and so passkey / MQAR retrieval) was not learned in 1000 steps, with it in ~500 (see transformer.py).
BACKBONE = dict(vocab_size=259, d_model=128, num_layers=2, num_heads=8, window=WINDOW, embed_conv=4)
MAX_LENGTH = 256  # longest training document (2 windows)
MESH = MeshConfig(data=-1)


def recall_data() -> DataConfig:
  """The task mixture, documents of 64-MAX_LENGTH tokens; 16 lanes x 2 segments x WINDOW = 4096 tokens per step.

  Every recall recipe, control and memory models alike, trains on this data: the same documents in the
  same order. Log-uniform lengths put an equal share of *tokens* at every length, so the in-window share of
  the signal is (WINDOW - 64) / (MAX_LENGTH - 64): 33% up to 256 tokens. With documents up to 512 (14%) or
  1024 (6.7%) a Memorizing Transformer had not learned even in-window copying after 2500 steps (measured),
  while the same model learns it in ~350 steps on short copy examples alone. Evidence beyond the window is
  in every document longer than WINDOW (half of them); evaluation then asks for 4x-64x the window.
  """
  return DataConfig(source="synthetic", task="passkey,mqar,copy,copy,qa1,qa2", task_min_length=64,
                    task_length=MAX_LENGTH,
                    prompt_loss_weight=1.0, tokenizer="byte", batch_size=16, seg_len=WINDOW,
                    segments_per_step=2, num_docs=100_000)


def recall_train(steps: int = STEPS) -> TrainConfig:
  return TrainConfig(steps=steps, learning_rate=3e-3, warmup_steps=50, log_every=25, eval_batches=16,
                     checkpoint_every=500, weight_decay=0.05)
