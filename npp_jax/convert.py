"""PyTorch checkpoints <-> native model directories.

  python -m npp_jax.convert gpt|vq --src FILE --config CONFIG --out DIR [--key ema] [--config.x=y ...]
  python -m npp_jax.convert export --checkpoint DIR --out FILE.pt|.safetensors [--raw]

`export` takes a GPT model directory or a saved tokenizer (e.g. a tokenizer trainer's WORKDIR/tokenizer). The name
and shape rules are `npp_jax.model_files.param_mapping`'s; every key is used, none is missing, every shape is
checked.
"""

from __future__ import annotations

import functools
import pathlib
import sys
from typing import Sequence

import jax
import ml_collections
from absl import flags
from flax import nnx

from npp_jax import cli
from npp_jax import config_schema
from npp_jax import errors
from npp_jax.model_files import param_mapping
from npp_jax.model_files import store
from npp_jax.model_files import torch_io


USAGE = ("usage: python -m npp_jax.convert gpt|vq --src FILE --config CONFIG --out DIR [--key ema] "
         "[--config.key=value ...]\n       python -m npp_jax.convert export --checkpoint DIR --out FILE "
         "[--raw]")


def _convert_gpt(src: str, config: ml_collections.ConfigDict, out: str, key: str | None) -> str:
  model = param_mapping.gpt_from_torch(src, config.model, key=key)
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.converted_from = str(src)
  store.save_gpt(model, config, out)
  return f"wrote {out}: {sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param))):,} parameters"


def _convert_vq(src: str, config: ml_collections.ConfigDict, out: str, key: str | None) -> str:
  checksum = store.save_vq(param_mapping.vq_from_torch(src, config.vq, key=key), config.vq, out)
  return f"wrote {out} (params checksum {checksum})"


def _export(directory: str, out: str, raw: bool) -> str:
  """A trained or converted model directory, or a saved tokenizer, back to a PyTorch state dict ({"model": sd}
  unless raw)."""
  if (pathlib.Path(directory) / store.VQ_PARAMS_DIR).is_dir():  # a saved tokenizer (store.save_vq)
    state_dict = param_mapping.vq_to_torch(store.load_vq(store.read_saved_vq(directory)[0]))
  else:
    state_dict = param_mapping.gpt_to_torch(store.load_model(directory, ema=False)[0])
  torch_io.save_state_dict(state_dict, out, container=None if raw else "model")
  return f"wrote {out}"


COMMANDS = ("gpt", "vq", "export")


def define_flags(fv: flags.FlagValues, argv: list[str]) -> None:
  cli.define_config(fv, argv, "Config file (gpt, vq): its `model` or `vq` section builds the model.",
                    config_schema.MODEL_ONLY)
  flags.DEFINE_string("src", None, "LlamaGen/NPP checkpoint (.pt/.pth/.bin or .safetensors).", flag_values=fv)
  flags.DEFINE_string("out", None, "Directory (gpt, vq) or file (export) to write.", flag_values=fv)
  flags.DEFINE_string("key", None, "Checkpoint container entry to read (e.g. ema); default model.", flag_values=fv)
  flags.DEFINE_string("checkpoint", None, "Model directory to export.", flag_values=fv)
  flags.DEFINE_bool("raw", False, "Export a bare state dict instead of {'model': ...}.", flag_values=fv)


def _run(command: str, fv: flags.FlagValues) -> str:
  required = ("checkpoint", "out") if command == "export" else ("src", "out", "config")
  for name in required:
    if fv[name].value is None:
      raise errors.InvalidInput(f"--{name} is required for `convert {command}`")
  if command == "export":
    return _export(fv.checkpoint, fv.out, fv.raw)
  section = "model" if command == "gpt" else "vq"
  if section not in fv.config:
    raise errors.InvalidInput(f"the config {fv['config'].config_filename} has no {section} section")
  return (_convert_gpt if command == "gpt" else _convert_vq)(fv.src, fv.config, fv.out, fv.key)


def main(argv: Sequence[str] | None = None) -> int:
  """The CLI; argv as sys.argv (program name, then the subcommand). Returns the exit status."""
  commands = {command: functools.partial(_run, command) for command in COMMANDS}
  return cli.main_with_commands(commands, define_flags, argv, doc=__doc__ + "\n" + USAGE)


if __name__ == "__main__":
  sys.exit(main())
