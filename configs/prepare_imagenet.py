"""ImageNet train split -> VQ-16 codes at 256 px with the reference's ten-crop (+ its 1.05 crop set if wanted).

  python -m npp_jax.prepare --config configs/prepare_imagenet.py --out DIR --config.data.dir=/data/imagenet \
      --config.vq.checkpoint=ckpt/vq16 [--config.data.extra_crop_range=1.05]
"""

import ml_collections

from npp_jax import config as base


def get_config():
  c = ml_collections.ConfigDict()
  c.data = base.data_config()
  c.data.source = "imagenet"
  c.data.split = "train"
  c.data.augmentation = "tencrop"
  c.vq = base.vq_config()  # VQ-16, image_size 256
  return c
