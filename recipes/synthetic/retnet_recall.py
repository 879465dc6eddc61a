"""Synthetic recall with RetNet: multi-scale retention instead of windowed attention, state O(1) per layer.

Same backbone size, curriculum and steps as the control (`_recall.py`); no attention
window: every token reads the whole past through the decayed retention state
(gamma_h = 1 - 2^(-5-h): head 0 forgets within ~32 tokens, head 7 keeps
~4096). Zoology found such fixed-decay linear recurrences weak at associative
recall; the eval compares it with the control at the same lengths.

    longctx train recipes/synthetic/retnet_recall.py --run-dir runs/recall/retnet
    longctx eval runs/recall/retnet --task passkey,mqar,copy,qa1,qa2 --lengths 32,128,512,2k
"""

from _recall import recall_recipe

from longctx.config import Config


def config() -> Config:
  return recall_recipe("retnet", chunk_size=64)
