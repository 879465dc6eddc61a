"""longctx/recipe.py: recipes taking arguments, the checks across a config's sections, saved configs of 0.1."""

import json
import pathlib

import pytest

from longctx import config as config_lib
from longctx import recipe as recipe_lib
from longctx.errors import ConfigError
from longctx.models import MambaConfig, RMTConfig, TransformerConfig

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _write(tmp_path, body: str) -> pathlib.Path:
  path = tmp_path / "r.py"
  path.write_text("from longctx.config import Config, DataConfig, TrainConfig\n"
                  "from longctx.models import TransformerConfig\n" + body)
  return path


def test_a_recipe_takes_typed_arguments(tmp_path):
  path = _write(tmp_path, "def config(layers: int = 2, bf16: bool = False, name: str = 'x'):\n"
                "  return Config(model=TransformerConfig(num_layers=layers),\n"
                "                train=TrainConfig(compute_dtype='bfloat16' if bf16 else 'float32'))\n")
  cfg = recipe_lib.load_recipe(f"{path}:layers=3,bf16=true")
  assert cfg.model.num_layers == 3 and cfg.train.compute_dtype == "bfloat16"
  assert recipe_lib.load_recipe(path).model.num_layers == 2  # no arguments: the defaults
  with pytest.raises(ConfigError, match=r"takes no argument 'depth'; its arguments: layers=\.\.\., bf16=\.\.\."):
    recipe_lib.load_recipe(f"{path}:depth=3")
  with pytest.raises(ConfigError, match="recipe argument layers='three': expected an int"):
    recipe_lib.load_recipe(f"{path}:layers=three")
  with pytest.raises(ConfigError, match="is not key=value"):
    recipe_lib.load_recipe(f"{path}:layers")


def test_a_required_argument_is_named(tmp_path):
  path = _write(tmp_path, "def config(model: str):\n  return Config(model=TransformerConfig())\n")
  with pytest.raises(ConfigError, match=r"needs the argument model: pass .*r\.py:model=\.\.\."):
    recipe_lib.load_recipe(path)


def test_finetune_and_recall_recipes_take_any_model():
  ft = recipe_lib.load_and_check(ROOT / "recipes/finetune.py:model=rmt,dataset=arxiv")
  assert isinstance(ft.model, RMTConfig) and ft.data.hub_name == "ccdv/arxiv-summarization"
  assert ft.model == recipe_lib.load_recipe(ROOT / "recipes/pg19/rmt.py").model
  with pytest.raises(ConfigError, match="model='nope' has no pretraining recipe"):
    recipe_lib.load_recipe(ROOT / "recipes/finetune.py:model=nope")
  recall = recipe_lib.load_and_check(ROOT / "recipes/synthetic/recall.py:model=mamba")
  assert isinstance(recall.model, MambaConfig) and recall.model.d_model == 128  # the shared backbone's size


def test_validate_checks_the_model_config_against_the_registry():
  cfg = config_lib.Config(model=TransformerConfig(name="rmt"))
  with pytest.raises(ConfigError, match="model.name='rmt' needs a RMTConfig, got TransformerConfig"):
    recipe_lib.validate(cfg)
  cfg = config_lib.Config(model=TransformerConfig(num_layers="2"))
  with pytest.raises(ConfigError, match="model.num_layers='2': expected an int"):
    recipe_lib.validate(cfg)


def test_a_config_written_by_longctx_0_1_is_one_clear_line(tmp_path):
  """Run dirs and exports of 0.1 hold its model settings (and its parameter names): say so, in one line."""
  saved = config_lib.to_dict(config_lib.Config(model=TransformerConfig()))
  saved["model"]["attention_impl"] = "flash"
  with pytest.raises(ConfigError, match=r"model.attention_impl is a setting of longctx 0.1 \(0.2 has model.kernel\)"):
    recipe_lib.from_dict(json.loads(json.dumps(saved)))
  from longctx.io.export_dir import model_config_from_dict

  with pytest.raises(ConfigError, match="written by longctx 0.1"):
    model_config_from_dict({"name": "mamba", "scan_impl": "associative"})
