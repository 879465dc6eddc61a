"""Synthetic recall with the Recurrent Memory Transformer (16 memory tokens, blocks of WINDOW tokens).

Same backbone, window and steps as the control (`_recall.py`). Same documents
as the control (up to 256 tokens, 2 blocks); 16 lanes of 2 segments per step,
so gradients flow through the memory across 2 blocks, and the state carries on
(without gradient) into the next step.

    longctx train recipes/synthetic/rmt_recall.py --run-dir runs/recall/rmt
    longctx eval runs/recall/rmt --task passkey,mqar,copy,qa1,qa2 --lengths 128,512,2k,8k
    longctx eval --compare runs/recall/transformer runs/recall/rmt
"""

from _recall import BACKBONE, MESH, WINDOW, recall_data, recall_train

from longctx.config import Config
from longctx.models import RMTConfig


def config() -> Config:
  return Config(model=RMTConfig(**BACKBONE, block_len=WINDOW, num_memory=16),
                data=recall_data(), train=recall_train(),
                mesh=MESH)
