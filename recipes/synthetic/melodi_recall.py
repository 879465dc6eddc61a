"""Synthetic recall with MELODI (32 short-term slots per layer, a 512-entry long-term FIFO in layer 2 of 2).

Same backbone, window, curriculum and steps as the control (`_recall.py`): windows of WINDOW tokens,
no XL cache (the short-term memory replaces it). The FIFO gains 16 entries per window, so it spans the
last 32 windows.

    longctx train recipes/synthetic/melodi_recall.py --run-dir runs/recall/melodi
    longctx eval runs/recall/melodi --task passkey,mqar,copy,qa1,qa2 --lengths 32,128,512,2k
"""

from _recall import recall_recipe

from longctx.config import Config


def config() -> Config:
  return recall_recipe("melodi", short_memory=32, summary_tokens=32, long_memory_size=512, long_append=16)
