"""Joining a multi-process run (jax.distributed over XLA collectives), with clear failures instead of hangs."""

from __future__ import annotations

import os
import sys
import threading

import jax

from npp_jax import errors


class StartupError(errors.RunStopped):
  """A multi-process run could not start (a process missing, a coordinator that never answers)."""


def _auto_detected() -> bool:
  """Cloud TPU multi-host slices and SLURM jobs of several tasks are detected by jax itself."""
  tpu_hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  slurm_tasks = int(os.environ.get("SLURM_NTASKS", "1") or 1)
  return "," in tpu_hosts or slurm_tasks > 1 or bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               timeout_s: int = 300) -> None:
  """Calls jax.distributed.initialize when the run has several processes; a single process does nothing."""
  if coordinator is None and not _auto_detected():
    return
  if coordinator is not None and (num_processes is None or process_id is None):
    raise StartupError("--coordinator needs --num_processes and --process_id")
  if jax.config.jax_platforms in ("cpu",) or os.environ.get("JAX_PLATFORMS", "") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
  # A missing process makes the runtime abort from C++ when its own deadline passes, which Python cannot catch.
  # A watchdog with a shorter deadline ends the process first, with a sentence the user can act on.
  where = coordinator or "the auto-detected coordinator"
  message = (f"error: could not join the multi-process run at {where} within {timeout_s} s: a process is "
             "missing or the coordinator is unreachable (start every process, check host:port and firewalls)")
  watchdog = threading.Timer(timeout_s, lambda: (print(message, file=sys.stderr, flush=True), os._exit(1)))
  watchdog.daemon = True
  watchdog.start()
  try:
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id,
                               initialization_timeout=timeout_s + 30)
  except Exception as e:  # noqa: BLE001  (the runtime raises assorted types; the user needs one sentence)
    raise StartupError(f"could not join the multi-process run at {where}: {str(e).strip().splitlines()[0]}"
                       ) from None
  finally:
    watchdog.cancel()
