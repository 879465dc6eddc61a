"""PG-19, paper scale: Titans (MAG), 512-token sliding window gated by a neural memory per layer.

The memory of each layer is 4 heads of a 2-layer MLP (256 -> 512 -> 256), updated every 64 tokens
(`chunk_size`); its weights and momentum are 100 MB of state per lane (12 layers, float32).
Documents are padded to whole chunks (`align`), so training always takes the fast path of one
read and one update per chunk. MAC instead: `--set model.variant=mac` (attention within each
64-token chunk, the memory as context).
"""

from _pg19 import BACKBONE, MESH, pg19_data, pg19_train

from longctx.config import Config
from longctx.models import TitansConfig

CHUNK = 64


def config() -> Config:
  return Config(model=TitansConfig(**BACKBONE, variant="mag", chunk_size=CHUNK, memory_heads=4, memory_hidden=512,
                                   num_persistent=16),
                data=pg19_data(align=CHUNK), train=pg19_train(), mesh=MESH)
