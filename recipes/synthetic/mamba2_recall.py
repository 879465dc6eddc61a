"""Synthetic recall with Mamba-2 (SSD through the chunked kernel): the control's curriculum and steps, 4 layers.

Two Mamba-2 blocks stand in for one Transformer layer, so 4 layers at d_model
128 (4 heads of 64 channels, state 64) match the control's size. The SSD state
per head is [64, 64], 4x Mamba-1's per channel, which Zoology ties to better
associative recall; the eval compares both with the control.

    longctx train recipes/synthetic/mamba2_recall.py --run-dir runs/recall/mamba2
    longctx eval runs/recall/mamba2 --task passkey,mqar,copy,qa1,qa2 --lengths 32,128,512,2k
"""

from _recall import BACKBONE, MESH, recall_data, recall_train

from longctx.config import Config
from longctx.models import Mamba2Config


def config() -> Config:
  return Config(model=Mamba2Config(vocab_size=BACKBONE["vocab_size"], d_model=BACKBONE["d_model"], num_layers=4,
                                   head_dim=64, state_size=64, chunk_size=64),
                data=recall_data(), train=recall_train(), mesh=MESH)
