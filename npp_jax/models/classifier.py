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

Weights ship as `npp_jax/assets/fashion_classifier/`, a directory that `npp_jax.model_files.store.save_classifier`
writes and `load_classifier` reads (written by `npp_jax.train_classifier`).
"""

from __future__ import annotations

import itertools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from npp_jax import errors

IMAGE_SIZE = 32
NUM_CLASSES = 10
DEFAULT_ARCH = {"space_to_depth": 2, "stages": [[32], [64, 64]], "feature_dim": 128, "num_classes": NUM_CLASSES,
                "image_size": IMAGE_SIZE}


def to_model_input(images: Any) -> jax.Array:
  """NHWC images as float32 in [-1, 1]: uint8 maps by x / 127.5 - 1 (the encoder's normalisation).

  Floats are clipped to [-1, 1]: a VQ decoder overshoots a little, and the saved images are clipped too.
  """
  dtype = images.dtype
  if dtype == jnp.uint8:
    return images.astype(jnp.float32) / 127.5 - 1.0
  if not jnp.issubdtype(dtype, jnp.floating):
    raise errors.InvalidInput(f"classifier images must be uint8 or float in [-1, 1], got {dtype}")
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
      raise errors.InvalidInput(f"image_size {image_size} must be divisible by {space_to_depth} * 2**{len(stages)}")
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
    features = self.activations(to_model_input(images))[-1]
    return self.head(jax.nn.relu(features)), features

  def activations(self, x: jax.Array) -> list[jax.Array]:
    """Float images (N, H, W, 3), not clipped (so gradients pass) -> every conv's ReLU output (N, h, w, C), then
    the features (N, feature_dim)."""
    x = space_to_depth(x.astype(jnp.float32), self.block)
    taps = []
    for i, conv in enumerate(self.convs):
      x = jax.nn.relu(conv(x))
      taps.append(x)
      if i + 1 in self.pool_after:
        x = nnx.max_pool(x, (2, 2), strides=(2, 2))
    taps.append(self.features(x.reshape(x.shape[0], -1)))
    return taps


def build(arch: dict, seed: int = 0) -> FashionClassifier:
  return FashionClassifier(arch["stages"], arch["feature_dim"], arch["num_classes"], arch["image_size"],
                           arch["space_to_depth"], rngs=nnx.Rngs(seed))


def flat_params(model: FashionClassifier) -> dict[str, np.ndarray]:
  """{'convs/0/kernel': array, ...}: the parameters as one flat dict of numpy arrays."""
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  return {"/".join(str(k) for k in path): np.asarray(var[...]) for path, var in flat}


def make_apply_fn(model: FashionClassifier) -> Callable[[Any], tuple[jax.Array, jax.Array]]:
  """A jitted fn(images) -> (logits, features) with the parameters bound (compiled once per input shape/dtype)."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, images):
    return nnx.merge(graphdef, state)(images)

  return lambda images: forward(state, images)
