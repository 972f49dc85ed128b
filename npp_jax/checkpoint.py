"""Orbax checkpoints of the train state, and loading a model directory for sampling or fine-tuning.

A model directory (a trainer's workdir, or what `python -m npp_jax.convert` writes) holds:

  config.json                the full run config
  checkpoints/<step>/state   {'step', 'params', 'opt_state', 'ema'} (a converted model has only 'params')
  checkpoints/<step>/meta    JSON: step, stage, patch side, the data fingerprint

Restoring goes through an abstract target that carries the shardings of the current mesh, so a run saved on one
mesh resumes on another.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


def manager(workdir: str, *, keep: int = 3, async_save: bool = True, read_only: bool = False
            ) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, read_only=read_only,
                                         enable_async_checkpointing=async_save)
  path = epath.Path(workdir)
  path = path if "://" in str(workdir) else path.absolute()  # Orbax refuses relative paths
  return ocp.CheckpointManager(path / CHECKPOINT_DIR, item_names=("state", "meta"),
                               options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True)


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
  meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
  key = "ema" if ema and meta.get("has_ema") else "params"
  if ema and key == "params":
    print(f"note: {directory} has no EMA parameters; using the raw parameters", flush=True)
  target = {key: abstract_params}
  restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape,
                                                             dtype=a.dtype), target)
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)))
  return restored.state[key]


def write_config(directory: str, config: ml_collections.ConfigDict) -> None:
  """Writes config.json; a workdir that already has one must hold the same model (resuming another is an error)."""
  path = epath.Path(directory)
  if (path / CONFIG_FILE).exists():
    previous = read_config(directory)
    if previous.model.to_dict() != config.model.to_dict():
      changed = sorted(k for k in set(previous.model) | set(config.model)
                       if previous.model.get(k) != config.model.get(k))
      raise ValueError(f"{directory} holds a run of another model (model.{', model.'.join(changed)} differ); "
                       "use a new workdir")
  if jax.process_index() != 0:
    return
  path.mkdir(parents=True, exist_ok=True)
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
  from npp_jax.models import gpt  # pylint: disable=g-import-not-at-top

  config = config if config is not None else read_config(directory)
  abstract = nnx.eval_shape(lambda: gpt.GPT(config.model, rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)
  devices = mesh.devices.flatten() if mesh is not None else jax.devices()
  sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(devices, ("d",)), jax.sharding.PartitionSpec())
  params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                        nnx.to_pure_dict(abstract_state))
  params = restore_params(directory, params, ema=ema)
  return nnx.merge(graphdef, params), config
