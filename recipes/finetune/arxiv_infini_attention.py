"""Fine-tune the model of recipes/pg19/infini_attention.py on arXiv articles (ccdv/arxiv-summarization, streamed).

    longctx train recipes/finetune/arxiv_infini_attention.py --init-from CKPT --run-dir runs/ft_arxiv_infini_attention

Local files instead: --set data.source=files --set 'data.paths=[docs/*.txt]' (see _finetune.py).
"""

from _finetune import finetune


def config():
  return finetune("infini_attention", "arxiv")
