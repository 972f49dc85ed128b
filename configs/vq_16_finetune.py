"""Fine-tunes LlamaGen's VQ-16 on an image folder with the reference's full recipe (`train_vq_finetune.sh`).

  python -m npp_jax.train_tokenizer --config configs/vq_16_finetune.py --workdir runs/vq16_ft \
      --config.train.init_from=/path/to/vq_ds16_c2i.pt --config.data.dir=/path/to/images/train \
      --config.perceptual.vgg_weights=/path/to/vgg16-397923af.pth \
      --config.perceptual.lpips_weights=/path/to/lpips/weights/v0.1/vgg.pth

The reference's settings (`tokenizer/tokenizer_image/vq_train.py` and `vq_loss.py`): 256x256 images, L2
reconstruction, LPIPS on VGG16 (weight 1.0), PatchGAN with 64 channels and 3 layers, hinge losses, weight 0.5, on
from the first step when fine-tuning (`--disc-start 0`; 20000 when training from scratch), no adaptive weight;
codebook and commitment terms (beta 0.25, l2-normalised 8-dim codes); Adam (0.9, 0.95) at a constant 1e-4 for both
networks, gradient clipping at 1.0, batch 128. The reference crops at random and flips; here one of the centre crop
and its mirror is drawn per step (augmentation 'flip'). Both weight files come from the user: torchvision's vgg16
state dict (`classifier.*` is not read) and LPIPS's `vgg.pth` (in the `lpips` package: weights/v0.1/vgg.pth).
The trained tokenizer is a saved tokenizer directory (workdir/tokenizer) that `prepare`, `sample` and the demo read,
and `python -m npp_jax.convert export` writes back to a .pt the reference loads.
"""

import pathlib

from npp_jax import config as config_lib


def get_config():
  c = config_lib.load_file(str(pathlib.Path(__file__).with_name("vq_fashion.py")))
  c.vq = config_lib.vq_config()  # VQ-16
  c.vq.checkpoint = ""  # the weights come from train.init_from
  c.data.source = "folder"
  c.data.dir = ""
  c.data.augmentation = "flip"
  c.data.image_size = 256
  c.data.val_images = 1000
  c.optim.lr = 1e-4
  c.optim.schedule = "constant"
  c.optim.warmup_steps = 0
  c.optim.weight_decay = 0.0
  c.optim.grad_clip = 1.0
  c.train.batch_size = 128
  c.train.steps = 10000
  c.train.restart_every = 0
  c.train.eval_every = 1000
  c.train.eval_batch_size = 64
  c.train.checkpoint_every = 1000
  c.train.log_every = 100
  c.train.init_from = ""  # the VQ-16 to start from: vq_ds16_c2i.pt or a saved tokenizer directory
  c.perceptual.weight = 1.0
  c.perceptual.network = "lpips_vgg"
  c.disc.weight = 0.5
  c.disc.start = 0
  return c
