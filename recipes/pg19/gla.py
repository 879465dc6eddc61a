"""PG-19, paper scale: GLA (gated linear attention, flash-linear-attention's defaults: keys 0.5 x d_model,
values 1 x d_model, a rank-16 decay gate with temperature 16; 64-token chunks; no attention window)."""

from _pg19 import BACKBONE, MESH, pg19_data, pg19_train

from longctx.config import Config
from longctx.models import GLAConfig


def config() -> Config:
  backbone = {k: v for k, v in BACKBONE.items() if k != "window"}
  return Config(model=GLAConfig(**backbone, chunk_size=64), data=pg19_data(), train=pg19_train(), mesh=MESH)
