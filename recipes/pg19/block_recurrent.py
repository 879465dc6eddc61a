"""PG-19, paper scale: Block-Recurrent Transformer, 512 recurrent states in the 10th of 12 layers, LSTM gates.

The paper's best PG-19 configuration ("Rec:lstm:dual"): one recurrent layer
near the top, states of the block length (512), a gated feed-forward on the
state, 512-token blocks with the XL cache.
"""

from _pg19 import BACKBONE, MESH, WINDOW, pg19_data, pg19_train

from longctx.config import Config
from longctx.models import BlockRecurrentConfig


def config() -> Config:
  return Config(model=BlockRecurrentConfig(**BACKBONE, block_len=WINDOW, recurrent_layers=[9], num_states=512,
                                           gate="lstm", state_ffn=True),
                data=pg19_data(align=WINDOW), train=pg19_train(), mesh=MESH)
