"""Synthetic recall with Infini-attention: softmax attention inside WINDOW-token blocks + a compressive memory.

Same backbone size, curriculum and steps as the control (`_recall.py`); the block
(the paper's segment) is the control's window, so a token sees at most its own
block exactly, and everything earlier in the document only through the
per-head linear memory M, z (O(1) state, no XL cache). Blocks count from each
document's start (no document alignment needed). The memory gate starts at
sigmoid(-3) = 5%, not the paper's even mix (sigmoid(0)): the Memorizing
Transformer, with the same even mix of a blurred memory read into its layer,
never formed in-window induction in 2500 steps (see memorizing_recall.py);
`--set model.gate_init=0` gives the paper's start.

    longctx train recipes/synthetic/infini_attention_recall.py --run-dir runs/recall/infini_attention
    longctx eval runs/recall/infini_attention --task passkey,mqar,copy,qa1,qa2 --lengths 32,128,512,2k
"""

from _recall import recall_recipe

from longctx.config import Config


def config() -> Config:
  return recall_recipe("infini_attention", memory_update="linear", gate_init=-3.0)
