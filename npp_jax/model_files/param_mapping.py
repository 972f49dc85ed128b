"""PyTorch <-> NNX weight conversion, strict: every key used, none missing, every shape checked.

A conversion is a list of `Rule`s, one per torch state-dict key: the NNX parameter path it fills and the numpy
transform between the two layouts (and its inverse, for export). Buffers the NNX model does not hold (LlamaGen's
`quantize.codebook_used`) are rules without a path. `import_params` checks a state dict against the rules and the
config-built model and reports every problem in one ValueError; `export_params` is the exact inverse.

This module holds that machinery, the GPT's and the VQ tokenizer's rules (`gpt_from_torch`, `gpt_to_torch`,
`vq_from_torch`, `vq_to_torch`), pytorch-fid's Inception weights (`inception_from_torch`), and the tokenizer
trainer's loss networks: LPIPS-VGG16 (`lpips_from_torch`) and the PatchGAN discriminator (`patchgan_rules`). It
imports no checkpoint or model-directory module; the command line is `npp_jax.convert`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping, Sequence

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from npp_jax import errors
from npp_jax.model_files import torch_io
from npp_jax.models import gpt
from npp_jax.models import inception
from npp_jax.models import lpips as lpips_lib
from npp_jax.models import patchgan
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
    raise errors.InvalidInput(f"{source} does not match the model built from the config; " + "; ".join(problems))
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
  state_dict = torch_io.load_state_dict(path, key=key)
  model = nnx.eval_shape(lambda: gpt.GPT(model_cfg, rngs=nnx.Rngs(0)))
  import_params(model, state_dict, gpt_rules(model_cfg), source=str(path))
  return model


def gpt_to_torch(model) -> dict[str, np.ndarray]:
  """A state dict that LlamaGen's `Transformer.load_state_dict` accepts strictly."""
  return export_params(model, gpt_rules(model.cfg))


# ----------------------------------------------------------------------------------------------------------------------
# The VQ tokenizer.

_CODEBOOK_USED_LEN = 65536  # LlamaGen's codebook-usage queue buffer (VectorQuantizer.codebook_used).


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


def vq_from_torch(path: PathLike, vq_cfg: ml_collections.ConfigDict, *, key: str | None = None) -> vq_lib.VQModel:
  """A VQModel built from `vq_cfg` with weights from a LlamaGen .pt/.pth/.bin or .safetensors state dict."""
  state_dict = torch_io.load_state_dict(path, key=key)
  model = vq_lib.abstract_model(vq_cfg)
  import_params(model, state_dict, vq_rules(model), source=str(path))
  return model


def vq_to_torch(model: vq_lib.VQModel) -> dict[str, np.ndarray]:
  """A state dict that LlamaGen's `VQModel.load_state_dict` accepts strictly (codebook_used as zeros)."""
  return export_params(model, vq_rules(model))


# ----------------------------------------------------------------------------------------------------------------------
# pytorch-fid's FID Inception (npp_jax.models.inception).

# Our leaf name -> (torch key suffix, layout change), for the leaves of a BasicConv.
_INCEPTION_CONV_LEAVES = {
    "kernel": ("conv.weight", lambda w: w.transpose(2, 3, 1, 0)),  # OIHW -> HWIO
    "scale": ("bn.weight", None),
    "bias": ("bn.bias", None),
    "mean": ("bn.running_mean", None),
    "var": ("bn.running_var", None),
}
_INCEPTION_TOP_LEAVES = {"fc_kernel": ("fc.weight", lambda w: w.T), "fc_bias": ("fc.bias", None)}


def _inception_torch_name(path: Sequence) -> tuple[str, Callable | None]:
  """Our parameter path -> (its torch key, the function that turns the torch array into ours)."""
  path = [str(p) for p in path]
  if len(path) == 1:
    return _INCEPTION_TOP_LEAVES[path[0]]
  suffix, transform = _INCEPTION_CONV_LEAVES[path[-1]]
  return ".".join(path[:-1] + [suffix]), transform


def inception_from_torch(source: str | os.PathLike | Mapping[str, np.ndarray], **kwargs) -> inception.InceptionV3:
  """Builds the FID Inception from pytorch-fid's state dict (a path to the .pth file, or the dict itself).

  Strict: every torch key must be used and every shape must match; `*.num_batches_tracked` is ignored.
  `kwargs` go to `InceptionV3` (preprocessing, precision).

  Raises:
    FileNotFoundError: the weight file does not exist.
    ValueError: the file is unreadable, or keys are missing, unexpected or mis-shaped (all named in one message).
  """
  if isinstance(source, Mapping):
    state_dict, where = source, "the state dict"
  else:
    state_dict, where = torch_io.load_state_dict(source), f"Inception weight file {source}"
  state_dict = {k: v for k, v in state_dict.items() if not k.endswith(".num_batches_tracked")}
  model = nnx.eval_shape(lambda: inception.InceptionV3(**kwargs))  # Shapes only: the values come from the state dict.
  variables = {}
  for path, var in nnx.to_flat_state(nnx.state(model)):
    key, transform = _inception_torch_name(path)
    variables[key] = (var, transform)

  missing = [k for k in variables if k not in state_dict]
  unexpected = [k for k in state_dict if k not in variables]
  misshaped = []
  for key, (var, transform) in variables.items():
    if key in state_dict:
      value = np.asarray(state_dict[key])
      value = transform(value) if transform else value
      if value.shape != var.shape:
        misshaped.append(f"{key} {tuple(np.asarray(state_dict[key]).shape)}")
  problems = []
  if missing:
    problems.append(f"missing {_name_keys(sorted(missing))}")
  if unexpected:
    problems.append(f"unexpected {_name_keys(sorted(unexpected))}")
  if misshaped:
    problems.append(f"wrongly shaped {_name_keys(sorted(misshaped))}")
  if problems:
    raise errors.InvalidInput(f"{where} is not pytorch-fid's FID Inception ({'; '.join(problems)})")

  for key, (var, transform) in variables.items():
    value = np.asarray(state_dict[key], dtype=np.float32)
    var.set_value(jnp.asarray(transform(value) if transform else value))
  return model


# ----------------------------------------------------------------------------------------------------------------------
# The tokenizer trainer's loss networks: LPIPS (torchvision vgg16 + LPIPS heads) and the PatchGAN discriminator.

_VGG16_HEAD_PREFIX = "classifier."  # torchvision's vgg16 classifier head, which LPIPS does not use


def lpips_rules() -> list[Rule]:
  """torchvision `features.<i>` names for the VGG convolutions, LPIPS `lin<k>.model.1` names for the heads."""
  rules = []
  for i, (index, _, _) in enumerate(lpips_lib.VGG16_CONVS):
    rules.append(Rule(f"features.{index}.weight", ("net", "convs", i, "kernel"), conv_kernel_to_nnx,
                      conv_kernel_to_torch))
    rules.append(Rule(f"features.{index}.bias", ("net", "convs", i, "bias")))
  for k in range(len(lpips_lib.TAP_CHANNELS)):
    rules.append(Rule(f"lin{k}.model.1.weight", ("lins", k, "kernel"), conv_kernel_to_nnx, conv_kernel_to_torch))
  return rules


def lpips_from_torch(vgg_path: PathLike, heads_path: PathLike) -> lpips_lib.LPIPS:
  """LPIPS from torchvision's vgg16 state dict (`features.*`; `classifier.*` is read past) and LPIPS's vgg.pth.

  Raises:
    InvalidInput: an empty path, or files whose keys or shapes are not those two state dicts (one sentence).
    FileNotFoundError: a file does not exist.
  """
  for what, path in (("torchvision's vgg16 state dict", vgg_path), ("LPIPS's vgg.pth (the linear heads)", heads_path)):
    if not str(path):
      raise errors.InvalidInput(f"LPIPS needs {what}: give its path (nothing is downloaded)")
  vgg = {k: v for k, v in torch_io.load_state_dict(vgg_path).items() if not k.startswith(_VGG16_HEAD_PREFIX)}
  heads = torch_io.load_state_dict(heads_path)  # (the two files are merged, so their order does not matter)
  model = nnx.eval_shape(lambda: lpips_lib.LPIPS(nnx.Rngs(0)))
  import_params(model, {**vgg, **heads}, lpips_rules(),
                source=f"the LPIPS weights ({vgg_path} and {heads_path})")
  return model


def patchgan_rules(n_layers: int) -> list[Rule]:
  """The reference's `main.<i>` names of the PatchGAN's convs and norms; the norms' running statistics are buffers
  this port does not keep (read past on import, not written on export)."""
  conv_at, norm_at = patchgan.torch_indices(n_layers)
  rules = []
  for i, index in enumerate(conv_at):
    rules.append(Rule(f"main.{index}.weight", ("convs", i, "kernel"), conv_kernel_to_nnx, conv_kernel_to_torch))
    if i in (0, len(conv_at) - 1):  # only the first and the last conv have a bias
      rules.append(Rule(f"main.{index}.bias", ("convs", i, "bias")))
  for j, index in enumerate(norm_at):
    rules += [Rule(f"main.{index}.weight", ("norms", j, "scale")), Rule(f"main.{index}.bias", ("norms", j, "bias"))]
    rules += [Rule(f"main.{index}.{buffer}", None) for buffer in ("running_mean", "running_var", "num_batches_tracked")]
  return rules


def patchgan_from_state_dict(state_dict: Mapping[str, np.ndarray], *, in_channels: int = 3, ndf: int = 64,
                             n_layers: int = 3, source: str = "the discriminator state dict") -> patchgan.PatchGAN:
  """A PatchGAN with the weights of the reference's `NLayerDiscriminator.state_dict()` (strict)."""
  model = nnx.eval_shape(lambda: patchgan.PatchGAN(in_channels, ndf, n_layers, rngs=nnx.Rngs(0)))
  import_params(model, dict(state_dict), patchgan_rules(n_layers), source=source)
  return model
