"""Trains the Fashion-MNIST classifier of the online metric and writes it as a shippable directory.

  python -m npp_jax.train_classifier --config configs/fashion_classifier.py --out npp_jax/assets/fashion_classifier

The recipe is `npp_jax.trainers.classifier_trainer`'s. The directory gets params.npz, meta.json (architecture,
checksums, recipe, accuracies) and test_stats.npz (the online FD's reference statistics).
"""

from __future__ import annotations

import sys

from absl import flags

from npp_jax import cli
from npp_jax import config_schema
from npp_jax.trainers import classifier_trainer


def define_flags(fv: flags.FlagValues, argv: list[str]) -> None:
  cli.define_config(fv, argv, "Config file (configs/fashion_classifier.py).", config_schema.CLASSIFIER)
  flags.DEFINE_string("out", None, "Directory to write the classifier to.", flag_values=fv)



def run_from_flags(fv: flags.FlagValues) -> str:
  meta = classifier_trainer.run(fv.config, fv.out)
  return (f"test accuracy {meta['test_accuracy']:.4f}, train accuracy {meta['train_accuracy']:.4f}, "
          f"{meta['train_seconds']} s of training; wrote {fv.out}")


def main(argv: list[str] | None = None) -> int:
  return cli.main(run_from_flags, define_flags, argv, doc=__doc__, required=("config", "out"))


if __name__ == "__main__":
  sys.exit(main())
