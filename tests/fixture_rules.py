"""Fixture arrays rebuilt from the rules their READMEs document, instead of being stored.

Three sets are regenerated:
  * the FID Inception's random weights (fixtures/fid/README.md, "Weight rule"; checked by the `sum_float64` of
    every entry of weights_spec.json);
  * the ADM evaluator's input activations (fixtures/fid/adm_metrics.json, `data.recipe`; checked against the
    sha256 of the arrays of the original adm_metrics_io.npz, which held them before they were dropped from it);
  * LPIPS-VGG16's and the PatchGAN discriminator's random weights (fixtures/tokenizer_losses/README.md), which the
    fixture script there gave to the reference code (VGG16 alone would be 59 MB).
What stays stored is what the reference code computed from them (fixtures/README.md).
"""

from __future__ import annotations

import hashlib

import numpy as np

# sha256 of the C-order bytes of each activation array as the reference run stored it.
ADM_ACTIVATION_SHA256 = {
    "ref_pool": "79f77aa5a2bf64ff573f9ac2f4e114c5254ba18bf09ba725a9f7657f56422cfc",
    "sample_pool": "b92e33aa641c7c3dc0eb1137b70dcf99ec852b1160302a4be607cd2fd730c70f",
    "ref_spatial": "8600d397008c8045abca6e8f49d9fe2e551dde586b401e7a0d14edd8297579a2",
    "sample_spatial": "815ccf8395a6c86a5be1c6987321b387b0e143dca911a6aa96327b315e6d22d6",
    "pr_robust_ref": "385f844a6a92fddcafc4722cff56c7f13c5ee25e87be9e3a9e29254c134654bc",
    "pr_robust_sample": "acfa429a916a30dc74c119646f7e9bcb3b2510d92161f2e1eb0dfdbef98f3094",
}


def array_sha256(array: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def fid_state_dict(spec: dict) -> dict[str, np.ndarray]:
  """pytorch-fid's state dict with the fixture's random weights (fixtures/fid/README.md, "Weight rule")."""
  sd = {}
  for entry in spec["keys"]:
    kind = entry["kind"]
    if kind == "bn_num_batches_tracked":
      sd[entry["key"]] = np.zeros((), np.int64)  # No draw, but its index still counts.
      continue
    n = np.random.default_rng(1000 + entry["index"]).standard_normal(tuple(entry["shape"]))
    if kind in ("conv_weight", "fc_weight"):
      value = n * np.sqrt(2.0 / entry["fan_in"])
    elif kind == "bn_weight":
      value = 1.0 + 0.1 * n
    elif kind == "bn_running_var":
      value = 1.0 + 0.1 * np.abs(n)
    else:  # bn_bias, bn_running_mean, fc_bias
      value = 0.1 * n
    sd[entry["key"]] = value.astype(np.float32)
  return sd


def _float16_grid(x: np.ndarray) -> np.ndarray:
  return x.astype(np.float16).astype(np.float32)


def adm_activations(data: dict) -> dict[str, np.ndarray]:
  """The activation sets given to ADM's evaluator, from `data` = adm_metrics.json's "data" (seed, sizes, recipe).

  The draws follow `data.recipe` in its order; each array is rounded to the float16 grid and stored as float32.
  """
  seed, n_ref, n_sample = data["seed"], data["N_ref"], data["N_sample"]
  pool_dim, spatial_dim = data["pool_dim"], data["spatial_dim"]
  rng = np.random.default_rng(seed)
  normal = rng.standard_normal
  a = normal((48, pool_dim)) / np.sqrt(48)
  b = normal((48, pool_dim)) / np.sqrt(48)
  mu_r = 0.4 + 0.1 * normal(pool_dim)
  mu_s = mu_r + 0.05 * normal(pool_dim) + 0.02
  ref_pool = mu_r + 0.6 * normal((n_ref, 48)) @ a + 0.25 * normal((n_ref, pool_dim))
  sample_pool = mu_s + 0.7 * normal((n_sample, 48)) @ (0.9 * a + 0.3 * b) + 0.3 * normal((n_sample, pool_dim))
  c = normal((32, spatial_dim)) / np.sqrt(32)
  e = normal((32, spatial_dim)) / np.sqrt(32)
  nu_r = 0.2 * normal(spatial_dim)
  nu_s = nu_r + 0.1 * normal(spatial_dim)
  ref_spatial = np.maximum(nu_r + 0.8 * normal((n_ref, 32)) @ c + 0.4 * normal((n_ref, spatial_dim)), 0)
  sample_spatial = np.maximum(
      nu_s + 0.8 * normal((n_sample, 32)) @ (0.8 * c + 0.4 * e) + 0.5 * normal((n_sample, spatial_dim)), 0)

  # The precision/recall case with large margins: 10 clusters of 30 reference points; the samples are 180 of them
  # slightly moved plus 70 points around 3 new centres.
  rng = np.random.default_rng(seed + 1)
  centers = 3 * rng.standard_normal((10, 64))
  pr_ref = np.concatenate([center + 0.5 * rng.standard_normal((30, 64)) for center in centers])
  moved = pr_ref[:180] + 0.01 * rng.standard_normal((180, 64))
  new_centers = 3 * rng.standard_normal((3, 64))
  pr_sample = np.concatenate([moved] + [center + 0.5 * rng.standard_normal((n, 64))
                                        for center, n in zip(new_centers, (24, 23, 23))])
  arrays = dict(ref_pool=ref_pool, sample_pool=sample_pool, ref_spatial=ref_spatial, sample_spatial=sample_spatial,
                pr_robust_ref=pr_ref, pr_robust_sample=pr_sample)
  return {name: _float16_grid(value) for name, value in arrays.items()}


# ----------------------------------------------------------------------------------------------------------------------
# fixtures/tokenizer_losses: LPIPS-VGG16 and the PatchGAN discriminator on random weights (its README, "Weight rule").

# (torch index in vgg16.features, in channels, out channels), as torchvision's vgg16 up to relu5_3.
VGG16_CONVS = ((0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256), (14, 256, 256),
               (17, 256, 512), (19, 512, 512), (21, 512, 512), (24, 512, 512), (26, 512, 512), (28, 512, 512))
LPIPS_CHANNELS = (64, 128, 256, 512, 512)


def _draw(seed: int, index: int, shape: tuple[int, ...]) -> np.ndarray:
  return np.random.default_rng((seed, index)).standard_normal(shape)


def lpips_state_dicts(seed: int = 24) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """(torchvision vgg16 `features.*` state dict, LPIPS heads `lin<k>.model.1.weight`), float32.

  Key i of the list [features.0.weight, features.0.bias, ..., features.28.bias, lin0..lin4] is drawn from
  default_rng((seed, i)).standard_normal: conv weights x sqrt(2 / fan_in), conv biases x 0.1, heads |draw| / channels.
  """
  keys = []
  for index, cin, cout in VGG16_CONVS:
    keys += [(f"features.{index}.weight", (cout, cin, 3, 3), "conv", cin * 9), (f"features.{index}.bias", (cout,),
                                                                                 "bias", 0)]
  keys += [(f"lin{k}.model.1.weight", (1, c, 1, 1), "head", c) for k, c in enumerate(LPIPS_CHANNELS)]
  vgg, heads = {}, {}
  for i, (key, shape, kind, fan_in) in enumerate(keys):
    n = _draw(seed, i, shape)
    value = {"conv": lambda: n * np.sqrt(2.0 / fan_in), "bias": lambda: 0.1 * n,
             "head": lambda: np.abs(n) / fan_in}[kind]()
    (heads if kind == "head" else vgg)[key] = value.astype(np.float32)
  return vgg, heads


def patchgan_state_dict(seed: int = 25, ndf: int = 64, n_layers: int = 3, in_channels: int = 3
                        ) -> dict[str, np.ndarray]:
  """NLayerDiscriminator(in_channels, ndf, n_layers).state_dict() keys, in its order, with random values.

  Key i is drawn from default_rng((seed, i)).standard_normal: conv weights x sqrt(1 / fan_in), conv biases x 0.1,
  norm weights 1 + 0.1 x draw, norm biases and running means 0.1 x draw, running vars 1 + 0.1 x |draw|;
  num_batches_tracked is int64 0 (no draw, but its index counts).
  """
  widths = [ndf * min(2 ** n, 8) for n in range(n_layers + 1)]
  layers = [(0, in_channels, ndf, True)]  # (main index, in, out, bias); a norm follows every bias-free conv
  i = 2
  for n in range(1, n_layers + 1):
    layers.append((i, widths[n - 1], widths[n], False))
    i += 3
  layers.append((i, widths[n_layers], 1, True))
  keys = []
  for index, cin, cout, bias in layers:
    keys.append((f"main.{index}.weight", (cout, cin, 4, 4), "conv", cin * 16))
    if bias:
      keys.append((f"main.{index}.bias", (cout,), "bias", 0))
    else:
      norm = index + 1
      keys += [(f"main.{norm}.weight", (cout,), "norm_weight", 0), (f"main.{norm}.bias", (cout,), "bias", 0),
               (f"main.{norm}.running_mean", (cout,), "bias", 0), (f"main.{norm}.running_var", (cout,), "var", 0),
               (f"main.{norm}.num_batches_tracked", (), "count", 0)]
  sd = {}
  for i, (key, shape, kind, fan_in) in enumerate(keys):
    if kind == "count":
      sd[key] = np.zeros((), np.int64)
      continue
    n = _draw(seed, i, shape)
    value = {"conv": lambda: n * np.sqrt(1.0 / fan_in), "bias": lambda: 0.1 * n, "norm_weight": lambda: 1 + 0.1 * n,
             "var": lambda: 1 + 0.1 * np.abs(n)}[kind]()
    sd[key] = value.astype(np.float32)
  return sd
