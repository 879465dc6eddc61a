"""Fine-tune the model of recipes/pg19/memorizing.py on arXiv articles (ccdv/arxiv-summarization, streamed).

    longctx train recipes/finetune/arxiv_memorizing.py --init-from CKPT --run-dir runs/ft_arxiv_memorizing

Local files instead: --set data.source=files --set 'data.paths=[docs/*.txt]' (see _finetune.py).
"""

from _finetune import finetune


def config():
  return finetune("memorizing", "arxiv")
