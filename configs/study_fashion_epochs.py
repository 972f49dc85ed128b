"""Does NPP pay off in the paper's regime, many epochs over a fixed set? (`python -m npp_jax.study`)

  python -m npp_jax.study --config configs/study_fashion_epochs.py --workdir runs/study_epochs
  python -m npp_jax.study --config configs/study_fashion_epochs.py --workdir runs/quick --config.study.quick=True

The paper's gain (LlamaGen-B FID 5.46 -> 4.47) is after 300 epochs, against LlamaGen's next-token baseline at a
constant rate, while NPP's --scheduler warms up, holds and decays the rate in every stage. So the arms are the
two schedules crossed with the two objectives:
  ntp_constant  next-token prediction, one warmup then a constant rate (the paper's baseline);
  ntp           next-token prediction with the stagewise schedule (warmup, constant, decay to end_lr);
  npp_2x2       2x2 patches then tokens, the stagewise schedule restarted at the switch (the reference's recipe);
  npp_2x2_constant  2x2 patches then tokens at the constant rate: the patches without the decay.
Every arm is the default run's model (configs/fashion.py) on a class-balanced 1,000-image subset of the training
set, with budgets in epochs of that subset, matched at equal images and at equal FLOPs, two seeds; each run logs
its next-token loss on 1,000 test images about ten times, to show whether it has converged.
"""

import pathlib

from npp_jax import config as config_lib


def get_config():
  c = config_lib.load_file(str(pathlib.Path(__file__).with_name("study_fashion.py")))
  c.data.subset_per_class = 100
  c.data.heldout_split = "test"
  c.data.heldout_images = 1000
  c.eval.heldout_every = 1  # on; each run's interval is its steps / study.heldout_points
  c.train.log_every = 10

  s = c.study
  ntp, npp_2x2 = {"stages": ((1, 1.0),)}, {"stages": ((2, 0.5), (1, 0.5))}
  constant = {"schedule": "warmup_constant"}
  s.arms = {"ntp_constant": {"npp": ntp, "optim": constant}, "ntp": {"npp": ntp},
            "npp_2x2": {"npp": npp_2x2}, "npp_2x2_constant": {"npp": npp_2x2, "optim": constant}}
  s.baseline = "ntp_constant"
  s.also_against = ("ntp",)  # the report compares every arm with these too
  s.budget_unit = "epochs"
  s.budgets = (5, 15, 45)
  s.heldout_points = 10
  s.quick_overrides.study.update(budgets=(2,), heldout_points=2)
  s.quick_overrides.data = {"subset_per_class": 4, "heldout_images": 40}
  return c
