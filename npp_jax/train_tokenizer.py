"""Trains the VQ tokenizer (the pipeline's own `VQModel`), e.g. the Fashion-MNIST one shipped in
npp_jax/assets/vq_fashion.

  python -m npp_jax.train_tokenizer --config configs/vq_fashion.py --workdir DIR [--config.key=value ...]

A rerun resumes from the newest checkpoint. The losses, the dead-code restarts, the metrics and the workdir are
described in `npp_jax.trainers.tokenizer_trainer`.
"""

from __future__ import annotations

import sys
from typing import Sequence

from absl import flags

from npp_jax import cli
from npp_jax import config_schema
from npp_jax.trainers import tokenizer_trainer



def define_flags(fv: flags.FlagValues, argv: list[str]) -> None:
  cli.define_config(fv, argv, "Config file (configs/vq_fashion.py).", config_schema.TOKENIZER)
  flags.DEFINE_string("workdir", None, "Where checkpoints, logs and the final tokenizer go.", flag_values=fv)


def run_from_flags(fv: flags.FlagValues) -> None:
  tokenizer_trainer.run(fv.config, fv.workdir)  # It logs its own results.


def main(argv: Sequence[str] | None = None) -> int:
  """python -m npp_jax.train_tokenizer --config FILE --workdir DIR [--config.key=value ...]; returns the status."""
  return cli.main(run_from_flags, define_flags, argv, doc=__doc__, required=("config", "workdir"))


if __name__ == "__main__":
  sys.exit(main())
