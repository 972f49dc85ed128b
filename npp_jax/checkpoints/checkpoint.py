"""The trainer's Orbax state: a workdir's config.json and checkpoints, saved, verified and restored here.

A model directory (a trainer's workdir, the tokenizer trainer's workdir, or a GPT that `python -m npp_jax.convert`
wrote) holds:

  config.json                the full run config
  checkpoints/<step>/state   {'step', 'params', 'opt_state', 'ema'} (a converted model has only 'params')
  checkpoints/<step>/meta    JSON: step, stage, patch side, the data fingerprint

Restoring goes through an abstract target that carries the shardings of the current mesh, so a run saved on one
mesh resumes on another. Each step a trainer saves gets an integrity record once it is committed (see
`npp_jax.checkpoints.integrity`); `restore_newest` checks it, moves a damaged step aside as `<step>.corrupt-<time>`
and falls back to the next older one.

Converted GPTs, saved tokenizers and the classifier are `npp_jax.model_files.store`'s.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from npp_jax import config as config_lib
from npp_jax import errors
from npp_jax.checkpoints import integrity

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
TMP_MARK = ".orbax-checkpoint-tmp"
CORRUPT_MARK = ".corrupt-"
FREE_SPACE_MARGIN = 1.05  # Orbax writes a little metadata beside the arrays


class CheckpointError(errors.UserError, OSError):
  """A checkpoint cannot be saved or restored; the message is one sentence naming the path and the cause."""


class Manager(ocp.CheckpointManager):
  """Orbax's manager of WORKDIR/checkpoints, plus the steps this process saved whose integrity record is still to
  be written (`save` adds one, `finish` writes the records once the steps have committed)."""

  def __init__(self, *args: Any, **kwargs: Any):
    super().__init__(*args, **kwargs)
    self.unrecorded: list[int] = []


def manager(workdir: str, *, keep: int = 3, async_save: bool = True, read_only: bool = False) -> Manager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, read_only=read_only,
                                         enable_async_checkpointing=async_save)
  path = epath.Path(workdir)
  path = path if "://" in str(workdir) else path.absolute()  # Orbax refuses relative paths
  return Manager(path / CHECKPOINT_DIR, item_names=("state", "meta"), options=options)


def save(mngr: Manager, step: int, state: Any, meta: dict) -> None:
  """Starts an (asynchronous) save; the previous save is committed and recorded first."""
  finish(mngr)
  _check_free_space(mngr, step, state)
  with _removing_partial_save(mngr, step):
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
              force=True)
  mngr.unrecorded.append(step)


def finish(mngr: Manager) -> None:
  """Waits until every started save is committed, then writes this process's integrity records of them."""
  pending, mngr.unrecorded = mngr.unrecorded, []
  with _removing_partial_save(mngr, pending[-1] if pending else None):
    mngr.wait_until_finished()
  for step in pending:
    step_dir = step_path(mngr, step)
    if step_dir.exists():  # max_to_keep may have removed it already
      integrity.write_record(step_dir, jax.process_index(), jax.process_count())
  if pending and jax.process_count() > 1:  # every process saves the same steps, so all of them get here
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f"npp_integrity_records_{pending[-1]}")  # all records exist past here


def step_path(mngr: ocp.CheckpointManager, step: int) -> epath.Path:
  return epath.Path(mngr.directory) / str(step)


@contextlib.contextmanager
def _removing_partial_save(mngr: ocp.CheckpointManager, step: int | None):
  """Turns a failed save into a CheckpointError after removing the temporary directory it left."""
  try:
    yield
  except CheckpointError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # Orbax and tensorstore raise many kinds
    removed = remove_temporaries(mngr.directory)
    what = f"step {step}" if step is not None else "a checkpoint"
    cause = " ".join(str(e).split())[:500] or type(e).__name__
    left = f"; removed its partial directory {removed[0]}" if removed else ""
    raise CheckpointError(f"could not save {what} in {mngr.directory}: {cause}{left}") from e


def remove_temporaries(directory: epath.PathLike) -> list[str]:
  """Removes the `*.orbax-checkpoint-tmp*` directories of unfinished saves (process 0); returns their names.

  Only safe while no other trainer writes to the directory (the workdir lock sees to that).
  """
  directory = epath.Path(directory)
  if jax.process_index() != 0 or not directory.is_dir():
    return []
  removed = []
  for path in sorted(directory.iterdir(), key=lambda p: p.name):
    if TMP_MARK in path.name:
      path.rmtree() if path.is_dir() else path.unlink()
      removed.append(str(path))
  return removed


def _check_free_space(mngr: ocp.CheckpointManager, step: int, state: Any) -> None:
  """Refuses a save that cannot fit on a local filesystem (object stores say nothing about free space)."""
  directory = str(mngr.directory)
  if "://" in directory:
    return
  needed = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state) if hasattr(x, "dtype"))
  try:
    free = shutil.disk_usage(directory).free
  except OSError:
    return
  if free < needed * FREE_SPACE_MARGIN:
    raise CheckpointError(f"not enough free space to save step {step} in {directory}: the state needs about "
                          f"{needed / 2**30:.2f} GiB and {free / 2**30:.2f} GiB are free; free some space and "
                          "resume (the newest complete checkpoint is kept)")


def restore_newest(mngr: ocp.CheckpointManager, abstract_state: Any, log: Callable[[str], None] = print
                   ) -> tuple[Any, dict, int] | None:
  """(state, meta, step) of the newest step that passes its integrity check and restores; None if none was saved.

  A damaged step (it fails the check, or it has no record and fails to restore) is renamed aside as
  `<step>.corrupt-<time>`, never deleted, with one log line, and the next older step is tried. A step that matches
  its record but does not restore is not damaged but incompatible with this run: that is a CheckpointError.
  """
  steps = sorted(mngr.all_steps(), reverse=True)
  if not steps:
    return None
  moved = []
  for step in steps:
    try:
      note = verify_step(mngr, step)
    except integrity.IntegrityError as e:
      moved.append(_set_aside(mngr, step, str(e), log))
      continue
    try:
      state, meta = restore(mngr, step, abstract_state)
    except Exception as e:  # pylint: disable=broad-except  # Orbax and tensorstore raise many kinds
      cause = " ".join(str(e).split())[:300] or type(e).__name__
      if note is None:
        raise CheckpointError(f"step {step} in {mngr.directory} is intact but does not restore into this run's "
                              f"state ({cause}); was the config changed?") from None
      moved.append(_set_aside(mngr, step, f"it does not restore: {cause}", log))
      continue
    if note:
      log(f"note: {note}; restoring it unchecked")
    return state, meta, step
  raise CheckpointError(f"no checkpoint in {mngr.directory} could be restored; the damaged steps were moved aside "
                        f"({', '.join(moved)}), so the next run starts from step 0")


def verify_step(mngr: ocp.CheckpointManager, step: int) -> str | None:
  """integrity.verify on every process (each checks a share of the records); all processes get the same verdict."""
  problem, note = "", None
  try:
    note = integrity.verify(step_path(mngr, step), jax.process_index(), jax.process_count())
  except integrity.IntegrityError as e:
    problem = str(e)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    failed = multihost_utils.process_allgather(np.array(bool(problem)))
    if np.any(failed) and not problem:
      problem = f"process {int(np.argmax(failed))} found a damaged file (see its log)"
  if problem:
    raise integrity.IntegrityError(problem)
  return note


def _set_aside(mngr: ocp.CheckpointManager, step: int, reason: str, log: Callable[[str], None]) -> str:
  """Renames a damaged step to `<step>.corrupt-<UTC time>` (kept for inspection; Orbax no longer sees it)."""
  source = step_path(mngr, step)
  target = source.parent / f"{step}{CORRUPT_MARK}{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
  if jax.process_index() == 0:
    source.rename(target)
    log(f"checkpoint step {step} is damaged ({reason}); moved it to {target} and trying the previous step")
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f"npp_set_aside_{step}")
  mngr.reload()
  return target.name


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any) -> tuple[Any, dict]:
  """Restores the full train state onto the shardings carried by `abstract_state` (ShapeDtypeStructs)."""
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                        meta=ocp.args.JsonRestore()))
  return restored.state, restored.meta


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """{'a.b.0': shape} of a tree of arrays or array metadata; keys as strings (Orbax stores them so)."""
  def name(path):
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
  return {name(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _sizes_to_change(directory: str, model_config: ml_collections.ConfigDict | None) -> str:
  """The model fields whose sizes differ between the checkpoint's config.json and `model_config`, as a hint."""
  path = epath.Path(directory) / CONFIG_FILE
  if model_config is None or not path.exists():
    return "change the config's model sizes to the checkpoint's"
  stored = json.loads(path.read_text()).get("model", {})
  sizes = [f"model.{k}={v}" for k, v in stored.items()  # integer fields are the sizes (floats, words and flags are not)
           if isinstance(v, int) and not isinstance(v, bool) and k in model_config and model_config[k] != v]
  if not sizes:
    return "change the config's model sizes to the checkpoint's"
  return f"set {', '.join(sizes)} as in its {CONFIG_FILE}, or give a checkpoint of the config's sizes"


def check_params_fit(directory: str, abstract_params: Any, model_config: ml_collections.ConfigDict | None = None
                     ) -> None:
  """Refuses, naming the parameter, both shapes and the config fields to change, a model directory whose newest
  parameters do not have the shapes of `abstract_params` (`model_config`: the config's model section)."""
  mngr = manager(directory, read_only=True)
  try:
    step = mngr.latest_step()
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {directory}/{CHECKPOINT_DIR}")
    _check_fit(mngr, step, directory, abstract_params, model_config)
  finally:
    mngr.close()


def _check_fit(mngr: ocp.CheckpointManager, step: int, directory: str, abstract_params: Any,
               model_config: ml_collections.ConfigDict | None) -> None:
  """Compares the step's parameter metadata with the target's shapes; reading only metadata, Orbax never tries the
  restore, whose error is about its own arguments and whose threads can die noisily at exit."""
  try:
    tree = ocp.PyTreeCheckpointer().metadata(step_path(mngr, step) / "state").item_metadata.tree
  except Exception as e:  # pylint: disable=broad-except  # Orbax and tensorstore raise many kinds
    cause = " ".join(str(e).split())[:300] or type(e).__name__
    raise CheckpointError(f"cannot read the parameter shapes of step {step} in {directory}: {cause}") from None
  saved = _flat_shapes(tree.get("params", {}))
  for name, wanted in _flat_shapes(abstract_params).items():
    if saved.get(name) != wanted:
      there = f"has shape {saved[name]}" if name in saved else "is missing"
      hint = _sizes_to_change(directory, model_config)
      raise errors.InvalidInput(f"the checkpoint in {directory} does not fit the config: its parameter {name} "
                                f"{there}, the config's model needs {wanted}; {hint}")


def restore_params(directory: str, abstract_params: Any, *, ema: bool = False, step: int | None = None,
                   model_config: ml_collections.ConfigDict | None = None) -> Any:
  """Restores only the parameters (or their EMA) of the newest checkpoint in a model directory.

  With ema=True and no EMA in the checkpoint, the raw parameters are returned (the caller is told by a log line).
  Parameters of other shapes are refused as `check_params_fit` says (`model_config`: the config's model section, for
  naming the fields to change).
  """
  mngr = manager(directory, read_only=True)
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {directory}/{CHECKPOINT_DIR}")
  try:
    note = verify_step(mngr, step)
  except integrity.IntegrityError as e:
    raise CheckpointError(f"checkpoint step {step} of {directory} is damaged ({e}); a trainer resuming in that "
                          "directory moves it aside and uses the previous step") from None
  if note:
    logging.info("%s; reading it unchecked", note)
  _check_fit(mngr, step, directory, abstract_params, model_config)
  try:
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    key = "ema" if ema and meta.get("has_ema") else "params"
    if ema and key == "params":
      logging.warning("%s has no EMA parameters; using the raw parameters", directory)
    target = {key: abstract_params}
    restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape,
                                                               dtype=a.dtype), target)
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)))
  except Exception as e:  # pylint: disable=broad-except  # Orbax and tensorstore raise many kinds
    cause = " ".join(str(e).split())[:300] or type(e).__name__
    raise CheckpointError(f"cannot read the parameters of step {step} in {directory}: {cause}") from None
  return restored.state[key]


def write_config(directory: str, config: ml_collections.ConfigDict, *, sections: Sequence[str] = ("model",),
                 ignore: Sequence[str] = ()) -> None:
  """Writes config.json; a workdir that already has one must hold a run with the same `sections` (resuming another
  run is an error; `config.differences` says what counts). Fields named in `ignore` may differ (e.g. where the
  tokenizer's weights are read from)."""
  path = epath.Path(directory)
  if (path / CONFIG_FILE).exists():
    previous = json.loads((path / CONFIG_FILE).read_text())
    changed = config_lib.differences(previous, json.loads(config.to_json_best_effort()), sections, ignore=ignore)
    if changed:
      raise errors.InvalidInput(f"{directory} holds a run with other settings ({', '.join(changed)} differ); "
                                "use a new workdir")
  if jax.process_index() != 0:
    return
  path.mkdir(parents=True, exist_ok=True)
  # Through epath, not fileio: a trainer's workdir may be gs://.
  tmp = path / (CONFIG_FILE + ".tmp")
  tmp.write_text(config.to_json_best_effort(indent=1, sort_keys=True))
  tmp.replace(path / CONFIG_FILE)


def read_config(directory: str) -> ml_collections.ConfigDict:
  path = epath.Path(directory) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f"{directory} is not a model directory: it has no {CONFIG_FILE}")
  return ml_collections.ConfigDict(_tuples(json.loads(path.read_text())))


def _tuples(node):
  """JSON turns tuples into lists; configs use tuples for fixed-size fields (mesh shape, stages)."""
  if isinstance(node, dict):
    return {k: _tuples(v) for k, v in node.items()}
  if isinstance(node, list):
    return tuple(_tuples(v) for v in node)
  return node
