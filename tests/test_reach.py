"""The reach diagnostic (longctx/eval/reach.py): exactly no dependence beyond a windowed transformer's
layers x window, dependence through an RMT's memory beyond it, and the table / plot it writes."""

import pathlib

import jax
import numpy as np
import pytest

from longctx.config import Config, DataConfig, MeshConfig, TrainConfig
from longctx.data.tokenizers import load_tokenizer
from longctx.errors import ConfigError
from longctx.eval import report
from longctx.eval.reach import measure_reach
from longctx.eval.streaming import TrainedModel
from longctx.models import RMTConfig, TransformerConfig
from longctx.training.trainer import Trainer
from longctx import recipe as recipe_lib

DISTANCES = [1, 3, 6, 20, 40]


def _trained(model_cfg) -> TrainedModel:
  cfg = recipe_lib.validate(Config(model=model_cfg, data=DataConfig(source="synthetic", batch_size=1, seg_len=16),
                                   train=TrainConfig(steps=1), mesh=MeshConfig(data=1)))
  devices = jax.devices()[:1]
  params = Trainer(cfg, devices=devices).init_train_state()["params"]
  return TrainedModel(cfg=cfg, params=params, step=0, run_dir=pathlib.Path("."), tokenizer=load_tokenizer("byte"),
                      devices=devices)


def test_a_windowed_transformer_has_no_reach_beyond_its_window():
  """1 layer, window 4, no embedding conv: the last token sees 3 tokens back, no further (exactly 0)."""
  model = _trained(TransformerConfig(vocab_size=259, d_model=32, num_layers=1, num_heads=2, window=4, embed_conv=0))
  r = measure_reach(model, distances=DISTANCES, seg_len=16, samples=2)
  forward = dict(zip(r["distances"], r["forward"]))
  gradient = dict(zip(r["distances"], r["gradient"]))
  assert forward[1] > 1e-4 and forward[3] > 1e-4
  assert forward[6] == forward[20] == forward[40] == 0.0
  # Beyond the window the probed row gets only the output layer's share, like an id not in the input.
  assert gradient[1] > 10 * r["gradient_floor"]
  for d in (6, 20, 40):
    assert gradient[d] < 3 * r["gradient_floor"], (d, gradient[d], r["gradient_floor"])
  assert r["attention_reach"] == 4 and r["tokens"] == 48


def test_rmt_memory_reaches_beyond_the_window():
  """RMT (window 4, blocks of 8): the last token depends on tokens 20 and 40 back, through its memory."""
  model = _trained(RMTConfig(vocab_size=259, d_model=32, num_layers=1, num_heads=2, window=4, embed_conv=0,
                             block_len=8, num_memory=2))
  r = measure_reach(model, distances=DISTANCES, seg_len=16, samples=2)
  forward = dict(zip(r["distances"], r["forward"]))
  gradient = dict(zip(r["distances"], r["gradient"]))
  assert forward[20] > 1e-5 and forward[40] > 1e-6
  assert gradient[40] > 3 * r["gradient_floor"]
  runs = [{"label": "rmt", "model": "rmt", "step": 0, "run_dir": ".", "tasks": {"reach": r}}]
  assert "rmt forward" in report.format_tables(runs) and "floor" in report.format_tables(runs)


def test_reach_plot_and_errors(tmp_path):
  model = _trained(TransformerConfig(vocab_size=259, d_model=16, num_layers=1, num_heads=2, window=4, embed_conv=0))
  r = measure_reach(model, distances=[2, 8], seg_len=8, samples=1)
  runs = [{"label": "t", "model": "transformer", "step": 0, "run_dir": ".", "tasks": {"reach": r}}]
  made = report.write_plots(runs, tmp_path)
  assert (tmp_path / "reach.png") in made and (tmp_path / "reach.png").stat().st_size > 1000
  with pytest.raises(ConfigError, match="must be >= 1"):
    measure_reach(model, distances=[0], seg_len=8)
