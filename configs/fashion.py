"""The built-in default: class-conditional Fashion-MNIST with Next Patch Prediction, on 2 CPU cores.

Real data from Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist; --config.data.dir elsewhere),
encoded once into WORKDIR/codes with the tokenizer shipped in npp_jax/assets/vq_fashion (28x28 garments padded to
32x32 -> 8x8 codes of 512). A 4-layer GPT trains 2x2 patches (a 4x4 coarse grid) for the first half of the steps,
then single codes; a sample grid (one row per class) and the classifier metric come at the end.
"""

from npp_jax import config as base


def get_config():
  c = base.base_config()
  c.vq = base.fashion_tokenizer()  # the shipped tokenizer
  c.model.update(dim=192, n_layer=4, n_head=6, vocab_size=c.vq.codebook_size, num_classes=10,
                 block_size=base.grid_size(c.vq) ** 2, dtype="bfloat16", remat="none",
                 scan_layers=False,  # unrolled layers: a faster step on CPU, and 4 layers compile quickly
                 token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0, class_dropout_prob=0.1)
  c.npp.stages = ((2, 0.5), (1, 0.5))

  c.optim.lr = 2e-3
  c.optim.end_lr = 1e-4
  c.optim.warmup_steps = 30
  c.optim.decay_fraction = 0.2

  c.train.global_batch_size = 64
  c.train.total_steps = 1000  # 1,200 gave the same quality within its run-to-run spread, in a fifth more time
  c.train.log_every = 50
  c.train.checkpoint_every = 500

  c.data.source = "fashion_mnist"
  c.data.augmentation = "pad"  # no flips: the shoes all face one way
  c.data.shard_size = 10000
  c.data.encode_batch_size = 500

  c.eval.every = 0  # at the end only (the 2x2-patch model, sampled token by token, gives noise: 9% agreement)
  c.eval.classifier = "fashion"
  c.eval.num_samples = 1000
  c.eval.batch_size = 250
  c.eval.grid_columns = 10
  c.sample.cfg_scale = 3.0
  return c
