"""PyTorch <-> NNX weight conversion, strict: every key used, none missing, every shape checked.

A conversion is a list of `Rule`s, one per torch state-dict key: the NNX parameter path it fills and the numpy
transform between the two layouts (and its inverse, for export). Buffers the NNX model does not hold (LlamaGen's
`quantize.codebook_used`) are rules without a path. `import_params` checks a state dict against the rules and the
config-built model and reports every problem in one ValueError; `export_params` is the exact inverse.

This module holds that machinery and the VQ tokenizer's rules, loaders and savers (`vq_from_torch`, `vq_to_torch`,
`load_vq`, `save_vq`, and the `vq` CLI subcommand `main_vq`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from npp_jax import torch_io
from npp_jax.models import vq as vq_lib

PathLike = str | os.PathLike
NnxPath = tuple[Any, ...]
Transform = Callable[[np.ndarray], np.ndarray]

_MAX_NAMED = 40  # Keys named per category in an error message; a wrong config would otherwise list thousands.


def _identity(x: np.ndarray) -> np.ndarray:
  return x


def conv_kernel_to_nnx(weight: np.ndarray) -> np.ndarray:
  """torch conv weight (out, in, kh, kw) -> Flax kernel (kh, kw, in, out)."""
  return weight.transpose(2, 3, 1, 0)


def conv_kernel_to_torch(kernel: np.ndarray) -> np.ndarray:
  """Flax kernel (kh, kw, in, out) -> torch conv weight (out, in, kh, kw)."""
  return kernel.transpose(3, 2, 0, 1)


@dataclasses.dataclass(frozen=True)
class Rule:
  """One torch state-dict entry and where it lives in the NNX model.

  Attributes:
    torch_key: the state-dict name.
    path: the NNX parameter path, or None for a torch buffer the NNX model does not hold (optional on import).
    to_nnx: torch layout -> NNX layout.
    to_torch: the inverse of to_nnx.
    export_value: for a path-less rule, the value written on export (None: not written).
    layer: for a parameter stacked over layers (the GPT's blocks), the slot this torch key fills.
  """

  torch_key: str
  path: NnxPath | None
  to_nnx: Transform = _identity
  to_torch: Transform = _identity
  export_value: Callable[[], np.ndarray] | None = None
  layer: int | None = None


def _model_params(model: nnx.Module) -> dict[NnxPath, Any]:
  return {path: var for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _check_rules_cover(rules: Sequence[Rule], params: dict[NnxPath, Any]):
  """A rule set must name every model parameter exactly once (a bug in the rules otherwise, not a user error)."""
  paths = {r.path for r in rules if r.path is not None}
  if set(map(str, paths)) != set(map(str, params)):
    raise RuntimeError(f"conversion rules do not cover the model: rules without parameter "
                       f"{sorted(set(map(str, paths)) - set(map(str, params)))}, parameters without rule "
                       f"{sorted(set(map(str, params)) - set(map(str, paths)))}")


def _name_keys(keys: list[str]) -> str:
  named = ", ".join(keys[:_MAX_NAMED])
  return named + (f" and {len(keys) - _MAX_NAMED} more" if len(keys) > _MAX_NAMED else "")


def import_params(model: nnx.Module, state_dict: dict[str, np.ndarray], rules: Sequence[Rule], *,
                  source: str = "the checkpoint") -> None:
  """Fills the model's parameters from a flat torch state dict, in place, after checking it completely.

  The model may be abstract (from nnx.eval_shape): every parameter is replaced, so none is initialised for nothing.

  Raises:
    ValueError: naming every missing, unexpected and mis-shaped key (with both shapes, in torch layout).
  """
  params = _model_params(model)
  _check_rules_cover(rules, params)
  by_key = {r.torch_key: r for r in rules}
  missing = [r.torch_key for r in rules if r.path is not None and r.torch_key not in state_dict]
  unexpected = [k for k in state_dict if k not in by_key]
  misshaped, values, stacked = [], [], {}
  for key, value in state_dict.items():
    rule = by_key.get(key)
    if rule is None or rule.path is None:
      continue
    param = params[rule.path]  # Concrete or abstract (nnx.eval_shape): only shape and dtype are used.
    shape = param.shape if rule.layer is None else param.shape[1:]
    # The shape the model expects, in torch layout (a zero-stride view: no memory).
    expected = rule.to_torch(np.broadcast_to(np.zeros((), param.dtype), shape)).shape
    if tuple(value.shape) != tuple(expected):
      misshaped.append(f"{key} (checkpoint {tuple(value.shape)}, model {tuple(expected)})")
      continue
    converted = np.asarray(rule.to_nnx(value), dtype=param.dtype)
    if rule.layer is None:
      values.append((rule.path, jnp.asarray(converted)))
    else:
      stacked.setdefault(rule.path, {})[rule.layer] = converted
  problems = [f"{name} keys: {_name_keys(keys)}" for name, keys in
              (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if keys]
  if problems:
    raise ValueError(f"{source} does not match the model built from the config; " + "; ".join(problems))
  for path, layers in stacked.items():
    values.append((path, jnp.asarray(np.stack([layers[i] for i in range(len(layers))]))))
  nnx.update(model, nnx.from_flat_state(values))


def export_params(model: nnx.Module, rules: Sequence[Rule]) -> dict[str, np.ndarray]:
  """The model's parameters as a flat torch state dict (numpy, torch layout); exact inverse of import_params."""
  params = _model_params(model)
  _check_rules_cover(rules, params)
  out = {}
  for rule in rules:
    if rule.path is not None:
      value = np.asarray(params[rule.path][...])
      value = value if rule.layer is None else value[rule.layer]
      out[rule.torch_key] = np.asarray(rule.to_torch(value), order="C")
    elif rule.export_value is not None:
      out[rule.torch_key] = rule.export_value()
  return out


# ----------------------------------------------------------------------------------------------------------------------
# The GPT (LlamaGen / NPP c2i checkpoints).


def gpt_rules(model_cfg: ml_collections.ConfigDict) -> list[Rule]:
  """LlamaGen Transformer state-dict names for the NNX GPT; per-layer keys fill slots of the stacked blocks.

  Layouts: torch Linear weights are (out, in); the fused wqkv rows are [q; k; v], each head's head_dim rows
  contiguous, which NNX keeps as (dim, 3, heads, head_dim); wo's input features are (heads, head_dim).
  """
  d, heads = model_cfg.dim, model_cfg.n_head
  hd = d // heads
  transpose = lambda w: w.T
  rules = [
      Rule("tok_embeddings.weight", ("tok_embeddings",)),
      Rule("cls_embedding.embedding_table.weight", ("cls_embedding",)),
      Rule("norm.weight", ("norm",)),
      Rule("output.weight", ("output",), transpose, transpose),
  ]
  for i in range(model_cfg.n_layer):
    layer = lambda key, name, to_nnx=_identity, to_torch=_identity: Rule(
        f"layers.{i}.{key}", ("layers", name), to_nnx, to_torch, layer=i)
    rules += [
        layer("attention_norm.weight", "attention_norm"),
        layer("ffn_norm.weight", "ffn_norm"),
        layer("attention.wqkv.weight", "wqkv",
              lambda w: w.reshape(3, heads, hd, d).transpose(3, 0, 1, 2),
              lambda k: k.transpose(1, 2, 3, 0).reshape(3 * heads * hd, d)),
        layer("attention.wo.weight", "wo",
              lambda w: w.reshape(d, heads, hd).transpose(1, 2, 0),
              lambda k: k.transpose(2, 0, 1).reshape(d, heads * hd)),
        layer("feed_forward.w1.weight", "w1", transpose, transpose),
        layer("feed_forward.w3.weight", "w3", transpose, transpose),
        layer("feed_forward.w2.weight", "w2", transpose, transpose),
    ]
  return rules


def gpt_from_torch(path: PathLike, model_cfg: ml_collections.ConfigDict, *, key: str | None = None):
  """A GPT built from `model_cfg` with weights from a LlamaGen/NPP checkpoint (.pt/.pth/.bin or .safetensors).

  `key` picks the container entry ("model" by default; "ema" for EMA weights); FSDP-consolidated raw state dicts
  and DeepSpeed "module" containers are recognised. Every key must be used and every shape must fit the config.
  """
  from npp_jax.models import gpt  # pylint: disable=g-import-not-at-top

  state_dict = torch_io.load_state_dict(path, key=key)
  model = nnx.eval_shape(lambda: gpt.GPT(model_cfg, rngs=nnx.Rngs(0)))
  import_params(model, state_dict, gpt_rules(model_cfg), source=str(path))
  return model


def gpt_to_torch(model) -> dict[str, np.ndarray]:
  """A state dict that LlamaGen's `Transformer.load_state_dict` accepts strictly."""
  return export_params(model, gpt_rules(model.cfg))


def save_gpt(model, config: ml_collections.ConfigDict, directory: PathLike) -> None:
  """Writes a model directory (config.json + a step-0 checkpoint holding only the parameters) that
  `python -m npp_jax.main --config.init_from=DIR` fine-tunes from and `python -m npp_jax.sample` loads."""
  from npp_jax import checkpoint  # pylint: disable=g-import-not-at-top

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
# The VQ tokenizer.

_CODEBOOK_USED_LEN = 65536  # LlamaGen's codebook-usage queue buffer (VectorQuantizer.codebook_used).
# Fields that decide the parameter shapes; a saved tokenizer must agree with the config on these.
_VQ_ARCH_FIELDS = ("codebook_size", "codebook_embed_dim", "encoder_ch_mult", "decoder_ch_mult", "z_channels", "ch",
                   "num_res_blocks")
_PARAMS_DIR, _CONFIG_FILE = "params", "config.json"


def vq_rules(model: vq_lib.VQModel) -> list[Rule]:
  """LlamaGen VQModel state-dict names for every parameter of the NNX VQModel (the modules share names)."""
  rules = []
  for path in _model_params(model):
    module = ".".join(str(p) for p in path[:-1])
    leaf = path[-1]
    if path == ("quantize", "codebook"):
      rules.append(Rule("quantize.embedding.weight", path))
    elif leaf == "kernel":
      rules.append(Rule(f"{module}.weight", path, conv_kernel_to_nnx, conv_kernel_to_torch))
    elif leaf == "scale":  # GroupNorm
      rules.append(Rule(f"{module}.weight", path))
    elif leaf == "bias":
      rules.append(Rule(f"{module}.bias", path))
    else:
      raise RuntimeError(f"no torch name for VQ parameter {path}")
  rules.append(Rule("quantize.codebook_used", None,
                    export_value=lambda: np.zeros(_CODEBOOK_USED_LEN, np.float32)))
  return rules


def _abstract_vq(vq_cfg: ml_collections.ConfigDict) -> vq_lib.VQModel:
  """The VQModel's structure, shapes and dtypes without initialising any weight."""
  return nnx.eval_shape(lambda: vq_lib.VQModel(vq_cfg, rngs=nnx.Rngs(0)))


def vq_from_torch(path: PathLike, vq_cfg: ml_collections.ConfigDict, *, key: str | None = None) -> vq_lib.VQModel:
  """A VQModel built from `vq_cfg` with weights from a LlamaGen .pt/.pth/.bin or .safetensors state dict."""
  state_dict = torch_io.load_state_dict(path, key=key)
  model = _abstract_vq(vq_cfg)
  import_params(model, state_dict, vq_rules(model), source=str(path))
  return model


def vq_to_torch(model: vq_lib.VQModel) -> dict[str, np.ndarray]:
  """A state dict that LlamaGen's `VQModel.load_state_dict` accepts strictly (codebook_used as zeros)."""
  return export_params(model, vq_rules(model))


def _vq_config_dict(vq_cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  return json.loads(vq_cfg.to_json())


def save_vq(model: vq_lib.VQModel, vq_cfg: ml_collections.ConfigDict, directory: PathLike) -> str:
  """Writes `directory/params` (Orbax checkpoint of the parameters) and `directory/config.json`.

  config.json is {"vq": <the vq config>, "checksum": params_checksum(model)}; it is written last, so a directory
  with a config.json is complete. Returns the checksum.

  Raises:
    FileExistsError: the directory already holds a saved tokenizer (nothing is overwritten).
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  directory = pathlib.Path(directory).absolute()
  if (directory / _PARAMS_DIR).exists() or (directory / _CONFIG_FILE).exists():
    raise FileExistsError(f"{directory} already holds a saved tokenizer; choose a new directory")
  directory.mkdir(parents=True, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory / _PARAMS_DIR, nnx.state(model, nnx.Param))
  checkpointer.wait_until_finished()
  checksum = vq_lib.params_checksum(model)
  tmp = directory / (_CONFIG_FILE + ".tmp")
  tmp.write_text(json.dumps({"vq": _vq_config_dict(vq_cfg), "checksum": checksum}, indent=1) + "\n")
  os.replace(tmp, directory / _CONFIG_FILE)
  return checksum


def read_saved_vq(directory: PathLike) -> tuple[ml_collections.ConfigDict, str]:
  """The vq config (with `checkpoint` pointing at `directory`) and checksum stored by `save_vq`."""
  directory = pathlib.Path(directory)
  config_file = directory / _CONFIG_FILE
  if not config_file.is_file() or not (directory / _PARAMS_DIR).is_dir():
    raise FileNotFoundError(f"{directory} is not a tokenizer saved by save_vq (no {_CONFIG_FILE} and {_PARAMS_DIR}/)")
  saved = json.loads(config_file.read_text())
  # JSON has no tuples; the config uses them for the channel multipliers.
  fields = {k: tuple(v) if isinstance(v, list) else v for k, v in saved["vq"].items()}
  vq_cfg = ml_collections.ConfigDict(dict(fields, checkpoint=str(directory)))
  return vq_cfg, saved["checksum"]


def _load_vq_dir(directory: pathlib.Path, vq_cfg: ml_collections.ConfigDict) -> vq_lib.VQModel:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  saved_cfg, checksum = read_saved_vq(directory)
  differ = [f"{f} (saved {saved_cfg[f]}, config {vq_cfg[f]})" for f in _VQ_ARCH_FIELDS
            if _normalise(saved_cfg[f]) != _normalise(vq_cfg[f])]
  if differ:
    raise ValueError(f"the tokenizer saved in {directory} does not match the vq config: {', '.join(differ)}")
  model = _abstract_vq(vq_cfg)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        nnx.state(model, nnx.Param))
  restored = ocp.StandardCheckpointer().restore(directory.absolute() / _PARAMS_DIR, target)
  nnx.update(model, restored)
  if vq_lib.params_checksum(model) != checksum:
    raise ValueError(f"the parameters in {directory / _PARAMS_DIR} do not match the checksum in its {_CONFIG_FILE}")
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
  return vq_from_torch(path, vq_cfg)


# ----------------------------------------------------------------------------------------------------------------------
# CLI: python -m npp_jax.convert gpt|vq --src FILE --config CONFIG --out DIR [--key ema] [--config.x=y ...]
#      python -m npp_jax.convert export --checkpoint DIR --out FILE.pt|.safetensors [--raw]

USAGE = ("usage: python -m npp_jax.convert gpt|vq --src FILE --config CONFIG --out DIR [--key ema] "
         "[--config.key=value ...]\n       python -m npp_jax.convert export --checkpoint DIR --out FILE "
         "[--raw]")


def _convert_gpt(src: str, config: ml_collections.ConfigDict, out: str, key: str | None) -> str:
  model = gpt_from_torch(src, config.model, key=key)
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.converted_from = str(src)
  save_gpt(model, config, out)
  return f"wrote {out}: {sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param))):,} parameters"


def _convert_vq(src: str, config: ml_collections.ConfigDict, out: str, key: str | None) -> str:
  checksum = save_vq(vq_from_torch(src, config.vq, key=key), config.vq, out)
  return f"wrote {out} (params checksum {checksum})"


def _export(directory: str, out: str, raw: bool) -> str:
  """A trained or converted model directory back to a PyTorch state dict ({"model": sd} unless raw)."""
  from npp_jax import checkpoint  # pylint: disable=g-import-not-at-top

  model, _ = checkpoint.load_model(directory, ema=False)
  torch_io.save_state_dict(gpt_to_torch(model), out, container=None if raw else "model")
  return f"wrote {out}"


def main(argv: Sequence[str]) -> int:
  """The CLI; argv as sys.argv. Returns the exit status; a user error prints one line to stderr."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from npp_jax import config as config_lib  # pylint: disable=g-import-not-at-top

  argv = list(argv)
  if len(argv) < 2 or argv[1] not in ("gpt", "vq", "export"):
    print(USAGE, file=sys.stderr)
    return 2
  command, argv = argv[1], [argv[0]] + argv[2:]
  fv = flags.FlagValues()
  flags.DEFINE_string("src", None, "LlamaGen/NPP checkpoint (.pt/.pth/.bin or .safetensors).", flag_values=fv)
  flags.DEFINE_string("out", None, "Directory (gpt, vq) or file (export) to write.", flag_values=fv)
  flags.DEFINE_string("key", None, "Checkpoint container entry to read (e.g. ema); default model.", flag_values=fv)
  flags.DEFINE_string("checkpoint", None, "Model directory to export.", flag_values=fv)
  flags.DEFINE_bool("raw", False, "Export a bare state dict instead of {'model': ...}.", flag_values=fv)
  # sys_argv: config_flags finds the --config.* overrides there (it would read sys.argv otherwise).
  config_flags.DEFINE_config_file("config", None, "Config file.", flag_values=fv, sys_argv=argv)
  try:
    config_lib.check_config_argument(argv)
    try:
      fv(argv)
    except (KeyError, AttributeError) as e:  # ConfigDict's answer to an override of a field it does not have.
      raise ValueError(f"unknown config field {str(e).strip(chr(34))} in a --config override") from None
    required = ("checkpoint", "out") if command == "export" else ("src", "out", "config")
    for name in required:
      if fv[name].value is None:
        raise ValueError(f"--{name} is required")
    if command == "export":
      message = _export(fv.checkpoint, fv.out, fv.raw)
    else:
      section = "model" if command == "gpt" else "vq"
      if section not in fv.config:
        raise ValueError(f"the config {fv['config'].config_filename} has no {section} section")
      message = (_convert_gpt if command == "gpt" else _convert_vq)(fv.src, fv.config, fv.out, fv.key)
  except (flags.Error, ValueError, OSError) as e:
    print("error: " + " ".join(str(e).split()), file=sys.stderr)  # One line, even for multi-line messages.
    return 1
  print(message)
  return 0


def main_vq(argv: Sequence[str]) -> int:
  """`python -m npp_jax.convert vq ...` with argv as sys.argv (program name first)."""
  return main([argv[0], "vq", *argv[1:]])


if __name__ == "__main__":
  sys.exit(main(sys.argv))
