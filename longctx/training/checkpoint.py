"""Orbax checkpoints of the whole training state.

One checkpoint = two items in `run_dir/checkpoints/<step>/`:
  train_state  params, optimizer state, per-lane model state, step, RNG (arrays, sharded)
  extra        JSON: data-iterator state, config, anything else small

Orbax writes into a temporary directory and renames it when complete, so a
crash mid-save never leaves a checkpoint that looks finished; saves can run
asynchronously while training continues.

Integrity. As soon as orbax has committed a step (a background thread waits
for an asynchronous save), `longctx_manifest.json` is written into it
(atomically): the size and SHA-256 of every file. Before a resume,
`newest_intact_step` checks the newest steps against their manifests; a step
with a file missing, truncated or altered is named in one line and moved aside
to `checkpoints_damaged/` (kept, not deleted) in favour of the previous one.
A step that orbax committed but that has no manifest yet (the process died in
the moment between the two) is *committed, unverified*: it is checked against
orbax's own commit records (`orbax_problem`), restored, and given its manifest
then; only if that fails is it moved aside. So a kill at any instant loses only
the steps after the last checkpoint orbax committed.

Retention. Checkpoints are permanent (every `train.checkpoint_every` steps and
the last; the newest `keep` of them stay) or temporary (every
`train.checkpoint_minutes`, and on SIGTERM/SIGINT; only the newest stays, and
only while it is newer than the newest permanent one), as Levanter does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import shutil
import threading
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from longctx.errors import CheckpointError, ConfigError
from longctx.io.export_dir import FORMAT, read_export
from longctx.io.files import CONFIG
from longctx.io.params import flatten_params, params_from_flat


MANIFEST = "longctx_manifest.json"


class Checkpointer:

  def __init__(self, directory: str | pathlib.Path, *, keep: int = 3, async_save: bool = True,
               create: bool = True):
    self.directory = pathlib.Path(directory).absolute()
    if not create and not self.directory.is_dir():
      raise CheckpointError(f"no checkpoints in {self.directory}; train first or pass a run dir that has them")
    self.keep = keep
    # The directory is made by the first save, not here: a run that stops on bad input before it saves
    # leaves no empty checkpoints/ behind. (Decided once, at construction, so all processes agree.)
    self._make_dir = create and not self.directory.is_dir()
    # Retention is ours (`_prune`): orbax keeps everything it is given.
    options = ocp.CheckpointManagerOptions(max_to_keep=None, create=False, enable_async_checkpointing=async_save,
                                           save_interval_steps=1)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("train_state", "extra"))
    self._async = async_save
    self._pending: list[tuple[int, bool]] = []  # saved steps not finalized (manifest, retention) yet
    self._manifest_thread: threading.Thread | None = None  # writes the manifest once orbax commits
    self._manifest_error: BaseException | None = None
    self._closed = False

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, train_state: Any, extra: dict, *, permanent: bool = True) -> None:
    """Save a step (asynchronously if so configured); its manifest is written as soon as orbax commits it."""
    self._finalize()
    if self._make_dir:
      if jax.process_index() == 0:
        self.directory.mkdir(parents=True, exist_ok=True)
      self._sync("mkdir")
      self._make_dir = False
    self._manager.save(step, args=ocp.args.Composite(
        train_state=ocp.args.StandardSave(train_state), extra=ocp.args.JsonSave(extra)), force=True)
    self._pending.append((step, permanent))
    if not self._async:
      self._finalize()
    elif jax.process_index() == 0:  # orbax commits in its own thread; the manifest follows it there
      self._manifest_thread = threading.Thread(target=self._manifest_when_committed, args=(step, permanent),
                                               name=f"longctx-manifest-{step}", daemon=True)
      self._manifest_thread.start()

  def _manifest_when_committed(self, step: int, permanent: bool) -> None:
    try:
      self._manager.wait_until_finished()  # returns once orbax has committed (renamed) the step
      write_manifest(self.directory / str(step), step=step, permanent=permanent)
    except BaseException as e:  # noqa: BLE001 - re-raised in the main thread by _finalize
      self._manifest_error = e

  def _finalize(self) -> None:
    """Wait for running saves and their manifests (process 0), then drop what retention no longer keeps."""
    if not self._pending:
      return
    self._manager.wait_until_finished()
    if self._manifest_thread is not None:
      self._manifest_thread.join()
      self._manifest_thread = None
    if self._manifest_error is not None:
      error, self._manifest_error = self._manifest_error, None
      raise error
    if jax.process_index() == 0:
      for step, permanent in self._pending:
        if not (self.directory / str(step) / MANIFEST).is_file():
          write_manifest(self.directory / str(step), step=step, permanent=permanent)
      self._pending = []
      self._prune()
    else:
      self._pending = []
    self._sync("finalize")

  def _sync(self, what: str) -> None:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f"longctx checkpoint {what}")

  def _prune(self) -> None:
    kinds = {step: read_manifest(self.directory / str(step)).get("permanent", True) for step in self.all_steps()}
    permanent = [s for s, p in kinds.items() if p]
    drop = set(permanent[:-self.keep]) if self.keep else set()
    newest_permanent = permanent[-1] if permanent else -1
    temporary = [s for s, p in kinds.items() if not p]
    drop |= {s for s in temporary[:-1]} | {s for s in temporary if s < newest_permanent}
    for step in sorted(drop):
      self._manager.delete(step)

  def newest_intact_step(self, log: Callable[[str], None] = print) -> int | None:
    """The newest step that is intact: verified against its manifest, or committed by orbax without a
    manifest yet (`orbax_problem` finds nothing wrong; the caller restores it and `adopt`s it).

    Newer steps that fail their check are named in one line each and moved to checkpoints_damaged/
    (kept, not deleted), so that training can save those steps again.
    """
    rejected = []  # (step, problem), newest first
    for step in reversed(self.all_steps()):
      step_dir = self.directory / str(step)
      problem = verify_step(step_dir)
      if problem == "no manifest":
        committed = orbax_problem(step_dir)
        if committed is None:
          self._reject(rejected, log)
          return step
        problem = f"no manifest, and {committed}"
      if problem is None:
        self._reject(rejected, log)
        return step
      rejected.append((step, problem))
    self._reject(rejected, log)
    return None

  def is_verified(self, step: int) -> bool:
    return verify_step(self.directory / str(step)) is None

  def adopt(self, step: int) -> None:
    """Write the manifest of a committed step that lacks one, once it has been restored (process 0)."""
    step_dir = self.directory / str(step)
    if jax.process_index() == 0 and not (step_dir / MANIFEST).is_file():
      write_manifest(step_dir, step=step, permanent=True)
    self._sync(f"adopt {step}")

  def quarantine(self, step: int, problem: str, log: Callable[[str], None] = print) -> None:
    """Name a step that cannot be used in one line and move it to checkpoints_damaged/."""
    self._reject([(step, problem)], log)

  def _reject(self, rejected: list[tuple[int, str]], log: Callable[[str], None]) -> None:
    for step, problem in rejected:
      log(f"warning: checkpoint {self.directory / str(step)} is damaged ({problem}); moved to "
          f"{self.directory.parent / 'checkpoints_damaged'} and skipped in favour of an older one")
      self._quarantine(step)

  def _quarantine(self, step: int) -> None:
    if jax.process_index() == 0:
      dest = self.directory.parent / "checkpoints_damaged" / str(step)
      dest.parent.mkdir(parents=True, exist_ok=True)
      if dest.exists():
        shutil.rmtree(dest)
      shutil.move(str(self.directory / str(step)), dest)
    self._sync(f"quarantine {step}")
    self._manager.reload()

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

  def checked_step(self, step: int | None = None) -> int:
    """`step` (default: the latest) if this directory holds it with its files intact, else one line saying why.

    A step without a manifest (an older longctx) is accepted; one that fails its manifest is not.
    """
    steps = self.all_steps()
    if not steps:
      raise CheckpointError(f"no checkpoint in {self.directory}; train first")
    step = steps[-1] if step is None else step
    if step not in steps:
      raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; it has {steps}")
    problem = verify_step(self.directory / str(step))
    if problem == "no manifest":  # committed by orbax, manifest not written yet (or an older longctx)
      problem = orbax_problem(self.directory / str(step))
      problem = f"no manifest, and {problem}" if problem else None
    if problem is not None:
      raise CheckpointError(f"checkpoint {self.directory / str(step)} could not be restored: it is damaged "
                            f"({problem}), so its parameters could not be read; use an older step (--step) or train "
                            "again")
    return step

  def restore_params(self, step: int, abstract_params: Any) -> Any:
    """Only the parameters of a checkpoint (not the optimizer state), like `abstract_params`
    (ShapeDtypeStructs): onto their shardings where they have one, else as numpy arrays on the host."""
    target = {"params": abstract_params}

    def restore_arg(s):
      if getattr(s, "sharding", None) is not None:
        return ocp.ArrayRestoreArgs(sharding=s.sharding, dtype=s.dtype)
      return ocp.RestoreArgs(restore_type=np.ndarray, dtype=s.dtype)

    try:
      out = self._manager.restore(step, args=ocp.args.Composite(train_state=ocp.args.PyTreeRestore(
          item=target, restore_args=jax.tree.map(restore_arg, target), partial_restore=True)))
    except Exception as e:  # orbax raises many types; the user needs one line
      msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
      raise CheckpointError(f"the parameters of checkpoint {self.directory / str(step)} could not be read "
                            f"({type(e).__name__}: {msg}); it may be damaged or from another model config") from None
    return out["train_state"]["params"]

  def restore_extra(self, step: int) -> dict:
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types; the user needs one line
      msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
      raise CheckpointError(f"the data position and config of checkpoint {self.directory / str(step)} could not be "
                            f"read ({type(e).__name__}: {msg})") from None
    return out["extra"]

  def wait(self) -> None:
    self._manager.wait_until_finished()
    self._finalize()

  def close(self) -> None:
    if self._closed:
      return
    self._manager.wait_until_finished()
    self._finalize()
    self._manager.close()
    self._closed = True


def _digest(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  with path.open("rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      h.update(chunk)
  return h.hexdigest()


def write_manifest(step_dir: pathlib.Path, *, step: int, permanent: bool) -> None:
  """Record the size and SHA-256 of every file of a finished step (atomically: temp file, then rename)."""
  files = {str(p.relative_to(step_dir)): [p.stat().st_size, _digest(p)]
           for p in sorted(step_dir.rglob("*")) if p.is_file() and p.name != MANIFEST}
  tmp = step_dir / (MANIFEST + ".tmp")
  tmp.write_text(json.dumps({"step": step, "permanent": permanent, "files": files}, indent=1))
  os.replace(tmp, step_dir / MANIFEST)


def read_manifest(step_dir: pathlib.Path) -> dict:
  try:
    return json.loads((step_dir / MANIFEST).read_text())
  except (OSError, ValueError):
    return {}


def verify_step(step_dir: pathlib.Path) -> str | None:
  """None if every file of the step matches its manifest, else what is wrong (a few words)."""
  if not (step_dir / MANIFEST).is_file():
    return "no manifest"
  manifest = read_manifest(step_dir)
  if not isinstance(manifest.get("files"), dict) or not manifest["files"]:
    return f"unreadable {MANIFEST}"
  for name, (size, digest) in manifest["files"].items():
    path = step_dir / name
    if not path.is_file():
      return f"{name} is missing"
    if path.stat().st_size != size:
      return f"{name} has {path.stat().st_size} bytes, {size} were written"
    if _digest(path) != digest:
      return f"{name} does not match its checksum"
  return None


def orbax_problem(step_dir: pathlib.Path) -> str | None:
  """None if orbax's own records say it committed this step completely, else what is missing (a few words).

  Used for steps without a manifest. Orbax writes a step into a temporary directory and renames it when
  complete (or, on object stores, writes `commit_success.txt` last); its `_CHECKPOINT_METADATA` records the
  commit time, and each item has its own metadata. (Array contents have no checksum here: the restore that
  follows is the last check.)
  """
  meta = step_dir / "_CHECKPOINT_METADATA"
  try:
    record = json.loads(meta.read_text())
  except (OSError, ValueError):
    return "orbax's _CHECKPOINT_METADATA is missing or unreadable"
  if not isinstance(record, dict) or not record.get("commit_timestamp_nsecs"):
    return "orbax never recorded its commit"
  for item in ("train_state", "extra"):
    if not (step_dir / item).is_dir():
      return f"item {item} is missing"
  for required in ("train_state/_METADATA", "train_state/manifest.ocdbt", "extra/metadata"):
    if not (step_dir / required).is_file():
      return f"{required} is missing"
  try:
    json.loads((step_dir / "train_state" / "_METADATA").read_text())
    json.loads((step_dir / "extra" / "metadata").read_text())
  except (OSError, ValueError):
    return "orbax's item metadata is unreadable"
  return None


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` (arrays or ShapeDtypeStructs) carrying `shardings`."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


# ----------------------------------------------------------------------------- fine-tuning: initial weights


def _model_differences(saved: dict, now: dict) -> list[str]:
  keys = sorted(set(saved) | set(now))
  return [f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in keys if k != "name" and saved.get(k) != now.get(k)]


def _locate(source: pathlib.Path) -> tuple[str, pathlib.Path, int | None]:
  """What `source` is: ("export", dir, None) or ("orbax", checkpoints dir, step or None for the latest)."""
  if not source.exists():
    raise CheckpointError(f"--init-from {source}: no such file or directory")
  meta = source / CONFIG
  if meta.is_file():
    try:
      if json.loads(meta.read_text()).get("format") == FORMAT:
        return "export", source, None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
      pass
  if (source / "checkpoints").is_dir():
    return "orbax", source / "checkpoints", None
  if source.name == "checkpoints" and source.is_dir():
    return "orbax", source, None
  if source.name.isdigit() and (source / "train_state").is_dir():
    return "orbax", source.parent, int(source.name)
  raise CheckpointError(f"--init-from {source}: not a run dir, a checkpoints/STEP dir, nor a `longctx export` "
                        "dir (config.json with \"format\": \"longctx\"); pass one of those")


def load_initial_params(source: str | pathlib.Path, *, model_cfg: Any, abstract_params: Any) -> tuple[Any, str]:
  """The weights a fine-tuning run starts from, placed like `abstract_params`; and a line saying what was read.

  Args:
    source: a run dir (its latest checkpoint), a `run/checkpoints/STEP` dir, or an export dir written by
      `longctx export --format safetensors` or `longctx import-hf`.
    model_cfg: the recipe's model config. Every parameter must have the shape the recipe's model gives it;
      settings that change no shape (window, block_len, kernel, ...) may differ, and the returned
      line lists them (fine-tuning to a longer window is a use of this).
    abstract_params: ShapeDtypeStructs with shardings (`Trainer.abstract_train_state_sharded()["params"]`).
  """
  from longctx import config as config_lib

  kind, where, step = _locate(pathlib.Path(source))
  now = config_lib.to_dict(model_cfg)
  if kind == "orbax":
    ckpt = Checkpointer(where, create=False, async_save=False)
    try:
      try:
        step = ckpt.checked_step(step)
      except CheckpointError as e:
        raise CheckpointError(f"--init-from {source}: {e}") from None
      saved = ckpt.restore_extra(step).get("config", {}).get("model", {})
      _check_same_model(source, saved, now, abstract_params, _orbax_shapes(where / str(step)))
      params = ckpt.restore_params(step, abstract_params)
    finally:
      ckpt.close()
    what = f"{where / str(step)}"
  else:
    saved_cfg, flat = read_export(where)
    saved = config_lib.to_dict(saved_cfg)
    _check_same_model(source, saved, now, abstract_params, {k: np.shape(v) for k, v in flat.items()})
    params = jax.device_put(params_from_flat(flat, like=abstract_params),
                            jax.tree.map(lambda s: s.sharding, abstract_params))
    what = f"export {where}"
  diffs = _model_differences(saved, now)
  note = f"; model settings changed: {', '.join(diffs)}" if diffs else ""
  return params, f"initialised the parameters from {what}{note}"


def _orbax_shapes(step_dir: pathlib.Path) -> dict[str, tuple] | None:
  """Parameter shapes from a checkpoint's metadata (None if it cannot be read: the restore will say why)."""
  absl_logger = logging.getLogger("absl")  # orbax warns that train_state/ has no _CHECKPOINT_METADATA of its
  level = absl_logger.level                # own (the step dir holds it): a stray stderr line, not a problem
  absl_logger.setLevel(logging.ERROR)
  try:
    meta = ocp.PyTreeCheckpointer().metadata(step_dir / "train_state")
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    return {k: tuple(v.shape) for k, v in flatten_params(tree["params"]).items()}
  except Exception:  # noqa: BLE001 - metadata is only for a clearer error
    return None
  finally:
    absl_logger.setLevel(level)


def _check_same_model(source, saved: dict, now: dict, abstract_params: Any, shapes: dict | None) -> None:
  if saved.get("name") and saved["name"] != now.get("name"):
    raise ConfigError(f"--init-from {source} holds a {saved['name']!r} model, the recipe trains {now.get('name')!r}; "
                      "use a recipe of the same model")
  if shapes is None:
    return
  wanted = {k: tuple(s.shape) for k, s in flatten_params(abstract_params).items()}
  missing = sorted(set(wanted) - set(shapes))
  bad = [k for k in wanted if k in shapes and tuple(shapes[k]) != wanted[k]]
  if missing or bad:
    diffs = _model_differences(saved, now)
    first = (f"{bad[0]} is {tuple(shapes[bad[0]])} there but {wanted[bad[0]]} here" if bad
             else f"it has no {missing[0]}")
    raise ConfigError(f"--init-from {source} does not fit the recipe's model: {first}"
                      + (f" (model settings differ: {', '.join(diffs[:6])})" if diffs else "")
                      + "; set the recipe's model.* to the checkpoint's")
