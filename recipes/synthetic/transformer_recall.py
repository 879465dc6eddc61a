"""Synthetic recall, baseline control: a sliding-window Transformer on passkey / MQAR / qa1 / qa2.

The control has no memory beyond its K/V cache of WINDOW=128 tokens: it should
answer inside its window and fall to chance beyond it. It trains on documents
of 64-256 tokens, where most evidence is inside the window (shared settings in
`_recall.py`).

    longctx train recipes/synthetic/transformer_recall.py --run-dir runs/recall/transformer
    longctx eval runs/recall/transformer --task passkey,mqar,copy,qa1,qa2 --lengths 128,512,2k,8k
"""

from _recall import BACKBONE, MESH, recall_data, recall_train

from longctx.config import Config
from longctx.models import TransformerConfig


def config() -> Config:
  return Config(model=TransformerConfig(**BACKBONE), data=recall_data(), train=recall_train(),
                mesh=MESH)
