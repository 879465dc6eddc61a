"""Fine-tune a paper-scale model on PG-19 or arXiv: one recipe for every model, taking arguments.

    longctx train recipes/finetune.py:model=rmt,dataset=arxiv --init-from CKPT --run-dir runs/ft_arxiv_rmt

A fine-tuning run starts from trained weights (`--init-from`) and keeps their architecture: it takes the
model of the matching paper-scale pretraining recipe `recipes/pg19/<model>.py` (any model with such a
recipe), and changes only the data and the schedule (a lower peak learning rate, a short warmup, fewer
steps; fresh optimizer state).

    # 1. a tokenizer (or reuse the one the checkpoint was trained with: token ids must match)
    longctx tokenizer train --input pg19_sample/*.txt --vocab-size 32000 --out tokenizers/pg19_32k
    # 2. pretrain, or bring weights: an orbax run dir, `longctx export` or `longctx import-hf` output
    longctx train recipes/pg19/mamba2.py --run-dir runs/pg19_mamba2
    # 3. fine-tune on PG-19 or arXiv, streamed from the hub
    longctx train recipes/finetune.py:model=mamba2,dataset=arxiv --init-from runs/pg19_mamba2 \\
        --run-dir runs/ft_arxiv_mamba2
    # ... or on local files (.txt / .jsonl / .parquet) with the same recipe
    longctx train recipes/finetune.py:model=mamba2 --init-from runs/pg19_mamba2 \\
        --set data.source=files --set 'data.paths=[books/*.txt]'

Every parameter shape of the checkpoint must match the recipe's model; settings that change no shape may
differ (`--set model.window=2048` fine-tunes to a longer window), and the run's first log line lists them.
"""

import dataclasses
import pathlib

from longctx.config import Config, DataConfig, TrainConfig
from longctx.errors import ConfigError
from longctx.recipe import load_recipe

PRETRAIN = pathlib.Path(__file__).resolve().parent / "pg19"

DATASETS = {
    # name: (hub dataset, its text field, train split, held-out split)
    "pg19": ("deepmind/pg19", "text", "train", "validation"),
    "arxiv": ("ccdv/arxiv-summarization", "article", "train", "validation"),
}


def finetune_data(dataset: str, pretrain: DataConfig) -> DataConfig:
  """The hub dataset streamed with the pretraining recipe's tokenizer, segments and lanes."""
  name, field, split, eval_split = DATASETS[dataset]
  return dataclasses.replace(pretrain, source="hub", hub_name=name, hub_config="", text_field=field, split=split,
                             eval_split=eval_split)


def finetune_train() -> TrainConfig:
  return TrainConfig(steps=20_000, learning_rate=2e-4, warmup_steps=200, min_lr_ratio=0.1, weight_decay=0.1,
                     compute_dtype="bfloat16", remat=True, log_every=50, eval_every=2000, eval_batches=64,
                     checkpoint_every=1000, keep_checkpoints=3)


def config(model: str = "transformer", dataset: str = "pg19") -> Config:
  """The fine-tuning config of `recipes/pg19/<model>.py`'s model on `dataset` ("pg19" or "arxiv")."""
  if dataset not in DATASETS:
    raise ConfigError(f"recipes/finetune.py: dataset={dataset!r} is not one of {sorted(DATASETS)}")
  pretrain_recipe = PRETRAIN / f"{model}.py"
  if not pretrain_recipe.is_file():
    known = sorted(p.stem for p in PRETRAIN.glob("*.py") if not p.stem.startswith("_"))
    raise ConfigError(f"recipes/finetune.py: model={model!r} has no pretraining recipe recipes/pg19/{model}.py; "
                      f"one of {known}")
  pretrain = load_recipe(pretrain_recipe)
  return Config(model=pretrain.model, data=finetune_data(dataset, pretrain.data), train=finetune_train(),
                mesh=pretrain.mesh)
