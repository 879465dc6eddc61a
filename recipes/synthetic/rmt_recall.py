"""Synthetic recall with the Recurrent Memory Transformer (16 memory tokens, blocks of WINDOW tokens).

Same backbone, window and steps as the control (`_recall.py`). Documents run
to 1024 tokens (8 blocks) and are aligned to whole blocks; each step reads 4
segments of 8 lanes, so gradients flow through the memory across 4 blocks.

    longctx train recipes/synthetic/rmt_recall.py --run-dir runs/recall/rmt
    longctx eval runs/recall/rmt --task passkey,mqar,copy,qa1,qa2 --lengths 128,512,2k,8k \\
        --compare runs/recall/transformer
"""

from _recall import BACKBONE, MESH, WINDOW, recall_data, recall_train

from longctx.config import Config
from longctx.models import RMTConfig


def config() -> Config:
  return Config(model=RMTConfig(**BACKBONE, block_len=WINDOW, num_memory=16),
                data=recall_data(max_length=1024, lanes=8, segments=4, align=WINDOW), train=recall_train(),
                mesh=MESH)
