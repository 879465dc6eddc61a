"""Synthetic recall, baseline control: a sliding-window Transformer on passkey / MQAR / qa1 / qa2.

The control has no memory beyond its K/V cache of WINDOW tokens (2 layers: it sees 2 x WINDOW + 3
tokens back at most): it should fall to chance beyond that. It trains on the same curriculum as every
memory model (shared settings in `_recall.py`).

    longctx train recipes/synthetic/transformer_recall.py --run-dir runs/recall/transformer
    longctx eval runs/recall/transformer --task passkey,mqar,copy,qa1,qa2 --lengths 32,128,512,2k
"""

from _recall import recall_recipe

from longctx.config import Config


def config() -> Config:
  return recall_recipe("transformer")
