"""The control for `memorizing_recall.py`: the windowed transformer with the same backbone, token
convolution (`embed_conv=8`) and schedule (900 steps on 64-128-token documents). Its 2 layers x 32-token
window (+ the convolution) is all it can see, so a passkey ~60 tokens back is beyond it: measured 0% at
every length (docs/recall.md), while it copies the key 20 tokens back (in its window) perfectly.

    longctx train recipes/synthetic/transformer_short_recall.py --run-dir runs/recall/transformer_short
"""

from _recall import BACKBONE, MESH, SHORT_STAGES, recall_data, recall_train

from longctx.config import Config
from longctx.models import TransformerConfig


def config() -> Config:
  return Config(model=TransformerConfig(**{**BACKBONE, "embed_conv": 8}), data=recall_data(),
                train=recall_train(stages=SHORT_STAGES), mesh=MESH)
