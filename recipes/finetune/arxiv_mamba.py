"""Fine-tune the model of recipes/pg19/mamba.py on arXiv articles (ccdv/arxiv-summarization, streamed).

    longctx train recipes/finetune/arxiv_mamba.py --init-from CKPT --run-dir runs/ft_arxiv_mamba

Local files instead: --set data.source=files --set 'data.paths=[docs/*.txt]' (see _finetune.py).
"""

from _finetune import finetune


def config():
  return finetune("mamba", "arxiv")
