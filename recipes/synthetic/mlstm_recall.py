"""Synthetic recall with mLSTM (xLSTM's matrix memory, exponential input gates): no attention window, state
O(1) per layer.

Same backbone size, curriculum and steps as the control (`_recall.py`); every token reads the past through
the gated matrix memory (per head [16, 17]: C and its normaliser; qk_factor 1 here so the state matches the
other linear-recurrence recipes).

    longctx train recipes/synthetic/mlstm_recall.py --run-dir runs/recall/mlstm
    longctx eval runs/recall/mlstm --task passkey,mqar,copy,qa1,qa2 --lengths 32,128,512,2k
"""

from _recall import recall_recipe

from longctx.config import Config


def config() -> Config:
  return recall_recipe("mlstm", qk_factor=1.0, chunk_size=64)
