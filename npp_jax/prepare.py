"""Encode a dataset into VQ codes for training: `python -m npp_jax.prepare --config CONFIG --out DIR`.

The config file defines `get_config()` with two sections: `data` (see `npp_jax.data.sources.default_data_config`)
and `vq` (see `npp_jax.models.vq.default_config`, with `checkpoint` naming the tokenizer weights). Any field can
be overridden on the command line, e.g. `--config.data.dir=/data/imagenet --config.data.shard_size=5000`.
Running the same command again after an interruption continues where it stopped.
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from npp_jax import config as config_lib
from npp_jax.data import prepare as prepare_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file with `data` and `vq` sections.",
                                          lock_config=True)
_OUT = flags.DEFINE_string("out", None, "Output directory for the code shards and manifest.json.")
_PROCESS_INDEX = flags.DEFINE_integer(
    "process_index", -1, "This process's share of the shards (i % process_count == process_index); -1: jax's.")
_PROCESS_COUNT = flags.DEFINE_integer(
    "process_count", -1, "How many processes share the work; -1: jax.process_count(). Processes need no "
    "jax.distributed: each encodes its own shards on its local devices, and process 0 writes the manifest.")
flags.mark_flags_as_required(["config", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)  # jax and Orbax chatter at INFO before the first useful line
  try:
    prepare_lib.prepare_from_config(_CONFIG.value, _OUT.value, _PROCESS_INDEX.value, _PROCESS_COUNT.value)
  except (ValueError, FileNotFoundError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=config_lib.parse_absl_flags)
