"""Train (or resume) a GPT with Next Patch Prediction.

  python -m npp_jax.main --config configs/gpt_b.py --workdir DIR [--config.key=value ...] [--dry_run]

A workdir that holds a checkpoint resumes from it. --dry_run compiles the train step for the current devices (or
a TPU slice given by --config.mesh.topology) from the abstract state, prints memory and FLOPs, and exits.
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from npp_jax import config as config_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and samples go (local path or gs://).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Compile the train step from the abstract state and exit.")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0, for multi-process runs "
                                   "outside Cloud TPU / SLURM (which are detected automatically).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Process count (with --coordinator).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator).")
_INIT_TIMEOUT = flags.DEFINE_integer("init_timeout", 300, "Seconds to wait for every process to join.")


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(1)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}; options are --config, --workdir, --dry_run, --config.key=value")
  config = _CONFIG.value
  if config is None:
    _fail("--config is required, e.g. --config configs/tiny.py")
  if not _DRY_RUN.value and not _WORKDIR.value:
    _fail("--workdir is required")
  # Imported after flag parsing, so absl's --jax_* flags take effect first.
  from npp_jax import distributed, dry_run, train  # pylint: disable=g-import-not-at-top

  try:
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _INIT_TIMEOUT.value)
    if _DRY_RUN.value:
      dry_run.run(config)
    else:
      train.run(config, _WORKDIR.value)
  except (ValueError, OSError, distributed.StartupError, train.NonFiniteLossError) as e:
    _fail(" ".join(str(e).split()))  # one line, even for multi-line messages


def run_main() -> None:
  logging.set_verbosity(logging.WARNING)  # Orbax and XLA log every step at INFO
  app.run(main, flags_parser=config_lib.parse_absl_flags)


if __name__ == "__main__":
  run_main()
