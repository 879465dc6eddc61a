"""Orbax checkpoints of the whole training state.

One checkpoint = two items in `run_dir/checkpoints/<step>/`:
  train_state  params, optimizer state, per-lane model state, step, RNG (arrays, sharded)
  extra        JSON: data-iterator state, config, anything else small

Orbax writes into a temporary directory and renames it when complete, so a
crash mid-save never leaves a checkpoint that looks finished; saves can run
asynchronously while training continues.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from longctx.errors import CheckpointError


class Checkpointer:

  def __init__(self, directory: str | pathlib.Path, *, keep: int = 3, async_save: bool = True,
               create: bool = True):
    self.directory = pathlib.Path(directory).absolute()
    if not create and not self.directory.is_dir():
      raise CheckpointError(f"no checkpoints in {self.directory}; train first or pass a run dir that has them")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=create, enable_async_checkpointing=async_save, save_interval_steps=1)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("train_state", "extra"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, train_state: Any, extra: dict) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        train_state=ocp.args.StandardSave(train_state), extra=ocp.args.JsonSave(extra)), force=True)

  def restore(self, step: int, abstract_train_state: Any) -> tuple[Any, dict]:
    """Restore onto the shardings in `abstract_train_state` (ShapeDtypeStructs)."""
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(
          train_state=ocp.args.StandardRestore(abstract_train_state), extra=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types; the user needs one line
      msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
      raise CheckpointError(
          f"checkpoint {self.directory / str(step)} could not be restored ({type(e).__name__}: {msg}); "
          "it may come from another model/config or be damaged: use a new --run-dir or delete that step") from None
    return out["train_state"], out["extra"]

  def restore_extra(self, step: int) -> dict:
    out = self._manager.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))
    return out["extra"]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` (arrays or ShapeDtypeStructs) carrying `shardings`."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
