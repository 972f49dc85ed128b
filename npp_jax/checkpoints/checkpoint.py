"""Every native directory format: read and written here, and nowhere else.

A model directory (a trainer's workdir, the tokenizer trainer's workdir, or a GPT that `python -m npp_jax.convert`
wrote) holds:

  config.json                the full run config
  checkpoints/<step>/state   {'step', 'params', 'opt_state', 'ema'} (a converted model has only 'params')
  checkpoints/<step>/meta    JSON: step, stage, patch side, the data fingerprint

Restoring goes through an abstract target that carries the shardings of the current mesh, so a run saved on one
mesh resumes on another. Each step a trainer saves gets an integrity record once it is committed (see
`npp_jax.integrity`); `restore_newest` checks it, moves a damaged step aside as `<step>.corrupt-<time>` and falls
back to the next older one.

A saved tokenizer (`save_vq`, e.g. npp_jax/assets/vq_fashion) holds params/ (an Orbax checkpoint of the VQModel's
parameters) and config.json ({"vq": config, "checksum": params checksum}, written last).

A classifier directory (`save_classifier`, e.g. npp_jax/assets/fashion_classifier) holds params.npz (the flat
parameter dict, keys joined by '/'), test_stats.npz (mean and covariance of its features on the real test set) and
meta.json (architecture, sha256 of both .npz files, accuracies, recipe).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import time
import weakref
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx

from npp_jax import assets
from npp_jax import fileio
from npp_jax import sharding
from npp_jax.checkpoints import integrity
from npp_jax.models import classifier as classifier_lib
from npp_jax.models import gpt
from npp_jax.models import vq as vq_lib

PathLike = str | os.PathLike
CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
TMP_MARK = ".orbax-checkpoint-tmp"
CORRUPT_MARK = ".corrupt-"
FREE_SPACE_MARGIN = 1.05  # Orbax writes a little metadata beside the arrays


class CheckpointError(OSError):
  """A checkpoint cannot be saved or restored; the message is one sentence naming the path and the cause."""


# Steps saved by this process whose integrity record is still to be written (once the step has committed).
_UNRECORDED: "weakref.WeakKeyDictionary[ocp.CheckpointManager, list[int]]" = weakref.WeakKeyDictionary()


def manager(workdir: str, *, keep: int = 3, async_save: bool = True, read_only: bool = False
            ) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, read_only=read_only,
                                         enable_async_checkpointing=async_save)
  path = epath.Path(workdir)
  path = path if "://" in str(workdir) else path.absolute()  # Orbax refuses relative paths
  return ocp.CheckpointManager(path / CHECKPOINT_DIR, item_names=("state", "meta"),
                               options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
  """Starts an (asynchronous) save; the previous save is committed and recorded first."""
  finish(mngr)
  _check_free_space(mngr, step, state)
  with _removing_partial_save(mngr, step):
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
              force=True)
  _UNRECORDED.setdefault(mngr, []).append(step)


def finish(mngr: ocp.CheckpointManager) -> None:
  """Waits until every started save is committed, then writes this process's integrity records of them."""
  pending = _UNRECORDED.pop(mngr, [])
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


def restore_params(directory: str, abstract_params: Any, *, ema: bool = False, step: int | None = None) -> Any:
  """Restores only the parameters (or their EMA) of the newest checkpoint in a model directory.

  With ema=True and no EMA in the checkpoint, the raw parameters are returned (the caller is told by a log line).
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
  run is an error). Fields named in `ignore` may differ (e.g. where the tokenizer's weights are read from)."""
  path = epath.Path(directory)
  if (path / CONFIG_FILE).exists():
    previous = json.loads((path / CONFIG_FILE).read_text())
    current = json.loads(config.to_json_best_effort())
    changed = [f"{section}.{k}" for section in sections
               for k in sorted(set(previous.get(section, {})) | set(current.get(section, {})))
               if k not in ignore and previous.get(section, {}).get(k) != current.get(section, {}).get(k)]
    if changed:
      raise ValueError(f"{directory} holds a run with other settings ({', '.join(changed)} differ); "
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


def load_model(directory: str, config: ml_collections.ConfigDict | None = None, *, ema: bool = True,
               mesh: jax.sharding.Mesh | None = None):
  """Builds the GPT of a model directory and loads its newest parameters (EMA if present and asked for).

  Returns (model, config). The parameters are replicated over `mesh` (default: all devices), which suits sampling.
  """
  config = config if config is not None else read_config(directory)
  abstract = nnx.eval_shape(lambda: gpt.GPT(config.model, rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)
  devices = mesh.devices.flatten() if mesh is not None else jax.devices()
  replicated = jax.sharding.NamedSharding(sharding.one_axis_mesh("d", devices), jax.sharding.PartitionSpec())
  params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                        nnx.to_pure_dict(abstract_state))
  params = restore_params(directory, params, ema=ema)
  return nnx.merge(graphdef, params), config


# ----------------------------------------------------------------------------------------------------------------------
# Converted GPTs.


def save_gpt(model: gpt.GPT, config: ml_collections.ConfigDict, directory: PathLike) -> None:
  """Writes a model directory (config.json + a step-0 checkpoint holding only the parameters) that
  `python -m npp_jax.main --config.init_from=DIR` fine-tunes from and `python -m npp_jax.sample` loads."""
  directory = str(pathlib.Path(directory).absolute())
  if pathlib.Path(directory, CONFIG_FILE).exists():
    raise FileExistsError(f"{directory} already holds a model; choose a new directory")
  write_config(directory, config)
  mngr = manager(directory, keep=1, async_save=False)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  save(mngr, 0, {"params": params}, {"step": 0, "converted_from": str(config.get("converted_from", ""))})
  finish(mngr)  # commits, then writes the integrity record
  mngr.close()


# ----------------------------------------------------------------------------------------------------------------------
# Saved tokenizers.

VQ_PARAMS_DIR = "params"
# Fields that decide the parameter shapes; a saved tokenizer must agree with the config on these.
_VQ_ARCH_FIELDS = ("codebook_size", "codebook_embed_dim", "encoder_ch_mult", "decoder_ch_mult", "z_channels", "ch",
                   "num_res_blocks")


def _vq_config_dict(vq_cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  return json.loads(vq_cfg.to_json())


def save_vq(model: vq_lib.VQModel, vq_cfg: ml_collections.ConfigDict, directory: PathLike) -> str:
  """Writes `directory/params` (Orbax checkpoint of the parameters) and `directory/config.json`.

  config.json is {"vq": <the vq config>, "checksum": params_checksum(model)}; it is written last, so a directory
  with a config.json is complete. Returns the checksum.

  Raises:
    FileExistsError: the directory already holds a saved tokenizer (nothing is overwritten).
  """
  directory = pathlib.Path(directory).absolute()
  if (directory / VQ_PARAMS_DIR).exists() or (directory / CONFIG_FILE).exists():
    raise FileExistsError(f"{directory} already holds a saved tokenizer; choose a new directory")
  directory.mkdir(parents=True, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory / VQ_PARAMS_DIR, nnx.state(model, nnx.Param))
  checkpointer.wait_until_finished()
  checksum = vq_lib.params_checksum(model)
  text = json.dumps({"vq": _vq_config_dict(vq_cfg), "checksum": checksum}, indent=1) + "\n"
  fileio.write_text(directory / CONFIG_FILE, text)
  return checksum


def read_saved_vq(directory: PathLike) -> tuple[ml_collections.ConfigDict, str]:
  """The vq config (with `checkpoint` pointing at `directory`) and checksum stored by `save_vq`."""
  directory = pathlib.Path(directory)
  config_file = directory / CONFIG_FILE
  if not config_file.is_file() or not (directory / VQ_PARAMS_DIR).is_dir():
    raise FileNotFoundError(f"{directory} is not a tokenizer saved by save_vq (no {CONFIG_FILE} and {VQ_PARAMS_DIR}/)")
  saved = json.loads(config_file.read_text())
  # JSON has no tuples; the config uses them for the channel multipliers.
  fields = {k: tuple(v) if isinstance(v, list) else v for k, v in saved["vq"].items()}
  vq_cfg = ml_collections.ConfigDict(dict(fields, checkpoint=str(directory)))
  return vq_cfg, saved["checksum"]


def _load_vq_dir(directory: pathlib.Path, vq_cfg: ml_collections.ConfigDict) -> vq_lib.VQModel:
  saved_cfg, checksum = read_saved_vq(directory)
  differ = [f"{f} (saved {saved_cfg[f]}, config {vq_cfg[f]})" for f in _VQ_ARCH_FIELDS
            if _normalise(saved_cfg[f]) != _normalise(vq_cfg[f])]
  if differ:
    raise ValueError(f"the tokenizer saved in {directory} does not match the vq config: {', '.join(differ)}")
  model = vq_lib.abstract_model(vq_cfg)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        nnx.state(model, nnx.Param))
  restored = ocp.StandardCheckpointer().restore(directory.absolute() / VQ_PARAMS_DIR, target)
  nnx.update(model, restored)
  if vq_lib.params_checksum(model) != checksum:
    raise ValueError(f"the parameters in {directory / VQ_PARAMS_DIR} do not match the checksum in its {CONFIG_FILE}")
  return model


def _normalise(value: Any) -> Any:
  return tuple(value) if isinstance(value, (list, tuple)) else value


def load_vq(vq_cfg: ml_collections.ConfigDict) -> vq_lib.VQModel:
  """The tokenizer described by `vq_cfg`, with weights from `vq_cfg.checkpoint`.

  The checkpoint may be a torch .pt/.pth/.bin file (container "model" etc., see torch_io.load_state_dict), a
  .safetensors file, or a directory written by `save_vq`.
  """
  if not vq_cfg.checkpoint:
    raise ValueError("vq.checkpoint is empty: give the tokenizer weights (a .pt, .safetensors or save_vq directory)")
  path = pathlib.Path(vq_cfg.checkpoint)
  if path.is_dir():
    return _load_vq_dir(path, vq_cfg)
  if not path.exists():
    raise FileNotFoundError(f"vq.checkpoint {path} does not exist")
  # A PyTorch file is converted in memory. Imported here: the converter's CLI writes through this module.
  from npp_jax.model_files import param_mapping  # pylint: disable=g-import-not-at-top
  return param_mapping.vq_from_torch(path, vq_cfg)


# ----------------------------------------------------------------------------------------------------------------------
# The classifier of the online metric.

CLASSIFIER_PARAMS_FILE = "params.npz"
CLASSIFIER_META_FILE = "meta.json"
CLASSIFIER_STATS_FILE = "test_stats.npz"


def save_classifier(directory: PathLike, model: classifier_lib.FashionClassifier, arch: dict, extra_meta: dict,
                    reference_stats: tuple[np.ndarray, np.ndarray, int]) -> dict:
  """Writes params.npz, test_stats.npz (`reference_stats`: feature mean, covariance, image count) and meta.json
  (with both files' sha256, written last); returns meta."""
  directory = pathlib.Path(directory)
  mu, sigma, n = reference_stats
  fileio.save_npz(directory / CLASSIFIER_PARAMS_FILE, **classifier_lib.flat_params(model))
  fileio.save_npz(directory / CLASSIFIER_STATS_FILE, mu=mu, sigma=sigma, n=np.int64(n))
  meta = {"arch": arch, **extra_meta,
          "sha256": {name: fileio.file_sha256(directory / name)
                     for name in (CLASSIFIER_PARAMS_FILE, CLASSIFIER_STATS_FILE)}}
  fileio.write_text(directory / CLASSIFIER_META_FILE, json.dumps(meta, indent=1) + "\n")
  return meta


def _read_classifier_meta(directory: pathlib.Path) -> dict:
  path = directory / CLASSIFIER_META_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{directory} holds no classifier: {CLASSIFIER_META_FILE} not found (train one with "
                            "`python -m npp_jax.train_classifier --config configs/fashion_classifier.py --out DIR`)")
  return json.loads(path.read_text())


def _checked_file(directory: pathlib.Path, name: str, meta: dict) -> pathlib.Path:
  """The path of `name`, after checking that its sha256 is the one meta.json records."""
  path = directory / name
  if not path.is_file():
    raise FileNotFoundError(f"classifier file {path} not found")
  expected = meta.get("sha256", {}).get(name)
  if expected != fileio.file_sha256(path):
    raise ValueError(f"{path} does not match the sha256 in {directory / CLASSIFIER_META_FILE}; the file is damaged "
                     "or stale")
  return path


def load_classifier(directory: PathLike = assets.FASHION_CLASSIFIER) -> tuple[classifier_lib.FashionClassifier, dict]:
  """The classifier stored in `directory` (default: the shipped one) and its meta.json dict; checks checksums."""
  directory = pathlib.Path(directory)
  meta = _read_classifier_meta(directory)
  with np.load(_checked_file(directory, CLASSIFIER_PARAMS_FILE, meta)) as npz:
    stored = {k: npz[k] for k in npz.files}
  model = classifier_lib.build(meta["arch"])
  expected = classifier_lib.flat_params(model)
  if set(stored) != set(expected) or any(stored[k].shape != v.shape for k, v in expected.items()):
    raise ValueError(f"{directory / CLASSIFIER_PARAMS_FILE} does not hold the parameters of the architecture in "
                     f"{CLASSIFIER_META_FILE}")
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  nnx.update(model, nnx.from_flat_state({path: var.replace(jnp.asarray(stored["/".join(map(str, path))]))
                                         for path, var in flat}))
  return model, meta


def load_reference_stats(directory: PathLike = assets.FASHION_CLASSIFIER) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) of the classifier's features over the Fashion-MNIST test set, as shipped beside the weights."""
  directory = pathlib.Path(directory)
  with np.load(_checked_file(directory, CLASSIFIER_STATS_FILE, _read_classifier_meta(directory))) as npz:
    return npz["mu"], npz["sigma"]
