"""Synthetic recall with the Memorizing Transformer (kNN memory of 512 entries per head in layer 1 of 2).

Same backbone, window, curriculum and steps as the control (`_recall.py`). The memory holds the last
512 keys of a document per head (all of its past at 16x the window), retrieved exactly (top-32). It is state,
not weights: size it for the longest input at evaluation. The kNN gate starts
at sigmoid(-3) = 5%, not the paper's even mix: with 50% of layer 0 coming from
a blurred kNN read, this model never formed in-window induction in 2500 steps
(0% passkey); at 5% it has it by step 1500, like the control (measured).

    longctx train recipes/synthetic/memorizing_recall.py --run-dir runs/recall/memorizing
    longctx eval runs/recall/memorizing --task passkey,mqar,copy,qa1,qa2 --lengths 32,128,512,2k \
        --set model.memory_size=2048
"""

from _recall import BACKBONE, MESH, WINDOW, recall_data, recall_train

from longctx.config import Config
from longctx.models import MemorizingConfig


def config() -> Config:
  return Config(model=MemorizingConfig(**BACKBONE, block_len=WINDOW, knn_layers=[-2], memory_size=512, top_k=32,
                                       knn_gate_init=-3.0),
                data=recall_data(), train=recall_train(),
                mesh=MESH)
