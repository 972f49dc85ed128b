"""LlamaGen's VQ tokenizer (`tokenizer/tokenizer_image/vq_model.py`, VQ-16) in Flax NNX.

The layers, their order and their names follow the reference, so that a PyTorch state dict maps onto this model
one tensor per parameter (see `npp_jax.convert`). Everything runs NHWC: images (B, H, W, 3) in [-1, 1], latents
(B, h, w, C), codes (B, h*w) in raster order.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from npp_jax import errors
from npp_jax import sharding

Array = jax.Array

_NORM_GROUPS = 32
_NORM_EPS = 1e-6
_L2_EPS = 1e-12  # F.normalize's eps.
# The parts a fine-tune can hold fixed, and the top-level modules of each.
PARTS = {"encoder": ("encoder", "quant_conv"), "codebook": ("quantize",), "decoder": ("post_quant_conv", "decoder")}


def default_config() -> ml_collections.ConfigDict:
  """The `vq` config section with LlamaGen VQ-16 values (released checkpoint `vq_ds16_c2i.pt`)."""
  return ml_collections.ConfigDict(dict(
      codebook_size=16384,
      codebook_embed_dim=8,
      codebook_l2_norm=True,
      commit_loss_beta=0.25,
      encoder_ch_mult=(1, 1, 2, 2, 4),
      decoder_ch_mult=(1, 1, 2, 2, 4),
      z_channels=256,
      ch=128,
      num_res_blocks=2,
      dropout_p=0.0,
      image_size=256,  # The input resolution the tokenizer is used at.
      checkpoint="",  # Weights: a torch .pt/.pth, a .safetensors file or a `save_vq` directory; '' for none.
  ))


def grid_size(vq_cfg: ml_collections.ConfigDict) -> int:
  """Side of the code grid: image_size over the encoder's downsampling factor."""
  factor = 2 ** (len(vq_cfg.encoder_ch_mult) - 1)
  if vq_cfg.image_size % factor:
    raise errors.InvalidInput(f"vq.image_size {vq_cfg.image_size} is not a multiple of the downsampling factor "
                              f"{factor}")
  return vq_cfg.image_size // factor


# ----------------------------------------------------------------------------------------------------------------------
# Layers.


def _conv(in_ch: int, out_ch: int, kernel: int, rngs: nnx.Rngs, *, stride: int = 1, padding=None) -> nnx.Conv:
  """A biased conv; default padding keeps the size (torch padding=kernel//2)."""
  pad = kernel // 2
  return nnx.Conv(in_ch, out_ch, (kernel, kernel), strides=stride,
                  padding=((pad, pad), (pad, pad)) if padding is None else padding, rngs=rngs)


def _group_norm(channels: int, rngs: nnx.Rngs) -> nnx.GroupNorm:
  # Two-pass variance, as torch computes it.
  return nnx.GroupNorm(channels, num_groups=_NORM_GROUPS, epsilon=_NORM_EPS, use_fast_variance=False, rngs=rngs)


def _l2_normalize(x: Array) -> Array:
  """F.normalize(x, dim=-1): x / max(|x|, eps)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  return x / jnp.maximum(norm, _L2_EPS)


class ResnetBlock(nnx.Module):
  """norm1-swish-conv1-norm2-swish-dropout-conv2 plus a (1x1 conv when the width changes) shortcut."""

  def __init__(self, in_ch: int, out_ch: int, dropout: float, rngs: nnx.Rngs):
    self.norm1 = _group_norm(in_ch, rngs)
    self.conv1 = _conv(in_ch, out_ch, 3, rngs)
    self.norm2 = _group_norm(out_ch, rngs)
    self.dropout = nnx.Dropout(dropout)
    self.conv2 = _conv(out_ch, out_ch, 3, rngs)
    self.nin_shortcut = _conv(in_ch, out_ch, 1, rngs) if in_ch != out_ch else None

  def __call__(self, x: Array, *, deterministic: bool, rngs: nnx.Rngs | None) -> Array:
    h = self.conv1(nnx.swish(self.norm1(x)))
    h = self.dropout(nnx.swish(self.norm2(h)), deterministic=deterministic, rngs=rngs)
    h = self.conv2(h)
    shortcut = x if self.nin_shortcut is None else self.nin_shortcut(x)
    return shortcut + h


class AttnBlock(nnx.Module):
  """Single-head self-attention over all positions, 1x1 conv projections, residual."""

  def __init__(self, ch: int, rngs: nnx.Rngs):
    self.norm = _group_norm(ch, rngs)
    self.q = _conv(ch, ch, 1, rngs)
    self.k = _conv(ch, ch, 1, rngs)
    self.v = _conv(ch, ch, 1, rngs)
    self.proj_out = _conv(ch, ch, 1, rngs)

  def __call__(self, x: Array, **unused) -> Array:
    b, h, w, c = x.shape
    y = self.norm(x)
    q, k, v = (proj(y).reshape(b, h * w, c) for proj in (self.q, self.k, self.v))
    weights = jax.nn.softmax(jnp.einsum("bqc,bkc->bqk", q, k) * (c ** -0.5), axis=-1)
    out = jnp.einsum("bqk,bkc->bqc", weights, v).reshape(b, h, w, c)
    return x + self.proj_out(out)


class Downsample(nnx.Module):
  """3x3 stride-2 conv after padding right and bottom by one (the reference's asymmetric F.pad)."""

  def __init__(self, ch: int, rngs: nnx.Rngs):
    self.conv = _conv(ch, ch, 3, rngs, stride=2, padding=((0, 1), (0, 1)))

  def __call__(self, x: Array) -> Array:
    return self.conv(x)


class Upsample(nnx.Module):
  """Nearest-neighbour x2 then a 3x3 conv."""

  def __init__(self, ch: int, rngs: nnx.Rngs):
    self.conv = _conv(ch, ch, 3, rngs)

  def __call__(self, x: Array) -> Array:
    b, h, w, c = x.shape
    # Broadcast-and-reshape nearest x2 (cheaper on XLA CPU than a transposed conv or a resize).
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
    return self.conv(x)


class Level(nnx.Module):
  """One resolution level (`conv_blocks.i` in the reference): res blocks, attention after each of them at the
  lowest resolution, then the resampling (attribute `downsample` or `upsample`, as named in the reference)."""

  def __init__(self, res: list[ResnetBlock], attn: list[AttnBlock], resample_name: str,
               resample: Downsample | Upsample | None):
    self.res = nnx.List(res)
    self.attn = nnx.List(attn)
    self.resample_name = resample_name
    setattr(self, resample_name, resample)

  def __call__(self, x: Array, *, deterministic: bool, rngs: nnx.Rngs | None) -> Array:
    for i, block in enumerate(self.res):
      x = block(x, deterministic=deterministic, rngs=rngs)
      if self.attn:
        x = self.attn[i](x)
    resample = getattr(self, self.resample_name)
    return x if resample is None else resample(x)


def _mid(ch: int, dropout: float, rngs: nnx.Rngs) -> nnx.List:
  return nnx.List([ResnetBlock(ch, ch, dropout, rngs), AttnBlock(ch, rngs), ResnetBlock(ch, ch, dropout, rngs)])


def _run(blocks, x: Array, *, deterministic: bool, rngs: nnx.Rngs | None) -> Array:
  for block in blocks:
    x = block(x, deterministic=deterministic, rngs=rngs)
  return x


class Encoder(nnx.Module):
  """Images (B, H, W, 3) -> latents (B, H/f, W/f, z_channels), f = 2**(len(ch_mult)-1)."""

  def __init__(self, *, ch: int, ch_mult, num_res_blocks: int, z_channels: int, dropout: float, rngs: nnx.Rngs):
    self.conv_in = _conv(3, ch, 3, rngs)
    levels = []
    block_in = ch
    for i, mult in enumerate(ch_mult):
      last = i == len(ch_mult) - 1
      res, attn = [], []
      for _ in range(num_res_blocks):
        res.append(ResnetBlock(block_in, ch * mult, dropout, rngs))
        block_in = ch * mult
        if last:
          attn.append(AttnBlock(block_in, rngs))
      levels.append(Level(res, attn, "downsample", None if last else Downsample(block_in, rngs)))
    self.conv_blocks = nnx.List(levels)
    self.mid = _mid(block_in, dropout, rngs)
    self.norm_out = _group_norm(block_in, rngs)
    self.conv_out = _conv(block_in, z_channels, 3, rngs)

  def __call__(self, x: Array, *, deterministic: bool = True, rngs: nnx.Rngs | None = None) -> Array:
    h = self.conv_in(x)
    h = _run(self.conv_blocks, h, deterministic=deterministic, rngs=rngs)
    h = _run(self.mid, h, deterministic=deterministic, rngs=rngs)
    return self.conv_out(nnx.swish(self.norm_out(h)))


class Decoder(nnx.Module):
  """Latents (B, h, w, z_channels) -> images (B, h*f, w*f, 3), not clamped."""

  def __init__(self, *, ch: int, ch_mult, num_res_blocks: int, z_channels: int, dropout: float, rngs: nnx.Rngs):
    block_in = ch * ch_mult[-1]
    self.conv_in = _conv(z_channels, block_in, 3, rngs)
    self.mid = _mid(block_in, dropout, rngs)
    levels = []
    for i in reversed(range(len(ch_mult))):
      res, attn = [], []
      for _ in range(num_res_blocks + 1):
        res.append(ResnetBlock(block_in, ch * ch_mult[i], dropout, rngs))
        block_in = ch * ch_mult[i]
        if i == len(ch_mult) - 1:
          attn.append(AttnBlock(block_in, rngs))
      levels.append(Level(res, attn, "upsample", Upsample(block_in, rngs) if i else None))
    self.conv_blocks = nnx.List(levels)
    self.norm_out = _group_norm(block_in, rngs)
    self.conv_out = _conv(block_in, 3, 3, rngs)

  def __call__(self, z: Array, *, deterministic: bool = True, rngs: nnx.Rngs | None = None) -> Array:
    return self.conv_out(self.last_input(z, deterministic=deterministic, rngs=rngs))

  def last_input(self, z: Array, *, deterministic: bool = True, rngs: nnx.Rngs | None = None) -> Array:
    """What the last layer (`conv_out`, the reference's `last_layer`) is applied to."""
    h = self.conv_in(z)
    h = _run(self.mid, h, deterministic=deterministic, rngs=rngs)
    h = _run(self.conv_blocks, h, deterministic=deterministic, rngs=rngs)
    return nnx.swish(self.norm_out(h))


class VectorQuantizer(nnx.Module):
  """Nearest codebook entry by squared distance; with l2_norm both z and the codebook are unit vectors."""

  def __init__(self, codebook_size: int, embed_dim: int, *, l2_norm: bool, beta: float, rngs: nnx.Rngs):
    self.l2_norm = l2_norm
    self.beta = beta
    codebook = jax.random.uniform(rngs.params(), (codebook_size, embed_dim), jnp.float32,
                                  -1.0 / codebook_size, 1.0 / codebook_size)
    self.codebook = nnx.Param(_l2_normalize(codebook) if l2_norm else codebook)

  def embeddings(self) -> Array:
    """The codebook as the model uses it (normalised when l2_norm)."""
    codebook = self.codebook[...]
    return _l2_normalize(codebook) if self.l2_norm else codebook

  def nearest(self, z: Array) -> tuple[Array, Array, Array]:
    """z (..., D) -> (z as compared (normalised when l2_norm), codes (...), the embedding compared against)."""
    embedding = self.embeddings()
    if self.l2_norm:
      z = _l2_normalize(z)
    flat = z.reshape(-1, z.shape[-1])
    # The reference's expansion |z|^2 + |e|^2 - 2 z.e, so that near-ties break the same way; full precision so
    # that TPU/GPU default matmul precision does not flip them either.
    d = (jnp.sum(flat ** 2, axis=1, keepdims=True) + jnp.sum(embedding ** 2, axis=1)
         - 2 * jnp.einsum("bd,nd->bn", flat, embedding, precision=jax.lax.Precision.HIGHEST))
    codes = jnp.argmin(d, axis=1).astype(jnp.int32).reshape(z.shape[:-1])
    return z, codes, embedding

  def __call__(self, z: Array) -> tuple[Array, Array, dict[str, Array]]:
    """z (B, h, w, D) -> (straight-through z_q, codes (B, h, w), losses on the compared vectors)."""
    z, codes, embedding = self.nearest(z)
    z_q = embedding[codes]
    losses = {
        "codebook_loss": jnp.mean(jnp.square(z_q - jax.lax.stop_gradient(z))),
        "commit_loss": self.beta * jnp.mean(jnp.square(jax.lax.stop_gradient(z_q) - z)),
    }
    return z + jax.lax.stop_gradient(z_q - z), codes, losses

  def lookup(self, codes: Array) -> Array:
    """Codebook vectors (as the model uses them) for integer codes of any shape.

    A code outside [0, codebook_size) gives NaNs (plain indexing would clamp or wrap it into a valid-looking
    vector, and a jitted decode cannot raise).
    """
    embedding = self.embeddings()
    size = embedding.shape[0]
    codes = jnp.where((codes >= 0) & (codes < size), codes, size)
    return jnp.take(embedding, codes, axis=0, mode="fill", fill_value=jnp.nan)


class VQModel(nnx.Module):
  """LlamaGen VQModel: encoder, quant_conv, quantizer, post_quant_conv, decoder."""

  def __init__(self, vq_cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs | None = None):
    rngs = nnx.Rngs(0) if rngs is None else rngs
    self.grid = grid_size(vq_cfg)
    shared = dict(ch=vq_cfg.ch, num_res_blocks=vq_cfg.num_res_blocks, z_channels=vq_cfg.z_channels,
                  dropout=vq_cfg.dropout_p, rngs=rngs)
    self.encoder = Encoder(ch_mult=tuple(vq_cfg.encoder_ch_mult), **shared)
    self.decoder = Decoder(ch_mult=tuple(vq_cfg.decoder_ch_mult), **shared)
    self.quant_conv = _conv(vq_cfg.z_channels, vq_cfg.codebook_embed_dim, 1, rngs)
    self.quantize = VectorQuantizer(vq_cfg.codebook_size, vq_cfg.codebook_embed_dim,
                                    l2_norm=vq_cfg.codebook_l2_norm, beta=vq_cfg.commit_loss_beta, rngs=rngs)
    self.post_quant_conv = _conv(vq_cfg.codebook_embed_dim, vq_cfg.z_channels, 1, rngs)

  def encode_latent(self, images: Array, *, deterministic: bool = True, rngs: nnx.Rngs | None = None) -> Array:
    """Pre-quantisation latents (B, h, w, codebook_embed_dim): quant_conv(encoder(images))."""
    return self.quant_conv(self.encoder(images, deterministic=deterministic, rngs=rngs))

  def encode(self, images: Array) -> Array:
    """Images (B, H, W, 3) in [-1, 1] -> int32 codes (B, h*w) in raster order."""
    _, codes, _ = self.quantize.nearest(self.encode_latent(images))
    return codes.reshape(codes.shape[0], -1)

  def decode_latent(self, quant: Array, *, deterministic: bool = True, rngs: nnx.Rngs | None = None) -> Array:
    """Quantised latents (B, h, w, D) -> images (B, H, W, 3)."""
    return self.decoder(self.post_quant_conv(quant), deterministic=deterministic, rngs=rngs)

  def decode(self, codes: Array) -> Array:
    """Codes (B, g*g) in raster order -> images (B, H, W, 3), not clamped; the grid side g is sqrt(len)."""
    b, n = codes.shape
    side = int(round(n ** 0.5))
    if side * side != n:
      raise errors.InvalidInput(f"cannot decode {n} codes per image: not a square grid")
    return self.decode_latent(self.quantize.lookup(codes).reshape(b, side, side, -1))

  def __call__(self, images: Array, *, deterministic: bool = True,
               rngs: nnx.Rngs | None = None) -> tuple[Array, dict[str, Array]]:
    """The training forward: (reconstruction, {codebook_loss, commit_loss, codes (B, h*w)}).

    Gradients reach the encoder through the straight-through estimator; `rngs` (a 'dropout' stream) is needed
    only when deterministic=False and dropout_p > 0.
    """
    h, aux = self.forward_to_last_layer(images, deterministic=deterministic, rngs=rngs)
    return self.decoder.conv_out(h), aux

  def forward_to_last_layer(self, images: Array, *, deterministic: bool = True,
                            rngs: nnx.Rngs | None = None) -> tuple[Array, dict[str, Array]]:
    """The training forward stopped before the decoder's last conv: (its input, the aux dict of `__call__`).

    The tokenizer trainer applies the last conv itself, to take gradients with respect to it alone.
    """
    z = self.encode_latent(images, deterministic=deterministic, rngs=rngs)
    quant, codes, aux = self.quantize(z)
    aux["codes"] = codes.reshape(codes.shape[0], -1)
    h = self.decoder.last_input(self.post_quant_conv(quant), deterministic=deterministic, rngs=rngs)
    return h, aux


# ----------------------------------------------------------------------------------------------------------------------
# Jitted use and identity.


def _make_jitted(model: VQModel, method: Callable[[VQModel, Array], Array]) -> Callable[[Array], Array]:
  """`jax.jit` over (state, x) of a model method, bound to the model's current state.

  The state is replicated over this process's devices, so a batch sharded over them (the sampler's output, say)
  is accepted as it is.
  """
  graphdef, state = nnx.split(model)
  replicated = jax.sharding.NamedSharding(sharding.one_axis_mesh(), jax.sharding.PartitionSpec())
  state = jax.device_put(state, replicated)

  @jax.jit
  def pure(state: nnx.State, x: Array) -> Array:
    return method(nnx.merge(graphdef, state), x)

  return functools.partial(pure, state)


def make_encode_fn(model: VQModel) -> Callable[[Array], Array]:
  """Jitted images -> codes (see `_make_jitted` for the pure function inside)."""
  return _make_jitted(model, VQModel.encode)


def make_decode_fn(model: VQModel) -> Callable[[Array], Array]:
  """Jitted codes -> images (see `_make_jitted` for the pure function inside)."""
  return _make_jitted(model, VQModel.decode)


def abstract_model(vq_cfg: ml_collections.ConfigDict) -> VQModel:
  """The VQModel's structure, shapes and dtypes without initialising any weight."""
  return nnx.eval_shape(lambda: VQModel(vq_cfg, rngs=nnx.Rngs(0)))


def params_checksum(model: nnx.Module) -> str:
  """sha256 over every parameter (path, dtype, shape, little-endian bytes), in sorted path order.

  Ties pre-extracted codes to the tokenizer weights that made them.
  """
  digest = hashlib.sha256()
  flat = sorted(((_path_name(path), var[...]) for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))),
                key=lambda item: item[0])
  for name, value in flat:
    array = np.asarray(value)
    array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    digest.update(f"{name}|{array.dtype.name}|{array.shape}\n".encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


def _path_name(path: tuple[Any, ...]) -> str:
  return "/".join(str(p) for p in path)
