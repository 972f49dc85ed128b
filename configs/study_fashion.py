"""NPP against next-token prediction on Fashion-MNIST, at matched images and matched FLOPs (`python -m npp_jax.study`).

  python -m npp_jax.study --config configs/study_fashion.py --workdir runs/study          # 47 min on 2 CPU cores here
  python -m npp_jax.study --config configs/study_fashion.py --workdir runs/quick --config.study.quick=True

Every arm is the default run (configs/fashion.py: the shipped 8x8 tokenizer, the 4-layer GPT, batch 64, the
stagewise rate) with its own schedule: next-token prediction, the reference's 2x2 then 1x1, and 4x4, 2x2, 1x1 (on an
8x8 grid a 4x4 patch leaves a 2x2 grid: 3 predicted positions). Budgets are steps of the baseline (ntp); each is run
at equal images and at equal training FLOPs, with two seeds.
"""

import pathlib

import ml_collections

from npp_jax import config as config_lib


def get_config():
  c = config_lib.load_file(str(pathlib.Path(__file__).with_name("fashion.py")))
  c.train.log_every = 25  # the loss curves' resolution, and the wall-clock windows
  c.train.checkpoint_every = 200

  s = c.study = ml_collections.ConfigDict()
  s.arms = ml_collections.ConfigDict()  # name -> a partial trainer config merged over the one above
  s.arms.ntp = {"npp": {"stages": ((1, 1.0),)}}
  s.arms.npp_2x2 = {"npp": {"stages": ((2, 0.5), (1, 0.5))}}
  s.arms.npp_4x4_2x2 = {"npp": {"stages": ((4, 0.25), (2, 0.25), (1, 0.5))}}
  s.baseline = "ntp"
  s.seeds = (0, 1)
  s.also_against = ()  # more arms every arm is compared with in the report, beside the baseline
  s.budget_unit = "steps"  # or 'epochs': passes over the training set (see data.subset_per_class)
  s.budgets = (200, 400)  # steps of the baseline at train.global_batch_size
  s.heldout_points = 10  # held-out loss evaluations per run, with eval.heldout_every and held-out codes
  s.match = ("images", "flops")
  s.num_samples = 1000
  s.eval_seed = 0  # the same sampling key for every run: differences come from the models
  s.bootstrap = 100  # resamplings of the images for each figure's sampling error
  s.cfg_sweep = ()  # extra guidance scales beside sample.cfg_scale, e.g. (1.5, 4.5): the best per arm is reported

  # A minute or two on 2 cores, for the tests: a 1-layer model, a few steps, 100 samples.
  s.quick = False
  s.quick_overrides = {
      "model": {"dim": 64, "n_layer": 1, "n_head": 2},
      "train": {"global_batch_size": 16, "log_every": 2, "checkpoint_every": 4},
      "optim": {"warmup_steps": 1},
      "eval": {"batch_size": 50, "grid_columns": 2},
      "study": {"budgets": (8,), "num_samples": 100, "bootstrap": 20},
  }
  return c
