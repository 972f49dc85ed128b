"""Encode a dataset into VQ codes for training: `python -m npp_jax.prepare --config CONFIG --out DIR`.

The config file defines `get_config()` with two sections: `data` (see `npp_jax.data.sources.default_data_config`)
and `vq` (see `npp_jax.models.vq.default_config`, with `checkpoint` naming the tokenizer weights). Any field can
be overridden on the command line, e.g. `--config.data.dir=/data/imagenet --config.data.shard_size=5000`.
Running the same command again after an interruption continues where it stopped.
"""

from __future__ import annotations

import sys

from absl import flags

from npp_jax import cli
from npp_jax import config_schema
from npp_jax.data import prepare as prepare_lib


def define_flags(fv: flags.FlagValues, argv: list[str]) -> None:
  cli.define_config(fv, argv, "Config file with `data` and `vq` sections.", config_schema.PREPARE)
  flags.DEFINE_string("out", None, "Output directory for the code shards and manifest.json.", flag_values=fv)
  flags.DEFINE_integer("process_index", -1, "This process's share of the shards (i % process_count == "
                       "process_index); -1: jax's.", flag_values=fv)
  flags.DEFINE_integer("process_count", -1, "How many processes share the work; -1: jax.process_count(). Processes "
                       "need no jax.distributed: each encodes its own shards on its local devices, and process 0 "
                       "writes the manifest.", flag_values=fv)


def run(fv: flags.FlagValues) -> str:
  summary = prepare_lib.prepare_from_config(fv.config, fv.out, fv.process_index, fv.process_count)
  return (f"encoded {summary.images} images x {summary.views} views in {summary.seconds:.1f} s "
          f"({summary.images_per_s:.1f} images/s); shards written {summary.shards_written}, "
          f"already done {summary.shards_reused}")


def main(argv: list[str] | None = None) -> int:
  return cli.main(run, define_flags, argv, doc=__doc__, required=("config", "out"))


if __name__ == "__main__":
  sys.exit(main())
