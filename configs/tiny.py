"""A tiny GPT on synthetic 8x8 code grids: the CPU smoke test and the tests' base config."""

from npp_jax import config as base


def get_config():
  c = base.base_config()
  c.model.update(dim=64, n_layer=2, n_head=4, vocab_size=64, num_classes=10, block_size=64, dtype="float32")
  c.npp.stages = ((2, 0.5), (1, 0.5))
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 5
  c.train.global_batch_size = 32
  c.train.total_steps = 60
  c.train.log_every = 10
  c.train.checkpoint_every = 30
  c.data.kind = "synthetic"
  c.data.num_images = 2048
  return c
