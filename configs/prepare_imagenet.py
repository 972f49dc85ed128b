"""ImageNet train split -> VQ-16 codes at 256 px with the reference's ten-crop (+ its 1.05 crop set if wanted).

  python -m npp_jax.prepare --config configs/prepare_imagenet.py --out DIR --config.data.dir=/data/imagenet \
      --config.vq.checkpoint=ckpt/vq16 [--config.data.extra_crop_range=1.05]
"""

from npp_jax.data import sources
from npp_jax.models import vq

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.data = sources.default_data_config()
  c.data.source = "imagenet"
  c.data.split = "train"
  c.data.augmentation = "tencrop"
  c.vq = vq.default_config()  # VQ-16, image_size 256
  return c
