"""LPIPS on VGG16 (Zhang et al. 2018), as LlamaGen's `tokenizer/tokenizer_image/lpips.py` computes it, in Flax NNX.

  distance(x, y) = sum over the taps l of  mean over (h, w) of  sum over c of  w_l[c] * (n(f_l(x)) - n(f_l(y)))^2

f_l are VGG16's activations relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 of the images after the scaling layer
((x - shift) / scale, x in [-1, 1]); n() divides by the channel norm plus 1e-10; w_l are LPIPS's learned 1x1 heads
(`lin0..lin4`, no bias). Images NHWC float in [-1, 1]; the result is one distance per image, (B,).

The weights come from two files the user gives (nothing is downloaded): torchvision's `vgg16` state dict (its
`features.*` convolutions; the `classifier.*` head is not used) and LPIPS's `vgg.pth` (the heads, shipped in the
`lpips` package as weights/v0.1/vgg.pth). `npp_jax.model_files.param_mapping.lpips_from_torch` reads both, strictly.

The reference builds its heads with dropout (`use_dropout=True`) and its tokenizer trainer leaves the loss module in
train mode, so there every head sees dropout 0.5 on its input; the expectation is this deterministic distance, which
is what is computed here (the LPIPS metric itself is defined without dropout).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

# (torch index in vgg16.features, in channels, out channels) of the 13 convolutions up to relu5_3.
VGG16_CONVS = ((0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256), (14, 256, 256),
               (17, 256, 512), (19, 512, 512), (21, 512, 512), (24, 512, 512), (26, 512, 512), (28, 512, 512))
_POOL_BEFORE = (2, 4, 7, 10)  # conv positions preceded by a 2x2 max pool (features.4, 9, 16, 23)
_TAP_AFTER = (1, 3, 6, 9, 12)  # conv positions whose ReLU output is a tap (relu1_2 ... relu5_3)
TAP_CHANNELS = (64, 128, 256, 512, 512)
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
_NORM_EPS = 1e-10


def unit_channels(x: jax.Array) -> jax.Array:
  """x / (|x| over channels + 1e-10): LPIPS's normalize_tensor, channels last."""
  return x / (jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True)) + _NORM_EPS)


class VGG16Features(nnx.Module):
  """vgg16.features up to relu5_3: 3x3 convs (padding 1) with ReLU, 2x2 max pools; returns the five taps."""

  def __init__(self, rngs: nnx.Rngs):
    self.convs = nnx.List([nnx.Conv(cin, cout, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs)
                           for _, cin, cout in VGG16_CONVS])

  def __call__(self, x: jax.Array) -> list[jax.Array]:
    taps = []
    for i, conv in enumerate(self.convs):
      if i in _POOL_BEFORE:
        x = nnx.max_pool(x, (2, 2), strides=(2, 2))
      x = jax.nn.relu(conv(x))
      if i in _TAP_AFTER:
        taps.append(x)
    return taps


class LPIPS(nnx.Module):
  """The VGG16 LPIPS distance; parameters: `net` (the VGG convolutions) and `lins` (1x1 heads, one per tap)."""

  def __init__(self, rngs: nnx.Rngs | None = None):
    rngs = nnx.Rngs(0) if rngs is None else rngs
    self.net = VGG16Features(rngs)
    self.lins = nnx.List([nnx.Conv(c, 1, (1, 1), use_bias=False, rngs=rngs) for c in TAP_CHANNELS])

  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    """Images (B, H, W, 3) in [-1, 1] -> the distance of each pair, (B,) float32."""
    shift, scale = jnp.asarray(_SHIFT, jnp.float32), jnp.asarray(_SCALE, jnp.float32)
    both = (jnp.concatenate([x, y]).astype(jnp.float32) - shift) / scale  # one pass over the VGG for both sets
    total = 0.0
    for tap, lin in zip(self.net(both), self.lins):
      fx, fy = jnp.split(unit_channels(tap), 2)
      total = total + jnp.mean(lin(jnp.square(fx - fy))[..., 0], axis=(1, 2))
    return total
