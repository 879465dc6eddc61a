"""Every model behind the one segment-recurrent interface (see `base.py`)."""

from flax import nnx

from longctx.models.base import SegmentLM, reset_rows
from longctx.models.registry import get_model_class, list_models, register_model
from longctx.models import transformer  # noqa: F401  (registers "transformer")
from longctx.models.transformer import Transformer, TransformerConfig


def build_model(cfg, *, rngs: nnx.Rngs) -> SegmentLM:
  """Instantiate the registered model for `cfg.name`."""
  return get_model_class(cfg.name)(cfg, rngs=rngs)
