"""Where a run's checkpoint is: a run dir (its latest step) or `RUN/checkpoints/STEP`, and its saved config."""

from __future__ import annotations

import json
import pathlib

from longctx import recipe as recipe_lib
from longctx.errors import CheckpointError, ConfigError


def resolve_checkpoint(path: str | pathlib.Path) -> tuple[pathlib.Path, int | None]:
  """A run dir (latest step) or `RUN/checkpoints/STEP` -> (run dir, step or None)."""
  path = pathlib.Path(path)
  if path.name.isdigit() and path.parent.name == "checkpoints":
    return path.parent.parent, int(path.name)
  return path, None


def read_saved_config(cfg_path: pathlib.Path) -> dict:
  """A run's config.json as a dict that `recipe.from_dict` accepts; one-line CheckpointError otherwise."""
  fix = "it is written by `longctx train`: restore it from a copy, or train again in a new run dir"
  try:
    saved = json.loads(cfg_path.read_text(encoding="utf-8"))
  except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
    raise CheckpointError(f"{cfg_path} is not valid JSON ({type(e).__name__}: {str(e)[:150]}); {fix}") from None
  try:
    recipe_lib.from_dict(saved)
  except ConfigError as e:
    raise CheckpointError(f"{cfg_path} is not a longctx config ({e}); {fix}") from None
  return saved
