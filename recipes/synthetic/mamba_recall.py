"""Synthetic recall with Mamba (selective scan, no attention): the control's curriculum and steps, 4 Mamba layers.

Two Mamba blocks stand in for one Transformer layer (attention + MLP), as in the
Mamba paper, so 4 layers at d_model 128 match the control's 2 layers in size.
Mamba's own width-4 conv plays the role of the control's embed_conv. Zoology
found such recurrences weak at associative recall; the eval compares it with
the control at the same lengths.

    longctx train recipes/synthetic/mamba_recall.py --run-dir runs/recall/mamba
    longctx eval runs/recall/mamba --task passkey,mqar,copy,qa1,qa2 --lengths 32,128,512,2k
"""

from _recall import BACKBONE, MESH, recall_data, recall_train

from longctx.config import Config
from longctx.models import MambaConfig


def config() -> Config:
  return Config(model=MambaConfig(vocab_size=BACKBONE["vocab_size"], d_model=BACKBONE["d_model"], num_layers=4,
                                  state_size=16),
                data=recall_data(), train=recall_train(), mesh=MESH)
