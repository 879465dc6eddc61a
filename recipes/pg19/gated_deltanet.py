"""PG-19, paper scale: Gated DeltaNet (Qwen3-Next's head layout: 8 key heads of 128, 16 value heads of 128; the
gated delta rule in 64-token chunks; no attention window)."""

from _pg19 import BACKBONE, MESH, pg19_data, pg19_train

from longctx.config import Config
from longctx.models import GatedDeltaNetConfig


def config() -> Config:
  backbone = {k: v for k, v in BACKBONE.items() if k != "window"}
  return Config(model=GatedDeltaNetConfig(**{**backbone, "num_heads": 8}, head_dim=128, num_value_heads=16,
                                          chunk_size=64),
                data=pg19_data(), train=pg19_train(), mesh=MESH)
