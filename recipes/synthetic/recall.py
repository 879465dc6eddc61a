"""Synthetic recall with any registered model: the shared curriculum, backbone, window and schedule of
`_recall.py` (the control's), the model's own settings at their defaults.

    longctx train recipes/synthetic/recall.py:model=NAME --run-dir runs/recall/NAME
    longctx eval --compare runs/recall/transformer runs/recall/NAME

A model with tuned settings has its own `<model>_recall.py` (the same builder, `recall_recipe`); a new model
needs none to be trained, evaluated and compared on the same data.
"""

from _recall import recall_recipe

from longctx.config import Config


def config(model: str = "transformer") -> Config:
  return recall_recipe(model)
