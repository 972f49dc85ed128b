"""Fine-tunes the shipped Fashion-MNIST tokenizer with the reference's perceptual and adversarial terms.

  python -m npp_jax.train_tokenizer --config configs/vq_fashion_finetune.py --workdir runs/vq_fashion_gan
  # the same extra steps without the new terms, for a fair comparison:
  python -m npp_jax.train_tokenizer --config configs/vq_fashion_finetune.py --workdir runs/vq_fashion_l2 \
      --config.perceptual.weight=0 --config.disc.weight=0

LlamaGen's `train_vq_finetune.sh` recipe at this scale: start from a trained tokenizer (npp_jax/assets/vq_fashion),
the discriminator on from the first step (--disc-start 0), the reference's loss weights (L2 1, perceptual 1,
adversarial 0.5 with hinge losses, codebook and commitment as before) and its optimizer (Adam, betas 0.9/0.95, a
constant 1e-4, no weight decay, clipping at 1.0; the discriminator's Adam the same), plus taming's adaptive weight,
which the reference leaves off. Measured in npp_jax/assets/vq_fashion/README.md. The perceptual network is the
shipped Fashion classifier's features (`npp_jax.trainers.vq_losses`): no VGG weights can be downloaded here, and a
VGG trained on 224px photos would see 32x32 garments at a scale it never learned. No dead-code restarts: the
codebook is trained already and fully used.
"""

import pathlib

from npp_jax import assets
from npp_jax import config as config_lib


def get_config():
  c = config_lib.load_file(str(pathlib.Path(__file__).with_name("vq_fashion.py")))
  c.train.init_from = str(assets.FASHION_TOKENIZER)
  c.train.steps = 100
  c.train.restart_every = 0
  c.train.eval_every = 100
  c.train.checkpoint_every = 50
  c.train.keep_checkpoints = 4
  c.optim.lr = 1e-4
  c.optim.schedule = "constant"
  c.optim.warmup_steps = 0
  c.optim.weight_decay = 0.0
  c.perceptual.weight = 1.0
  c.perceptual.network = "fashion_classifier"
  c.disc.weight = 0.5
  c.disc.start = 0
  # Off in the reference; without it the hinge generator loss overwhelms this small decoder within 100 steps
  # (18.4 dB; npp_jax/assets/vq_fashion/README.md).
  c.disc.adaptive_weight = True
  # Half the reference's width: XLA's CPU convolutions run the 64-channel PatchGAN's step ~14x slower than this one
  # (4x the FLOPs), which this machine cannot afford; the 0.7M-parameter discriminator still outweighs the 0.45M
  # tokenizer.
  c.disc.channels = 32
  return c
