"""The model directories a user keeps and ships: converted GPTs, saved tokenizers and the classifier.

A converted GPT (`save_gpt`) is a trainer workdir with one step-0 checkpoint of the parameters (the format is
`npp_jax.checkpoints.checkpoint`'s), so `--config.init_from` and `sample` read it like a trained one; `load_model`
reads either.

A saved tokenizer (`save_vq`, e.g. npp_jax/assets/vq_fashion) holds params/ (an Orbax checkpoint of the VQModel's
parameters) and config.json ({"vq": config, "checksum": params checksum}, written last). `load_vq` also reads a
PyTorch file, converted in memory by `npp_jax.model_files.param_mapping`.

A classifier directory (`save_classifier`, e.g. npp_jax/assets/fashion_classifier) holds params.npz (the flat
parameter dict, keys joined by '/'), test_stats.npz (mean and covariance of its features on the real test set) and
meta.json (architecture, sha256 of both .npz files, accuracies, recipe).
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from npp_jax import assets
from npp_jax import errors
from npp_jax import fileio
from npp_jax import sharding
from npp_jax.checkpoints import checkpoint
from npp_jax.model_files import param_mapping
from npp_jax.models import classifier as classifier_lib
from npp_jax.models import gpt
from npp_jax.models import vq as vq_lib

PathLike = str | os.PathLike


def load_model(directory: str, config: ml_collections.ConfigDict | None = None, *, ema: bool = True,
               mesh: jax.sharding.Mesh | None = None):
  """Builds the GPT of a model directory and loads its newest parameters (EMA if present and asked for).

  Returns (model, config). The parameters are replicated over `mesh` (default: all devices), which suits sampling.
  """
  config = config if config is not None else checkpoint.read_config(directory)
  abstract = nnx.eval_shape(lambda: gpt.GPT(config.model, rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)
  devices = mesh.devices.flatten() if mesh is not None else jax.devices()
  replicated = jax.sharding.NamedSharding(sharding.one_axis_mesh(devices), jax.sharding.PartitionSpec())
  params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                        nnx.to_pure_dict(abstract_state))
  params = checkpoint.restore_params(directory, params, ema=ema, model_config=config.model)
  return nnx.merge(graphdef, params), config


# ----------------------------------------------------------------------------------------------------------------------
# Converted GPTs.


def save_gpt(model: gpt.GPT, config: ml_collections.ConfigDict, directory: PathLike) -> None:
  """Writes a model directory (config.json + a step-0 checkpoint holding only the parameters) that
  `python -m npp_jax.main --config.init_from=DIR` fine-tunes from and `python -m npp_jax.sample` loads."""
  directory = str(pathlib.Path(directory).absolute())
  if pathlib.Path(directory, checkpoint.CONFIG_FILE).exists():
    raise FileExistsError(f"{directory} already holds a model; choose a new directory")
  checkpoint.write_config(directory, config)
  mngr = checkpoint.manager(directory, keep=1, async_save=False)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  checkpoint.save(mngr, 0, {"params": params}, {"step": 0, "converted_from": str(config.get("converted_from", ""))})
  checkpoint.finish(mngr)  # commits, then writes the integrity record
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
  if (directory / VQ_PARAMS_DIR).exists() or (directory / checkpoint.CONFIG_FILE).exists():
    raise FileExistsError(f"{directory} already holds a saved tokenizer; choose a new directory")
  directory.mkdir(parents=True, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory / VQ_PARAMS_DIR, nnx.state(model, nnx.Param))
  checkpointer.wait_until_finished()
  checksum = vq_lib.params_checksum(model)
  text = json.dumps({"vq": _vq_config_dict(vq_cfg), "checksum": checksum}, indent=1) + "\n"
  fileio.write_text(directory / checkpoint.CONFIG_FILE, text)
  return checksum


def read_saved_vq(directory: PathLike) -> tuple[ml_collections.ConfigDict, str]:
  """The vq config (with `checkpoint` pointing at `directory`) and checksum stored by `save_vq`."""
  directory = pathlib.Path(directory)
  config_file = directory / checkpoint.CONFIG_FILE
  if not config_file.is_file() or not (directory / VQ_PARAMS_DIR).is_dir():
    raise FileNotFoundError(f"{directory} is not a tokenizer saved by save_vq (no {checkpoint.CONFIG_FILE} and "
                            f"{VQ_PARAMS_DIR}/)")
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
    raise errors.InvalidInput(f"the tokenizer saved in {directory} does not match the vq config: {', '.join(differ)}")
  model = vq_lib.abstract_model(vq_cfg)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        nnx.state(model, nnx.Param))
  restored = ocp.StandardCheckpointer().restore(directory.absolute() / VQ_PARAMS_DIR, target)
  nnx.update(model, restored)
  if vq_lib.params_checksum(model) != checksum:
    raise errors.InvalidInput(f"the parameters in {directory / VQ_PARAMS_DIR} do not match the checksum in its "
                              f"{checkpoint.CONFIG_FILE}")
  return model


def _normalise(value: Any) -> Any:
  return tuple(value) if isinstance(value, (list, tuple)) else value


def load_vq(vq_cfg: ml_collections.ConfigDict) -> vq_lib.VQModel:
  """The tokenizer described by `vq_cfg`, with weights from `vq_cfg.checkpoint`.

  The checkpoint may be a torch .pt/.pth/.bin file (container "model" etc., see torch_io.load_state_dict), a
  .safetensors file, or a directory written by `save_vq`.
  """
  if not vq_cfg.checkpoint:
    raise errors.InvalidInput("vq.checkpoint is empty: give the tokenizer weights (a .pt, .safetensors or save_vq "
                              "directory)")
  path = pathlib.Path(vq_cfg.checkpoint)
  if path.is_dir():
    return _load_vq_dir(path, vq_cfg)
  if not path.exists():
    raise FileNotFoundError(f"vq.checkpoint {path} does not exist")
  # A PyTorch file is converted in memory.
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
    raise errors.InvalidInput(f"{path} does not match the sha256 in {directory / CLASSIFIER_META_FILE}; the file is "
                              "damaged or stale")
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
    raise errors.InvalidInput(f"{directory / CLASSIFIER_PARAMS_FILE} does not hold the parameters of the architecture "
                              f"in {CLASSIFIER_META_FILE}")
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  nnx.update(model, nnx.from_flat_state({path: var.replace(jnp.asarray(stored["/".join(map(str, path))]))
                                         for path, var in flat}))
  return model, meta


def load_reference_stats(directory: PathLike = assets.FASHION_CLASSIFIER) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) of the classifier's features over the Fashion-MNIST test set, as shipped beside the weights."""
  directory = pathlib.Path(directory)
  with np.load(_checked_file(directory, CLASSIFIER_STATS_FILE, _read_classifier_meta(directory))) as npz:
    return npz["mu"], npz["sigma"]
