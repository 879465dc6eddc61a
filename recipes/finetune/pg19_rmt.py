"""Fine-tune the model of recipes/pg19/rmt.py on PG-19 (deepmind/pg19, streamed).

    longctx train recipes/finetune/pg19_rmt.py --init-from CKPT --run-dir runs/ft_pg19_rmt

Local files instead: --set data.source=files --set 'data.paths=[docs/*.txt]' (see _finetune.py).
"""

from _finetune import finetune


def config():
  return finetune("rmt", "pg19")
