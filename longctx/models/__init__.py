"""Every model behind the one segment-recurrent interface (see `base.py`)."""

from flax import nnx

from longctx.models.base import SegmentLM, reset_rows
from longctx.models.registry import get_model_class, list_models, register_model
from longctx.models import transformer  # noqa: F401  (registers "transformer")
from longctx.models.transformer import Transformer, TransformerConfig
from longctx.models import rmt  # noqa: F401  (registers "rmt")
from longctx.models.rmt import RMT, RMTConfig
from longctx.models import memorizing  # noqa: F401  (registers "memorizing")
from longctx.models.memorizing import Memorizing, MemorizingConfig
from longctx.models import block_recurrent  # noqa: F401  (registers "block_recurrent")
from longctx.models.block_recurrent import BlockRecurrent, BlockRecurrentConfig
from longctx.models import melodi  # noqa: F401  (registers "melodi")
from longctx.models.melodi import Melodi, MelodiConfig
from longctx.models import retnet  # noqa: F401  (registers "retnet")
from longctx.models.retnet import RetNet, RetNetConfig
from longctx.models import mamba  # noqa: F401  (registers "mamba")
from longctx.models.mamba import Mamba, MambaConfig
from longctx.models import mamba2  # noqa: F401  (registers "mamba2")
from longctx.models.mamba2 import Mamba2, Mamba2Config
from longctx.models import infini_attention  # noqa: F401  (registers "infini_attention")
from longctx.models.infini_attention import InfiniAttention, InfiniAttentionConfig
from longctx.models import titans  # noqa: F401  (registers "titans")
from longctx.models.titans import Titans, TitansConfig


def build_model(cfg, *, rngs: nnx.Rngs) -> SegmentLM:
  """Instantiate the registered model for `cfg.name` (eagerly: one op per parameter)."""
  return get_model_class(cfg.name)(cfg, rngs=rngs)


def create_model(cfg, *, seed: int = 0) -> SegmentLM:
  """Like `build_model`, but initialises every parameter in one compiled call."""
  import jax

  abstract = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(seed)))
  graphdef, _ = nnx.split(abstract)
  params = jax.jit(lambda: nnx.state(build_model(cfg, rngs=nnx.Rngs(seed))))()
  return nnx.merge(graphdef, params)
