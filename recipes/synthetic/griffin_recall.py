"""Synthetic recall with Griffin (RecurrentGemma's architecture): one RG-LRU recurrent layer and one local
multi-query attention layer of the shared window, so the window is the control's and the RG-LRU's
per-channel state (d_model floats per layer) is what can carry a key further back.

Same backbone size, curriculum and steps as the control (`_recall.py`). Griffin's 2:1 pattern needs three
layers; at the shared two layers the pattern is 1:1.

    longctx train recipes/synthetic/griffin_recall.py --run-dir runs/recall/griffin
    longctx eval runs/recall/griffin --task passkey,mqar,copy,qa1,qa2 --lengths 32,128,512,2k
"""

from _recall import recall_recipe

from longctx.config import Config


def config() -> Config:
  return recall_recipe("griffin", block_types="recurrent,attention", num_kv_heads=1)
