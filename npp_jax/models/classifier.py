"""A small Fashion-MNIST CNN (Flax NNX) for the online metric: logits and a feature vector per image.

Inputs are what the default pipeline generates: 32x32 RGB images (Fashion-MNIST's 28x28 grayscale centred on a
black 32x32 canvas, replicated over the channels), NHWC, float in [-1, 1] or uint8. The network keeps all three
channels, so colour artefacts in generated images move the features even though training images are gray.

Architecture (`arch` dict, stored beside the weights): a 2x2 space-to-depth (32x32x3 -> 16x16x12: XLA's CPU
convolutions are slow at full resolution with few channels, and 28x28 garments need no per-pixel filters), then
stages of 3x3 convs with ReLU, each stage ending in a 2x2 max pool (16 -> 8 -> 4), then flatten, a dense layer of
`feature_dim` units whose pre-activation output is the feature vector, ReLU, and a dense layer to the logits. The
features are taken before the ReLU so that no unit is stuck at zero on every image, which would make their
covariance (and the Frechet distance's square root) singular.

Weights ship as `npp_jax/assets/fashion_classifier/`: `params.npz` (the flat parameter dict, keys joined by '/'),
`meta.json` (architecture, sha256 of both .npz files, test accuracy, training recipe) and `test_stats.npz` (mean and
covariance of the features of the 10,000 Fashion-MNIST test images), written by `npp_jax.train_classifier`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

IMAGE_SIZE = 32
NUM_CLASSES = 10
DEFAULT_ARCH = {"space_to_depth": 2, "stages": [[32], [64, 64]], "feature_dim": 128, "num_classes": NUM_CLASSES,
                "image_size": IMAGE_SIZE}
DEFAULT_DIR = pathlib.Path(__file__).resolve().parents[1] / "assets" / "fashion_classifier"
PARAMS_FILE = "params.npz"
META_FILE = "meta.json"
STATS_FILE = "test_stats.npz"


def to_model_input(images: Any) -> jax.Array:
  """NHWC images as float32 in [-1, 1]: uint8 maps by x / 127.5 - 1 (the encoder's normalisation).

  Floats are clipped to [-1, 1]: a VQ decoder overshoots a little, and the saved images are clipped too.
  """
  dtype = images.dtype
  if dtype == jnp.uint8:
    return images.astype(jnp.float32) / 127.5 - 1.0
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"classifier images must be uint8 or float in [-1, 1], got {dtype}")
  return jnp.clip(images.astype(jnp.float32), -1.0, 1.0)


def space_to_depth(x: jax.Array, block: int) -> jax.Array:
  """(N, H, W, C) -> (N, H/b, W/b, b*b*C); channel index (dy * b + dx) * C + c."""
  n, h, w, c = x.shape
  x = x.reshape(n, h // block, block, w // block, block, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, h // block, w // block, block * block * c)


class FashionClassifier(nnx.Module):
  """Space-to-depth, conv stages (3x3 convs + ReLU, then a 2x2 max pool), a feature layer, a linear classifier."""

  def __init__(self, stages=DEFAULT_ARCH["stages"], feature_dim: int = DEFAULT_ARCH["feature_dim"],
               num_classes: int = NUM_CLASSES, image_size: int = IMAGE_SIZE,
               space_to_depth: int = DEFAULT_ARCH["space_to_depth"], *, rngs: nnx.Rngs):
    if image_size % (space_to_depth * 2 ** len(stages)):
      raise ValueError(f"image_size {image_size} must be divisible by {space_to_depth} * 2**{len(stages)}")
    self.block = space_to_depth
    self.pool_after = tuple(itertools.accumulate(len(stage) for stage in stages))
    convs, in_ch = [], 3 * space_to_depth ** 2
    for width in itertools.chain(*stages):
      convs.append(nnx.Conv(in_ch, width, (3, 3), rngs=rngs))
      in_ch = width
    self.convs = nnx.List(convs)
    side = image_size // (space_to_depth * 2 ** len(stages))
    self.features = nnx.Linear(side * side * in_ch, feature_dim, rngs=rngs)
    self.head = nnx.Linear(feature_dim, num_classes, rngs=rngs)

  def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(N, H, W, 3) uint8 or float in [-1, 1] -> (logits (N, classes), features (N, feature_dim)), float32."""
    x = space_to_depth(to_model_input(images), self.block)
    for i, conv in enumerate(self.convs):
      x = jax.nn.relu(conv(x))
      if i + 1 in self.pool_after:
        x = nnx.max_pool(x, (2, 2), strides=(2, 2))
    features = self.features(x.reshape(x.shape[0], -1))
    return self.head(jax.nn.relu(features)), features


def build(arch: dict, seed: int = 0) -> FashionClassifier:
  return FashionClassifier(arch["stages"], arch["feature_dim"], arch["num_classes"], arch["image_size"],
                           arch["space_to_depth"], rngs=nnx.Rngs(seed))


def flat_params(model: FashionClassifier) -> dict[str, np.ndarray]:
  """{'convs/0/kernel': array, ...}: the parameters as one flat dict of numpy arrays."""
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  return {"/".join(str(k) for k in path): np.asarray(var[...]) for path, var in flat}


def file_sha256(path: str | os.PathLike) -> str:
  return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def save_classifier(directory: str | os.PathLike, model: FashionClassifier, arch: dict, extra_meta: dict,
                    test_features: np.ndarray) -> dict:
  """Writes params.npz, test_stats.npz (mean/cov of `test_features`) and meta.json (with checksums); returns meta."""
  from npp_jax import evaluation  # pylint: disable=g-import-not-at-top

  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  np.savez(directory / PARAMS_FILE, **flat_params(model))
  stats = evaluation.compute_statistics(np.asarray(test_features, np.float64))
  np.savez(directory / STATS_FILE, mu=stats.mu, sigma=stats.sigma, n=np.int64(len(test_features)))
  meta = {"arch": arch, **extra_meta,
          "sha256": {PARAMS_FILE: file_sha256(directory / PARAMS_FILE),
                     STATS_FILE: file_sha256(directory / STATS_FILE)}}
  tmp = directory / (META_FILE + ".tmp")
  tmp.write_text(json.dumps(meta, indent=1) + "\n")
  tmp.replace(directory / META_FILE)
  return meta


def _read_meta(directory: pathlib.Path) -> dict:
  path = directory / META_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{directory} holds no classifier: {META_FILE} not found "
                            "(train one with `python -m npp_jax.train_classifier --out DIR`)")
  return json.loads(path.read_text())


def _checked_file(directory: pathlib.Path, name: str, meta: dict) -> pathlib.Path:
  """The path of `name`, after checking that its sha256 is the one meta.json records."""
  path = directory / name
  if not path.is_file():
    raise FileNotFoundError(f"classifier file {path} not found")
  expected = meta.get("sha256", {}).get(name)
  if expected != file_sha256(path):
    raise ValueError(f"{path} does not match the sha256 in {directory / META_FILE}; the file is damaged or stale")
  return path


def load_classifier(directory: str | os.PathLike = DEFAULT_DIR) -> tuple[FashionClassifier, dict]:
  """The classifier stored in `directory` (default: the shipped one) and its meta.json dict; checks checksums."""
  directory = pathlib.Path(directory)
  meta = _read_meta(directory)
  with np.load(_checked_file(directory, PARAMS_FILE, meta)) as npz:
    stored = {k: npz[k] for k in npz.files}
  model = build(meta["arch"])
  expected = flat_params(model)
  if set(stored) != set(expected) or any(stored[k].shape != v.shape for k, v in expected.items()):
    raise ValueError(f"{directory / PARAMS_FILE} does not hold the parameters of the architecture in {META_FILE}")
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  nnx.update(model, nnx.from_flat_state({path: var.replace(jnp.asarray(stored["/".join(map(str, path))]))
                                         for path, var in flat}))
  return model, meta


def load_reference_stats(directory: str | os.PathLike = DEFAULT_DIR) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) of the classifier's features over the Fashion-MNIST test set, as shipped beside the weights."""
  directory = pathlib.Path(directory)
  with np.load(_checked_file(directory, STATS_FILE, _read_meta(directory))) as npz:
    return npz["mu"], npz["sigma"]


def make_apply_fn(model: FashionClassifier) -> Callable[[Any], tuple[jax.Array, jax.Array]]:
  """A jitted fn(images) -> (logits, features) with the parameters bound (compiled once per input shape/dtype)."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, images):
    return nnx.merge(graphdef, state)(images)

  return lambda images: forward(state, images)
