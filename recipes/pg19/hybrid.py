"""PG-19, paper scale: a hybrid stack, two Mamba-2 layers to one windowed-attention layer (8 and 4 of 12; Mamba-2
with heads of 64, state 128, 128-token chunks; attention with the shared window)."""

from _pg19 import BACKBONE, MESH, WINDOW, pg19_data, pg19_train

from longctx.config import Config
from longctx.models import HybridConfig


def config() -> Config:
  settings = ["mamba2.head_dim=64", "mamba2.state_size=128", "mamba2.chunk_size=128",
              f"transformer.attention_block={WINDOW}"]
  return Config(model=HybridConfig(**BACKBONE, layers="mamba2,mamba2,transformer", settings=settings),
                data=pg19_data(), train=pg19_train(), mesh=MESH)
