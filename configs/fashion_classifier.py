"""The Fashion-MNIST classifier of the online metric (npp_jax/assets/fashion_classifier):

  python -m npp_jax.train_classifier --config configs/fashion_classifier.py --out DIR [--config.steps=...]
"""

import ml_collections

from npp_jax import config as base


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.data_dir = base.FASHION_MNIST_DIR  # the IDX files (Debian's dataset-fashion-mnist by default)
  c.steps = 3000
  c.batch_size = 128
  c.lr = 2e-3
  c.weight_decay = 1e-4
  c.warmup = 100
  c.seed = 0
  return c
