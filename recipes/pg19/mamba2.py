"""PG-19, paper scale: Mamba-2, 24 layers (two per Transformer layer of the other recipes), d_model 1024,
32 heads of 64 channels, state 128, 128-token SSD chunks."""

from _pg19 import BACKBONE, MESH, pg19_data, pg19_train

from longctx.config import Config
from longctx.models import Mamba2Config


def config() -> Config:
  return Config(model=Mamba2Config(vocab_size=BACKBONE["vocab_size"], d_model=BACKBONE["d_model"],
                                   num_layers=2 * BACKBONE["num_layers"], head_dim=64, state_size=128,
                                   chunk_size=128, tie_embeddings=BACKBONE["tie_embeddings"]),
                data=pg19_data(), train=pg19_train(), mesh=MESH)
