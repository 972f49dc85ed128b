"""The FID Inception-v3 in Flax NNX: pytorch-fid's port of TensorFlow's 2015-12-05 Inception graph.

This is torchvision's `Inception3` (1008 classes, no aux head) with the blocks pytorch-fid patches in: average pools
that exclude the zero padding (as TF's do) and a max pool in Mixed_7c's pool branch. Every conv is a BasicConv:
conv without bias, BatchNorm in inference mode (eps 1e-3, running statistics), ReLU. Layout NHWC, float32.

Inputs are uint8 images (any size, NHWC). Two preprocessings are offered:
  "pytorch_fid": x/255, bilinear resize to 299 with half-pixel centres (F.interpolate, align_corners=False, no
     antialias), then 2x-1. This is what the reference fixtures were made with and what the tests check.
  "tf1": ADM's TF graph (`classify_image_graph_def.pb`), which takes [0, 255] floats, resizes with TF1's
     ResizeBilinear (source = dst * in/out, no half-pixel offset) and normalises as (x-128)/128. Same weights, so
     with the real weight file this should give the features the ADM evaluator sees; no TF reference was available
     here to check it, so it is documented, not verified.

Outputs (`InceptionV3.__call__`): `pool3` (N, 2048) FID features; `logits` (N, 1008) the fc with bias; `spatial`
(N, 2023) ADM's sFID features = Mixed_6d.branch1x1[..., :7] flattened (h, w, c); `mixed_6d_branch1x1`
(N, 17, 17, 192); `mixed_6e` (N, 17, 17, 768). Under jit only the outputs that are used are computed.

Weights come from pytorch-fid's file `pt_inception-2015-12-05-6726825d.pth` via
`npp_jax.model_files.param_mapping.inception_from_torch`.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from npp_jax import errors
from npp_jax import sharding

IMAGE_SIZE = 299
POOL_DIM = 2048
NUM_CLASSES = 1008
SPATIAL_CHANNELS = 7  # ADM keeps the first 7 channels of mixed_6/conv (= Mixed_6d.branch1x1).
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS
BN_EPS = 1e-3
PREPROCESSINGS = ("pytorch_fid", "tf1")
OUTPUTS = ("pool3", "logits", "spatial", "mixed_6d_branch1x1", "mixed_6e")
# The hash in the released file's name, pt_inception-2015-12-05-<prefix>.pth; by torch hub's naming convention it is
# the start of the file's sha256 (not checked against the real file here).
RELEASED_WEIGHTS_SHA256_PREFIX = "6726825d"

Pair = tuple[int, int]


def _pair(v: int | Pair) -> Pair:
  return (v, v) if isinstance(v, int) else tuple(v)


# ----------------------------------------------------------------------------------------------------------------------
# Preprocessing.


def bilinear_resize_matrix(in_size: int, out_size: int, half_pixel: bool) -> np.ndarray:
  """(out_size, in_size) float32 matrix of a 1-D bilinear resize without antialiasing.

  half_pixel=True is torch's F.interpolate(mode="bilinear", align_corners=False): source coordinate
  (dst + 0.5) * in/out - 0.5, clamped below at 0. half_pixel=False is TF1's ResizeBilinear: dst * in/out.
  Neighbours are clamped at the last pixel. Coordinates are computed in float32 as both libraries do.
  """
  scale = np.float32(in_size) / np.float32(out_size)
  dst = np.arange(out_size, dtype=np.float32)
  if half_pixel:
    src = np.maximum((dst + np.float32(0.5)) * scale - np.float32(0.5), np.float32(0))
  else:
    src = dst * scale
  lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = (src - lo.astype(np.float32)).astype(np.float32)
  matrix = np.zeros((out_size, in_size), np.float32)
  rows = np.arange(out_size)
  np.add.at(matrix, (rows, lo), np.float32(1) - frac)
  np.add.at(matrix, (rows, hi), frac)
  return matrix


def _resize(x: jnp.ndarray, size: int, half_pixel: bool, precision) -> jnp.ndarray:
  """Separable bilinear resize of NHWC `x` to size x size (two 1-D interpolation matrices)."""
  _, h, w, _ = x.shape
  if (h, w) == (size, size):
    return x  # Both libraries return the input unchanged here.
  rows = jnp.asarray(bilinear_resize_matrix(h, size, half_pixel))
  cols = jnp.asarray(bilinear_resize_matrix(w, size, half_pixel))
  x = jnp.einsum("ih,nhwc->niwc", rows, x, precision=precision)
  return jnp.einsum("jw,niwc->nijc", cols, x, precision=precision)


def preprocess(images: jnp.ndarray, mode: str = "pytorch_fid", precision=jax.lax.Precision.HIGHEST) -> jnp.ndarray:
  """uint8 (or [0, 255] float) NHWC images -> the network's (N, 299, 299, 3) float32 input."""
  x = images.astype(jnp.float32)
  if mode == "pytorch_fid":
    x = _resize(x / 255.0, IMAGE_SIZE, half_pixel=True, precision=precision)
    return 2.0 * x - 1.0
  if mode == "tf1":
    x = _resize(x, IMAGE_SIZE, half_pixel=False, precision=precision)
    return (x - 128.0) / 128.0
  raise errors.InvalidInput(f"unknown Inception preprocessing {mode!r}; choose one of {', '.join(PREPROCESSINGS)}")


# ----------------------------------------------------------------------------------------------------------------------
# Layers.


def _max_pool(x: jnp.ndarray, window: int, stride: int, padding: int = 0) -> jnp.ndarray:
  pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, window, window, 1), (1, stride, stride, 1), pad)


def _avg_pool_3x3_exclude_pad(x: jnp.ndarray) -> jnp.ndarray:
  """3x3 stride-1 average pool, padding 1, dividing by the number of real pixels (count_include_pad=False)."""
  dims, strides, pad = (1, 3, 3, 1), (1, 1, 1, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, dims, strides, pad)
  count = jax.lax.reduce_window(jnp.ones((1, *x.shape[1:3], 1), x.dtype), 0.0, jax.lax.add, dims, strides, pad)
  return total / count


class BasicConv(nnx.Module):
  """Conv (no bias) -> inference BatchNorm (running statistics, eps 1e-3) -> ReLU."""

  def __init__(self, in_ch: int, out_ch: int, kernel: int | Pair, stride: int = 1, padding: int | Pair = 0,
               precision=jax.lax.Precision.HIGHEST):
    kh, kw = _pair(kernel)
    self.kernel = nnx.Param(jnp.zeros((kh, kw, in_ch, out_ch), jnp.float32))  # HWIO
    self.scale = nnx.Param(jnp.ones((out_ch,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((out_ch,), jnp.float32))
    self.mean = nnx.BatchStat(jnp.zeros((out_ch,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((out_ch,), jnp.float32))
    self.stride = stride
    self.padding = _pair(padding)
    self.precision = precision

  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    ph, pw = self.padding
    y = jax.lax.conv_general_dilated(
        x, self.kernel[...], (self.stride, self.stride), ((ph, ph), (pw, pw)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=self.precision)
    # BatchNorm folded into one multiply-add, as torch's inference kernel does.
    scale = self.scale[...] * jax.lax.rsqrt(self.var[...] + BN_EPS)
    return jax.nn.relu(y * scale + (self.bias[...] - self.mean[...] * scale))


class InceptionA(nnx.Module):
  """Mixed_5b/5c/5d (pytorch-fid's FIDInceptionA)."""

  def __init__(self, in_ch: int, pool_features: int, precision):
    conv = functools.partial(BasicConv, precision=precision)
    self.branch1x1 = conv(in_ch, 64, 1)
    self.branch5x5_1 = conv(in_ch, 48, 1)
    self.branch5x5_2 = conv(48, 64, 5, padding=2)
    self.branch3x3dbl_1 = conv(in_ch, 64, 1)
    self.branch3x3dbl_2 = conv(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = conv(96, 96, 3, padding=1)
    self.branch_pool = conv(in_ch, pool_features, 1)

  def __call__(self, x):
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    bp = self.branch_pool(_avg_pool_3x3_exclude_pad(x))
    return jnp.concatenate([self.branch1x1(x), b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):
  """Mixed_6a: the 35 -> 17 reduction."""

  def __init__(self, in_ch: int, precision):
    conv = functools.partial(BasicConv, precision=precision)
    self.branch3x3 = conv(in_ch, 384, 3, stride=2)
    self.branch3x3dbl_1 = conv(in_ch, 64, 1)
    self.branch3x3dbl_2 = conv(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = conv(96, 96, 3, stride=2)

  def __call__(self, x):
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return jnp.concatenate([self.branch3x3(x), b3, _max_pool(x, 3, 2)], axis=-1)


class InceptionC(nnx.Module):
  """Mixed_6b..6e (pytorch-fid's FIDInceptionC)."""

  def __init__(self, in_ch: int, c7: int, precision):
    conv = functools.partial(BasicConv, precision=precision)
    self.branch1x1 = conv(in_ch, 192, 1)
    self.branch7x7_1 = conv(in_ch, c7, 1)
    self.branch7x7_2 = conv(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7_3 = conv(c7, 192, (7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = conv(in_ch, c7, 1)
    self.branch7x7dbl_2 = conv(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = conv(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = conv(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = conv(c7, 192, (1, 7), padding=(0, 3))
    self.branch_pool = conv(in_ch, 192, 1)

  def branches(self, x) -> list[jnp.ndarray]:
    """The four branch outputs, in concatenation order (the first is ADM's sFID layer in Mixed_6d)."""
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = self.branch7x7dbl_1(x)
    for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
      bd = layer(bd)
    return [self.branch1x1(x), b7, bd, self.branch_pool(_avg_pool_3x3_exclude_pad(x))]

  def __call__(self, x):
    return jnp.concatenate(self.branches(x), axis=-1)


class InceptionD(nnx.Module):
  """Mixed_7a: the 17 -> 8 reduction."""

  def __init__(self, in_ch: int, precision):
    conv = functools.partial(BasicConv, precision=precision)
    self.branch3x3_1 = conv(in_ch, 192, 1)
    self.branch3x3_2 = conv(192, 320, 3, stride=2)
    self.branch7x7x3_1 = conv(in_ch, 192, 1)
    self.branch7x7x3_2 = conv(192, 192, (1, 7), padding=(0, 3))
    self.branch7x7x3_3 = conv(192, 192, (7, 1), padding=(3, 0))
    self.branch7x7x3_4 = conv(192, 192, 3, stride=2)

  def __call__(self, x):
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
    return jnp.concatenate([b3, b7, _max_pool(x, 3, 2)], axis=-1)


class InceptionE(nnx.Module):
  """Mixed_7b (average pool branch, FIDInceptionE_1) and Mixed_7c (max pool branch, FIDInceptionE_2)."""

  def __init__(self, in_ch: int, pool: str, precision):
    conv = functools.partial(BasicConv, precision=precision)
    self.branch1x1 = conv(in_ch, 320, 1)
    self.branch3x3_1 = conv(in_ch, 384, 1)
    self.branch3x3_2a = conv(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3_2b = conv(384, 384, (3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = conv(in_ch, 448, 1)
    self.branch3x3dbl_2 = conv(448, 384, 3, padding=1)
    self.branch3x3dbl_3a = conv(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = conv(384, 384, (3, 1), padding=(1, 0))
    self.branch_pool = conv(in_ch, 192, 1)
    self.pool = pool

  def __call__(self, x):
    b3 = self.branch3x3_1(x)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    # The 2015 TF graph (and so pytorch-fid) max-pools here in Mixed_7c, unlike the paper.
    pooled = _max_pool(x, 3, 1, padding=1) if self.pool == "max" else _avg_pool_3x3_exclude_pad(x)
    return jnp.concatenate([
        self.branch1x1(x),
        self.branch3x3_2a(b3), self.branch3x3_2b(b3),
        self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd),
        self.branch_pool(pooled),
    ], axis=-1)


# ----------------------------------------------------------------------------------------------------------------------
# The network.


class InceptionV3(nnx.Module):
  """FID Inception-v3 (inference only). Parameters start as placeholders; load real ones with `inception_from_torch`.

  Attribute names follow torchvision's Inception3, so a parameter's path names its PyTorch key.
  """

  def __init__(self, preprocessing: str = "pytorch_fid", precision=jax.lax.Precision.HIGHEST):
    if preprocessing not in PREPROCESSINGS:
      raise errors.InvalidInput(f"unknown Inception preprocessing {preprocessing!r}; choose one of "
                                f"{', '.join(PREPROCESSINGS)}")
    self.preprocessing = preprocessing
    self.precision = precision
    conv = functools.partial(BasicConv, precision=precision)
    self.Conv2d_1a_3x3 = conv(3, 32, 3, stride=2)
    self.Conv2d_2a_3x3 = conv(32, 32, 3)
    self.Conv2d_2b_3x3 = conv(32, 64, 3, padding=1)
    self.Conv2d_3b_1x1 = conv(64, 80, 1)
    self.Conv2d_4a_3x3 = conv(80, 192, 3)
    self.Mixed_5b = InceptionA(192, 32, precision)
    self.Mixed_5c = InceptionA(256, 64, precision)
    self.Mixed_5d = InceptionA(288, 64, precision)
    self.Mixed_6a = InceptionB(288, precision)
    self.Mixed_6b = InceptionC(768, 128, precision)
    self.Mixed_6c = InceptionC(768, 160, precision)
    self.Mixed_6d = InceptionC(768, 160, precision)
    self.Mixed_6e = InceptionC(768, 192, precision)
    self.Mixed_7a = InceptionD(768, precision)
    self.Mixed_7b = InceptionE(1280, "avg", precision)
    self.Mixed_7c = InceptionE(2048, "max", precision)
    self.fc_kernel = nnx.Param(jnp.zeros((POOL_DIM, NUM_CLASSES), jnp.float32))  # torch fc.weight.T
    self.fc_bias = nnx.Param(jnp.zeros((NUM_CLASSES,), jnp.float32))

  def __call__(self, images: jnp.ndarray) -> dict[str, jnp.ndarray]:
    """uint8 NHWC images of any size -> {pool3, logits, spatial, mixed_6d_branch1x1, mixed_6e}."""
    x = preprocess(images, self.preprocessing, self.precision)
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = _max_pool(x, 3, 2)
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
    x = _max_pool(x, 3, 2)
    x = self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))
    x = self.Mixed_6c(self.Mixed_6b(x))
    branches = self.Mixed_6d.branches(x)
    branch1x1 = branches[0]
    x = self.Mixed_6e(jnp.concatenate(branches, axis=-1))
    mixed_6e = x
    x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
    pool3 = jnp.mean(x, axis=(1, 2))
    logits = jnp.dot(pool3, self.fc_kernel[...], precision=self.precision) + self.fc_bias[...]
    spatial = branch1x1[..., :SPATIAL_CHANNELS].reshape(branch1x1.shape[0], -1)
    return {"pool3": pool3, "logits": logits, "spatial": spatial, "mixed_6d_branch1x1": branch1x1,
            "mixed_6e": mixed_6e}


# ----------------------------------------------------------------------------------------------------------------------
# Batched, sharded feature extraction.


def make_feature_fn(model: InceptionV3, outputs: Sequence[str] = ("pool3", "spatial", "logits"),
                    mesh: jax.sharding.Mesh | None = None) -> Callable[[np.ndarray], dict[str, jax.Array]]:
  """Returns fn(uint8 NHWC images) -> {name: (N, ...) array} for the chosen `outputs`, jitted once per input shape.

  The parameters are replicated and the batch is split over the mesh's one axis (all devices by default); a
  batch whose size the device count does not divide is padded with black images and the padding is cut off.
  Results are jax arrays, so the next batch can be dispatched before they are read.
  """
  unknown = [o for o in outputs if o not in OUTPUTS]
  if unknown:
    raise errors.InvalidInput(f"unknown Inception outputs {unknown}; choose from {', '.join(OUTPUTS)}")
  mesh = mesh if mesh is not None else sharding.one_axis_mesh(jax.devices())
  graphdef, state = nnx.split(model)
  replicated, batch_sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P(sharding.ONE_AXIS))
  state = jax.device_put(state, replicated)

  @functools.partial(jax.jit, in_shardings=(replicated, batch_sharded), out_shardings=batch_sharded)
  def forward(state, images):
    out = nnx.merge(graphdef, state)(images)
    return {name: out[name] for name in outputs}

  sharded_forward = sharding.pad_shard_unpad(functools.partial(forward, state), mesh)

  def features(images: np.ndarray) -> dict[str, jax.Array]:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise errors.InvalidInput(f"expected images of shape (N, H, W, 3), got {images.shape}")
    return sharded_forward(images)

  return features
