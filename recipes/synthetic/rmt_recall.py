"""Synthetic recall with the Recurrent Memory Transformer (8 memory tokens, blocks of WINDOW tokens).

Same backbone, window, curriculum and steps as the control (`_recall.py`): documents grow stage by
stage to 16 blocks, each aligned to one train step, so gradients flow through the memory from the key's
block to the answer's. 8 memory tokens (5 digits need far fewer; 16 made every block 25% dearer).

    longctx train recipes/synthetic/rmt_recall.py --run-dir runs/recall/rmt
    longctx eval runs/recall/rmt --task passkey,mqar,copy,qa1,qa2 --lengths 32,128,512,2k
    longctx eval --compare runs/recall/transformer runs/recall/rmt
"""

from _recall import recall_recipe

from longctx.config import Config


def config() -> Config:
  return recall_recipe("rmt", num_memory=8)
