"""PG-19, paper scale: Infini-attention, softmax attention inside 512-token blocks + a compressive memory per
layer and head (linear update; `--set model.memory_update=delta` for the delta rule). No XL cache; blocks
count from each document's start, so documents need no alignment."""

from _pg19 import BACKBONE, MESH, WINDOW, pg19_data, pg19_train

from longctx.config import Config
from longctx.models import InfiniAttentionConfig


def config() -> Config:
  backbone = {k: v for k, v in BACKBONE.items() if k != "window"}
  return Config(model=InfiniAttentionConfig(**backbone, block_len=WINDOW, memory_update="linear"),
                data=pg19_data(), train=pg19_train(), mesh=MESH)
