"""Synthetic recall with a hybrid stack: a Mamba-2 layer under an attention layer of the shared window (the
Jamba / Zamba idea at the recall size), so the window is the control's and the SSM state is what can carry
a key further back.

Same backbone size, curriculum and steps as the control (`_recall.py`); Mamba-2 settings as
`mamba2_recall.py`'s (heads of 64, state 64, 64-token chunks).

    longctx train recipes/synthetic/hybrid_recall.py --run-dir runs/recall/hybrid
    longctx eval runs/recall/hybrid --task passkey,mqar,copy,qa1,qa2 --lengths 32,128,512,2k
"""

from _recall import recall_recipe

from longctx.config import Config


def config() -> Config:
  return recall_recipe("hybrid", layers="mamba2,transformer",
                       settings=["mamba2.head_dim=64", "mamba2.state_size=64", "mamba2.chunk_size=64"])
