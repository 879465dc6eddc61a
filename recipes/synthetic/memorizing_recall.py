"""Synthetic recall with the Memorizing Transformer (kNN memory of 2048 entries per head in layer 3 of 4).

Same backbone, window and steps as the control (`_recall.py`); documents run to
1024 tokens, aligned to whole blocks; 4 segments of 8 lanes per step. The
memory holds every past key of a training document (2048 > 1024 tokens), retrieved
exactly (top-32).

    longctx train recipes/synthetic/memorizing_recall.py --run-dir runs/recall/memorizing
    longctx eval runs/recall/memorizing --task passkey,mqar,copy,qa1,qa2 --lengths 128,512,2k,8k \
        --set model.memory_size=8192   # the memory is state, not weights: size it for the longest input
"""

from _recall import BACKBONE, MESH, WINDOW, recall_data, recall_train

from longctx.config import Config
from longctx.models import MemorizingConfig


def config() -> Config:
  return Config(model=MemorizingConfig(**BACKBONE, block_len=WINDOW, knn_layers=[-2], memory_size=2048, top_k=32),
                data=recall_data(max_length=1024, lanes=8, segments=4, align=WINDOW), train=recall_train(),
                mesh=MESH)
