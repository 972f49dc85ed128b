"""LlamaGen-XXL with Next Patch Prediction on ImageNet 256 (VQ-16 codes, 16x16 grid): the paper's recipe.

Global batch 256, AdamW lr 2e-4 (LlamaGen trained XL and XXL at 2e-4), 300 epochs over 1,281,167 images, 2x2 patches
for the first half, single tokens for the second, the per-stage warmup/constant/decay schedule. Guidance 1.65 for
sampling (the NPP README). Override e.g. --config.npp.stages='((1, 1.0),)' --config.optim.schedule=constant
for the LlamaGen baseline.
"""

from npp_jax import config as base


def get_config():
  return base.imagenet_gpt("XXL", lr=2e-4, cfg_scale=1.65)
