"""The PatchGAN discriminator of LlamaGen's tokenizer training (`tokenizer/tokenizer_image/discriminator_patchgan.py`,
taming-transformers' `NLayerDiscriminator`), in Flax NNX.

4x4 convolutions with padding 1: one of stride 2 (with bias) and LeakyReLU 0.2; then `n_layers - 1` of stride 2 and
one of stride 1, each without bias, with a BatchNorm and LeakyReLU, the widths ndf * min(2^n, 8); then a 4x4 conv
(with bias) to one logit per patch. Images NHWC in [-1, 1] -> logits (B, h, w).

BatchNorm: the reference keeps its discriminator in train mode throughout training, so every call normalises with
the statistics of the batch it is given (biased variance, eps 1e-5); its running averages are never read. Here the
norm always uses the batch's statistics and keeps no running averages (`BatchStatNorm`), which makes the forward a
pure function of the parameters, as in the reference's training. Calls on real and on reconstructed images are
separate (as in the reference), so each is normalised with its own statistics.

Initialisation as the reference's `_init_weights`: conv weights N(0, 0.02), norm scales N(1, 0.02), norm biases 0;
the conv biases keep torch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

_KERNEL = 4
_SLOPE = 0.2
_BN_EPS = 1e-5


def _torch_bias_init(fan_in: int):
  bound = fan_in ** -0.5
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _conv(cin: int, cout: int, stride: int, use_bias: bool, rngs: nnx.Rngs) -> nnx.Conv:
  return nnx.Conv(cin, cout, (_KERNEL, _KERNEL), strides=stride, padding=((1, 1), (1, 1)), use_bias=use_bias,
                  kernel_init=nnx.initializers.normal(0.02), bias_init=_torch_bias_init(cin * _KERNEL * _KERNEL),
                  rngs=rngs)


class BatchStatNorm(nnx.Module):
  """torch BatchNorm2d in train mode: the batch's mean and biased variance over (B, H, W), then scale and bias."""

  def __init__(self, channels: int, rngs: nnx.Rngs):
    self.scale = nnx.Param(1.0 + 0.02 * jax.random.normal(rngs.params(), (channels,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    mean = jnp.mean(x, axis=(0, 1, 2))
    var = jnp.mean(jnp.square(x - mean), axis=(0, 1, 2))
    return (x - mean) * jax.lax.rsqrt(var + _BN_EPS) * self.scale[...] + self.bias[...]


class PatchGAN(nnx.Module):
  """NLayerDiscriminator(input_nc, ndf, n_layers) without ActNorm (the reference's default)."""

  def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, *, rngs: nnx.Rngs):
    widths = [ndf * min(2 ** n, 8) for n in range(n_layers + 1)]
    convs = [_conv(in_channels, ndf, 2, True, rngs)]
    norms = []
    for n in range(1, n_layers + 1):
      convs.append(_conv(widths[n - 1], widths[n], 2 if n < n_layers else 1, False, rngs))
      norms.append(BatchStatNorm(widths[n], rngs))
    convs.append(_conv(widths[n_layers], 1, 1, True, rngs))
    self.convs = nnx.List(convs)
    self.norms = nnx.List(norms)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Images (B, H, W, C) -> patch logits (B, h, w), float32."""
    h = jax.nn.leaky_relu(self.convs[0](x.astype(jnp.float32)), _SLOPE)
    for conv, norm in zip(self.convs[1:-1], self.norms):
      h = jax.nn.leaky_relu(norm(conv(h)), _SLOPE)
    return self.convs[-1](h)[..., 0]


def torch_indices(n_layers: int) -> tuple[list[int], list[int]]:
  """Positions in the reference's `main` Sequential of each conv and each norm (conv, [norm,] LeakyReLU, ...)."""
  convs, norms, i = [0], [], 2  # main.0 conv, main.1 LeakyReLU
  for _ in range(n_layers):
    convs.append(i)
    norms.append(i + 1)
    i += 3
  convs.append(i)
  return convs, norms
