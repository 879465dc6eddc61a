"""PG-19, paper scale: Griffin (RecurrentGemma's architecture): RG-LRU recurrent layers and local multi-query
attention layers, 2:1 (8 recurrent, 4 attention), the shared window, MLP width 3 x d_model."""

from _pg19 import BACKBONE, MESH, pg19_data, pg19_train

from longctx.config import Config
from longctx.models import GriffinConfig


def config() -> Config:
  return Config(model=GriffinConfig(**BACKBONE, num_kv_heads=1), data=pg19_data(), train=pg19_train(), mesh=MESH)
