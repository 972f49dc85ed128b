"""Train (or resume) a GPT with Next Patch Prediction.

  python -m npp_jax.main --config configs/gpt_b.py --workdir DIR [--config.key=value ...] [--dry_run]

A workdir that holds a checkpoint resumes from it. --dry_run compiles the train step for the current devices (or
a TPU slice given by --config.mesh.topology) from the abstract state, prints memory and FLOPs, and exits.
"""

from __future__ import annotations

import sys

from absl import flags

from npp_jax import cli
from npp_jax import config_schema
from npp_jax import distributed
from npp_jax import errors
from npp_jax.trainers import dry_run
from npp_jax.trainers import gpt_trainer


def define_flags(fv: flags.FlagValues, argv: list[str]) -> None:
  cli.define_config(fv, argv, "Config file (configs/*.py).", config_schema.TRAINER)
  flags.DEFINE_string("workdir", None, "Where checkpoints, logs and samples go (local path or gs://).", flag_values=fv)
  flags.DEFINE_bool("dry_run", False, "Compile the train step from the abstract state and exit.", flag_values=fv)
  flags.DEFINE_string("coordinator", None, "host:port of process 0, for multi-process runs outside Cloud TPU / "
                      "SLURM (which are detected automatically).", flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "Process count (with --coordinator).", lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator).", lower_bound=0,
                       flag_values=fv)
  flags.DEFINE_integer("init_timeout", 300, "Seconds to wait for every process to join.", lower_bound=1,
                       flag_values=fv)
  flags.register_multi_flags_validator(
      ["coordinator", "num_processes", "process_id"], _processes_agree, flag_values=fv,
      message="--coordinator, --num_processes and --process_id go together, with --process_id below --num_processes")


def _processes_agree(given: dict) -> bool:
  values = (given["coordinator"], given["num_processes"], given["process_id"])
  if all(v is None for v in values):
    return True
  return None not in values and given["process_id"] < given["num_processes"]


def run(fv: flags.FlagValues) -> None:
  if not fv.dry_run and not fv.workdir:
    raise errors.InvalidInput("--workdir is required")
  distributed.initialize(fv.coordinator, fv.num_processes, fv.process_id, fv.init_timeout)
  if fv.dry_run:
    dry_run.run(fv.config)
  else:
    gpt_trainer.run(fv.config, fv.workdir)


def main(argv: list[str] | None = None) -> int:
  return cli.main(run, define_flags, argv, doc=__doc__, required=("config",))


if __name__ == "__main__":
  sys.exit(main())
