"""The control for `memorizing_recall.py`: the windowed transformer with the same backbone, token
convolution (`embed_conv=8`) and schedule (900 steps on 64-128-token documents). Its 2 layers x 32-token
window (+ the convolution) is all it can see, so a passkey ~60 tokens back is beyond it: measured 0% at
every length (docs/recall.md), while it copies the key 20 tokens back (in its window) perfectly.

    longctx train recipes/synthetic/transformer_short_recall.py --run-dir runs/recall/transformer_short
"""

from _recall import SHORT_STAGES, recall_recipe

from longctx.config import Config


def config() -> Config:
  return recall_recipe("transformer", stages=SHORT_STAGES, embed_conv=8)
