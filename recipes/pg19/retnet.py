"""PG-19, paper scale: RetNet (multi-scale retention, chunked with 64-token chunks; no attention window)."""

from _pg19 import BACKBONE, MESH, pg19_data, pg19_train

from longctx.config import Config
from longctx.models import RetNetConfig


def config() -> Config:
  backbone = {k: v for k, v in BACKBONE.items() if k != "window"}
  return Config(model=RetNetConfig(**backbone, chunk_size=64), data=pg19_data(), train=pg19_train(), mesh=MESH)
