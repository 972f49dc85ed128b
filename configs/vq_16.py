"""LlamaGen VQ-16 tokenizer (`vq_ds16_c2i.pt`): 256x256 images -> 16x16 codes from a 16384x8 codebook.

Set the weights with --config.vq.checkpoint=/path/to/vq_ds16_c2i.pt (or a converted directory).
"""

import ml_collections

from npp_jax import config as base


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.vq = base.vq_config()
  return config
