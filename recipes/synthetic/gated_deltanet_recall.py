"""Synthetic recall with Gated DeltaNet: the gated delta rule instead of windowed attention, state O(1) per layer.

Same backbone size, curriculum and steps as the control (`_recall.py`); no attention window: every token
reads the past through the delta-rule state (per value head a [16, 16] associative memory whose entry for
key k moves toward v at each write, after a data-dependent decay). The delta rule is what separates this
family from fixed-decay recurrences (RetNet) on associative recall (Yang et al. 2024, 2025); the eval
compares it with the control at the same lengths.

    longctx train recipes/synthetic/gated_deltanet_recall.py --run-dir runs/recall/gated_deltanet
    longctx eval runs/recall/gated_deltanet --task passkey,mqar,copy,qa1,qa2 --lengths 32,128,512,2k
"""

from _recall import recall_recipe

from longctx.config import Config


def config() -> Config:
  return recall_recipe("gated_deltanet", chunk_size=64)
