"""Synthetic recall with GLA: gated linear attention (a data-dependent decay per key channel) instead of windowed
attention, state O(1) per layer.

Same backbone size, curriculum and steps as the control (`_recall.py`); no attention window: every token
reads the past through the gated state (per head a [16, 16] matrix; 8 heads with key_expand 1 here, so
the state matches Gated DeltaNet's recall recipe).

    longctx train recipes/synthetic/gla_recall.py --run-dir runs/recall/gla
    longctx eval runs/recall/gla --task passkey,mqar,copy,qa1,qa2 --lengths 32,128,512,2k
"""

from _recall import recall_recipe

from longctx.config import Config


def config() -> Config:
  return recall_recipe("gla", key_expand=1.0, chunk_size=64)
