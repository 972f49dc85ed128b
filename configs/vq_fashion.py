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
  c.train.init_from = ""  # a saved tokenizer directory or a LlamaGen .pt/.safetensors to fine-tune ('': random)
  c.train.freeze = ()  # parts held fixed: any of 'encoder', 'codebook', 'decoder'

  # The reference's perceptual and adversarial terms (npp_jax.trainers.vq_losses); a weight of 0 turns one off.
  c.perceptual = ml_collections.ConfigDict()
  c.perceptual.weight = 0.0  # the reference: 1.0
  c.perceptual.network = "fashion_classifier"  # the shipped classifier's features | lpips_vgg
  c.perceptual.classifier = ""  # fashion_classifier: '' for npp_jax/assets/fashion_classifier
  c.perceptual.vgg_weights = ""  # lpips_vgg: torchvision's vgg16 state dict (.pth)
  c.perceptual.lpips_weights = ""  # lpips_vgg: LPIPS's vgg.pth (in the lpips package: weights/v0.1/vgg.pth)

  c.disc = ml_collections.ConfigDict()
  c.disc.weight = 0.0  # the reference: 0.5
  c.disc.start = 0  # the first step (1-based, as the reference counts) with the adversarial terms; it uses 20000
  c.disc.loss = "hinge"  # hinge | vanilla
  c.disc.gen_loss = "hinge"  # hinge | non_saturating
  c.disc.adaptive_weight = False  # taming's balance of the gradients on the last layer (off in the reference)
  c.disc.channels = 64
  c.disc.layers = 3
  c.disc.lr = 1e-4  # constant, Adam with optim's betas, eps and clipping
  return c
