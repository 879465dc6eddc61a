"""Synthetic recall with MELODI (32 short-term slots per layer, a 512-entry long-term FIFO in layer 2 of 2).

Same backbone, window, curriculum and steps as the control (`_recall.py`): windows of WINDOW tokens,
no XL cache (the short-term memory replaces it). The FIFO gains 16 entries per window, so it spans the
last 32 windows.

    longctx train recipes/synthetic/melodi_recall.py --run-dir runs/recall/melodi
    longctx eval runs/recall/melodi --task passkey,mqar,copy,qa1,qa2 --lengths 32,128,512,2k
"""

from _recall import BACKBONE, MESH, WINDOW, recall_data, recall_train

from longctx.config import Config
from longctx.models import MelodiConfig


def config() -> Config:
  return Config(model=MelodiConfig(**BACKBONE, block_len=WINDOW, short_memory=32, summary_tokens=32,
                                   long_memory_size=512, long_append=16),
                data=recall_data(), train=recall_train(),
                mesh=MESH)
