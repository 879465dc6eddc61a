"""Synthetic recall with Titans (MAG): the control's sliding window, gated by a neural memory learned at test time.

Same backbone size, curriculum and steps as the control (`_recall.py`). Each layer
keeps the control's WINDOW-token attention with its XL cache, plus 4
persistent (key, value) pairs, and gates its output with a neural memory: a
2-layer MLP per head (2 heads of 64 channels, hidden 128) whose weights are
written every 16 tokens by a momentum gradient step on ||M(k) - v||^2 with
data-dependent forgetting (`models/titans.py`). Evidence beyond the window
can only come back through those weights.

    longctx train recipes/synthetic/titans_recall.py --run-dir runs/recall/titans
    longctx eval runs/recall/titans --task passkey,mqar,copy,qa1,qa2 --lengths 32,128,512,2k
"""

from _recall import recall_recipe

from longctx.config import Config


def config() -> Config:
  return recall_recipe("titans", variant="mag", chunk_size=16, memory_heads=2, memory_hidden=128, num_persistent=4)
