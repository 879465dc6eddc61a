"""Synthetic recall with ARMT (the associative recurrent memory transformer): 8 write tokens per block of
WINDOW tokens, each layer's delta-rule associative memory written from them and read by every token.

Same backbone, window, curriculum and steps as the control (`_recall.py`); the write slots are RMT's
(`rmt_recall.py`: 8 tokens), the memory's keys 32 channels before DPFP (192 after), one head.

    longctx train recipes/synthetic/armt_recall.py --run-dir runs/recall/armt
    longctx eval runs/recall/armt --task passkey,mqar,copy,qa1,qa2 --lengths 32,128,512,2k
"""

from _recall import recall_recipe

from longctx.config import Config


def config() -> Config:
  return recall_recipe("armt", num_memory=8, memory_dim=32)
