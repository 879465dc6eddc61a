"""PG-19, paper scale: Mamba, 24 layers (two per Transformer layer of the other recipes), d_model 1024, N 16."""

from _pg19 import BACKBONE, MESH, pg19_data, pg19_train

from longctx.config import Config
from longctx.models import MambaConfig


def config() -> Config:
  return Config(model=MambaConfig(vocab_size=BACKBONE["vocab_size"], d_model=BACKBONE["d_model"],
                                  num_layers=2 * BACKBONE["num_layers"], state_size=16,
                                  tie_embeddings=BACKBONE["tie_embeddings"]),
                data=pg19_data(), train=pg19_train(), mesh=MESH)
