"""The small Fashion-MNIST tokenizer: 28x28 garments padded to 32x32 -> 8x8 codes from a 512x8 codebook.

Trained by `python -m npp_jax.train_tokenizer --config configs/vq_fashion.py --workdir DIR`; `vq.checkpoint`
points at the copy shipped in npp_jax/assets/vq_fashion (see its README.md for the command and the figures).

Sized for a 2-core CPU: the same LlamaGen VQModel at its smallest useful width (32 channels, the GroupNorm's
32 groups), two downsamples, and no residual blocks in the encoder levels (num_res_blocks=0: the encoder is
conv_in, two strided convs and the middle blocks; the decoder keeps one residual block per level). Encoding stays
cheap, which the demo pays for 60k images.
"""

import ml_collections

from npp_jax import config as base


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.vq = base.fashion_tokenizer()  # its architecture; vq.checkpoint points at the shipped copy

  c.data = ml_collections.ConfigDict()
  c.data.source = "fashion_mnist"
  c.data.dir = base.FASHION_MNIST_DIR
  c.data.augmentation = "pad"  # Centred on a black 32x32 canvas; no flips (Fashion-MNIST's shoes face left).
  c.data.image_size = 32
  c.data.pad_value = 0
  c.data.val_images = 1000  # The last training images, held out for validation during training.

  # AdamW with npp_jax.trainers.optim's schedule: linear warmup, constant, linear decay over the last decay_fraction.
  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 2e-3
  c.optim.end_lr = 1e-4
  c.optim.schedule = "stagewise"
  c.optim.warmup_steps = 50
  c.optim.decay_fraction = 0.5
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.05
  c.optim.decay = "ndim>=2"
  c.optim.grad_clip = 1.0
  c.optim.mu_dtype = "float32"

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 64
  c.train.steps = 1500
  c.train.l1_weight = 0.0
  c.train.codebook_weight = 1.0
  c.train.restart_every = 50  # Re-initialise codes unused over this many steps (0: never).
  c.train.restart_until = 0.75  # ... during this fraction of the run.
  c.train.log_every = 50
  c.train.eval_every = 250
  c.train.eval_batch_size = 500
  c.train.checkpoint_every = 250
  c.train.keep_checkpoints = 2
  return c
