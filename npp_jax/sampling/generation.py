"""From a model directory and a tokenizer to images: what `sample`, the demo, the trainer's monitor and the study
share, so that the same class, seed and settings give the same image wherever it is drawn.

  model, config, decode = generation.load_model_and_tokenizer(checkpoint_dir, vq_path)
  sampler = decoding.Sampler(model)                      # compute dtype: the model config's
  settings = decoding.SamplingSettings.from_config(config.get("sample"))
  for start, images in generation.sample_images(sampler, decode, labels, generation.sample_key(seed), settings,
                                                batch_size=32):
    ...                                                  # uint8 (B, H, W, 3), images start..start+B-1

Sample i's key is fold_in(key, offset + i), whatever the batch it falls in.
"""

from __future__ import annotations

import pathlib
from typing import Callable, Iterator

import jax
import ml_collections
import numpy as np
from flax import nnx

from npp_jax import errors
from npp_jax import images as image_io
from npp_jax import sharding
from npp_jax.model_files import store
from npp_jax.models import vq as vq_lib
from npp_jax.sampling import decoding

SAMPLE_STREAM = 0  # fold_in tag of the sample keys under a seed's key (`sample` draws uniform labels from tag 1)

Decode = Callable[[jax.Array], jax.Array]  # codes (B, block_size) -> float images (B, H, W, 3) in [-1, 1]


def sample_key(seed: int) -> jax.Array:
  """The key whose fold_in(., i) is sample i's key."""
  return jax.random.fold_in(jax.random.key(seed), SAMPLE_STREAM)


def sample_images(sampler: decoding.Sampler, decode: Decode, labels: np.ndarray, key: jax.Array,
                  settings: decoding.SamplingSettings, *, batch_size: int, offset: int = 0
                  ) -> Iterator[tuple[int, np.ndarray]]:
  """(start, uint8 images) for `labels` in batches of `batch_size`; sample i's key is fold_in(key, offset + i).

  Every batch has one shape (the last is padded), so the sampler and `decode` compile once; the next batch is
  dispatched before the current one is read, so the devices work while the caller writes images.
  """
  if batch_size < 1:
    raise errors.InvalidInput(f"batch size must be at least 1, got {batch_size}")
  labels = np.asarray(labels)
  size = min(batch_size, len(labels))

  def sample_and_decode(batch: np.ndarray, *, first: int) -> jax.Array:
    return decode(sampler(batch, key, settings, sample_offset=first))

  padded = sharding.pad_shard_unpad(sample_and_decode, size=size)

  def dispatch(start: int) -> tuple[int, jax.Array]:
    return start, padded(labels[start:start + size], first=offset + start)

  pending = dispatch(0) if len(labels) else None
  while pending is not None:
    start, decoded = pending
    pending = dispatch(start + size) if start + size < len(labels) else None
    yield start, image_io.to_uint8(np.asarray(decoded))


def check_tokenizer_fits(model_cfg: ml_collections.ConfigDict, vq_cfg: ml_collections.ConfigDict, grid: int) -> None:
  """A user error unless the GPT's tokens are the tokenizer's codes (same vocabulary, same grid)."""
  if model_cfg.vocab_size != vq_cfg.codebook_size:
    raise errors.InvalidInput(f"the GPT's vocabulary ({model_cfg.vocab_size} tokens) does not match the tokenizer's "
                              f"codebook ({vq_cfg.codebook_size} codes)")
  if model_cfg.block_size != grid * grid:
    raise errors.InvalidInput(f"the GPT makes {model_cfg.block_size} tokens per image but the tokenizer decodes a "
                              f"{grid}x{grid} grid at vq.image_size={vq_cfg.image_size}")


def load_model_and_tokenizer(checkpoint_dir: str, vq_path: str, config: ml_collections.ConfigDict | None = None
                             ) -> tuple[nnx.Module, ml_collections.ConfigDict, Decode]:
  """(GPT, its config with vq.checkpoint = vq_path, jitted codes -> images) of a model directory and a tokenizer.

  config: the run config (default: the one stored with the checkpoint). FileNotFoundError for a missing path,
  a user error for a tokenizer that does not fit the GPT.
  """
  for name, path in (("checkpoint", checkpoint_dir), ("VQ checkpoint", vq_path)):
    if not pathlib.Path(path).exists():
      raise FileNotFoundError(f"{name} {path} does not exist")
  model, config = store.load_model(checkpoint_dir, config)
  with config.unlocked():
    if pathlib.Path(vq_path).is_dir():  # a saved tokenizer: its own config says what it is
      config.vq = store.read_saved_vq(vq_path)[0]
    else:
      if "vq" not in config:
        config.vq = vq_lib.default_config()
      config.vq.checkpoint = vq_path
  check_tokenizer_fits(model.cfg, config.vq, vq_lib.grid_size(config.vq))
  return model, config, vq_lib.make_decode_fn(store.load_vq(config.vq))
