"""Fine-tune the model of recipes/pg19/mamba2.py on arXiv articles (ccdv/arxiv-summarization, streamed).

    longctx train recipes/finetune/arxiv_mamba2.py --init-from CKPT --run-dir runs/ft_arxiv_mamba2

Local files instead: --set data.source=files --set 'data.paths=[docs/*.txt]' (see _finetune.py).
"""

from _finetune import finetune


def config():
  return finetune("mamba2", "arxiv")
