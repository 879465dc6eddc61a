"""PG-19, paper scale: ARMT, 16 write tokens per 512-token block, each layer's associative memory with keys of
64 channels before DPFP (384 after), one head."""

from _pg19 import BACKBONE, MESH, WINDOW, pg19_data, pg19_train

from longctx.config import Config
from longctx.models import ARMTConfig


def config() -> Config:
  return Config(model=ARMTConfig(**BACKBONE, block_len=WINDOW, num_memory=16, memory_dim=64),
                data=pg19_data(align=WINDOW), train=pg19_train(), mesh=MESH)
