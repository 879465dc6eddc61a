"""PG-19, paper scale: mLSTM in the xLSTM 7B layer (4 heads, q/k at 0.5 x d_model, soft-capped gates; 64-token
chunks; no attention window)."""

from _pg19 import BACKBONE, MESH, pg19_data, pg19_train

from longctx.config import Config
from longctx.models import MLSTMConfig


def config() -> Config:
  backbone = {k: v for k, v in BACKBONE.items() if k != "window"}
  return Config(model=MLSTMConfig(**{**backbone, "num_heads": 4}, chunk_size=64), data=pg19_data(),
                train=pg19_train(), mesh=MESH)
