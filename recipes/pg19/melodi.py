"""PG-19, paper scale: MELODI, 64 short-term slots per layer, a 4096-entry long-term FIFO in layer 6 of 12.

The reference configuration (meliad `base_melodi.gin`): 512-token windows,
64 summary tokens, 32 FIFO entries appended per window (a 128-window span,
65,536 tokens).
"""

from _pg19 import BACKBONE, MESH, WINDOW, pg19_data, pg19_train

from longctx.config import Config
from longctx.models import MelodiConfig


def config() -> Config:
  return Config(model=MelodiConfig(**BACKBONE, block_len=WINDOW, short_memory=64, summary_tokens=64,
                                   long_memory_size=4096, long_append=32, long_layer=6),
                data=pg19_data(align=WINDOW), train=pg19_train(), mesh=MESH)
