"""Fine-tune the model of recipes/pg19/block_recurrent.py on PG-19 (deepmind/pg19, streamed).

    longctx train recipes/finetune/pg19_block_recurrent.py --init-from CKPT --run-dir runs/ft_pg19_block_recurrent

Local files instead: --set data.source=files --set 'data.paths=[docs/*.txt]' (see _finetune.py).
"""

from _finetune import finetune


def config():
  return finetune("block_recurrent", "pg19")
