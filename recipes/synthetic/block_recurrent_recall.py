"""Synthetic recall with the Block-Recurrent Transformer (64 recurrent states in layer 1 of 2, blocks of WINDOW).

Same backbone, window, curriculum and steps as the control (`_recall.py`): documents grow stage by stage
to 16 blocks, each aligned to one train step, so gradients flow through the recurrent state from the key
to the answer. LSTM gates (the paper's better variant on PG-19).

    longctx train recipes/synthetic/block_recurrent_recall.py --run-dir runs/recall/block_recurrent
    longctx eval runs/recall/block_recurrent --task passkey,mqar,copy,qa1,qa2 --lengths 32,128,512,2k
"""

from _recall import recall_recipe

from longctx.config import Config


def config() -> Config:
  return recall_recipe("block_recurrent", recurrent_layers=[-2], num_states=64, gate="lstm")
