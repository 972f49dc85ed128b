"""A trainer's life in its workdir, written once for every trainer that resumes (the GPT's and the tokenizer's).

  with workdir.Run(path, log) as run:          # SIGTERM handler, then the workdir lock
    ...                                        # anything that writes into the workdir (codes, say)
    run.open(config, keep=3, sections=...)     # config.json written or checked, stale temporaries, manager, writer
    state, start = run.restore_or_init(abstract_state, fingerprint, init)
    for step ...:
      run.check_finite(values, step)           # NonFiniteLossError: the last good checkpoint is kept
      if run.stop_requested(step, log_every):  # SIGTERM: save, leave; a rerun resumes
      run.save(step, state, meta)
    run.finish(total, restored_final=start == total)  # commit, verify the final step, then WORKDIR/DONE

On the way out (normally or by an error) the started saves are committed, the manager, writer and lock are closed
and the previous SIGTERM handler is back.
"""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from npp_jax import errors
from npp_jax.checkpoints import checkpoint
from npp_jax.checkpoints import workdir_lock
from npp_jax.trainers import metrics as metrics_lib

DONE_FILE = "DONE"


class NonFiniteLossError(errors.RunStopped):
  """The loss or the gradient norm became NaN or Inf."""


class Preemption:
  """SIGTERM (preemption, scancel, docker stop) asks the loop to save and leave at the next step boundary."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)

  def agreed(self) -> bool:
    """All processes must stop at the same step, so the flag is shared (one tiny collective)."""
    if jax.process_count() == 1:
      return self.requested
    return bool(np.any(multihost_utils.process_allgather(np.array(self.requested))))


def absolute(path: str) -> str:
  return path if "://" in path else os.path.abspath(path)  # Orbax refuses relative paths


class Run:
  """The workdir held by one trainer, from its lock to its DONE file (a context manager)."""

  def __init__(self, path: str, log: Callable[[str], None]):
    self.log = log
    self.path = absolute(str(path))
    self.mngr = None
    self.writer: metrics_lib.Writer | None = None
    # First: a SIGTERM during the slow start-up still ends in a save, not a kill.
    self._preemption = Preemption()
    try:
      self._lock = workdir_lock.acquire(self.path, log)  # before anything is written: codes, config, checkpoints
    except BaseException:
      self._preemption.restore()
      raise

  def __enter__(self) -> Run:
    return self

  def __exit__(self, kind, error, traceback) -> None:
    try:
      if self.mngr is not None:
        if error is None:
          checkpoint.finish(self.mngr)
        else:
          with contextlib.suppress(Exception):  # commit what was started; the first error is the one to report
            checkpoint.finish(self.mngr)
        self.mngr.close()
      if self.writer is not None:
        self.writer.close()
    finally:
      self._lock.close()
      self._preemption.restore()

  def open(self, config: ml_collections.ConfigDict, *, keep: int, sections: Sequence[str] = ("model",),
           ignore: Sequence[str] = ()) -> None:
    """config.json (a workdir resumes only the same `sections`), stale temporaries removed, manager and writer."""
    checkpoint.write_config(self.path, config, sections=sections, ignore=ignore)
    for stale in checkpoint.remove_temporaries(epath.Path(self.path) / checkpoint.CHECKPOINT_DIR):
      self.log(f"removed {stale}, the partial save of an earlier run that stopped mid-save")
    self.mngr = checkpoint.manager(self.path, keep=keep)
    self.writer = metrics_lib.Writer(self.path)

  def restore_or_init(self, abstract_state: Any, fingerprint: str, init: Callable[[], Any]) -> tuple[Any, int]:
    """(state, step): the newest intact checkpoint if it was trained on the same data, else (init(), 0)."""
    restored = checkpoint.restore_newest(self.mngr, abstract_state, self.log)
    if restored is None:
      return init(), 0
    state, meta, latest = restored
    if meta.get("data") != fingerprint:
      raise errors.InvalidInput(f"the checkpoint at step {latest} was trained on other data (fingerprint "
                                f"{meta.get('data')}, now {fingerprint}); use a new workdir")
    self.log(f"resumed from step {latest}")
    return state, latest

  @staticmethod
  def check_finite(values: dict[str, float], step: int) -> None:
    bad = {k: v for k, v in values.items() if k in ("loss", "grad_norm") and not np.isfinite(v)}
    if bad:
      raise NonFiniteLossError(f"non-finite {', '.join(f'{k}={v}' for k, v in bad.items())} at step {step}; "
                               "the last good checkpoint is kept (lower optim.lr or check the data)")

  def stop_requested(self, step: int, log_every: int) -> bool:
    """Whether a SIGTERM asks to save and leave after `step`.

    Every process must take the same decision at the same step: with several processes the flag is shared at log
    steps only (a collective that every process enters); a single process stops at once.
    """
    if jax.process_count() == 1 or step % log_every == 0:
      return self._preemption.agreed()
    return False

  def save(self, step: int, state: Any, meta: dict) -> None:
    checkpoint.save(self.mngr, step, state, meta)

  def leave(self, step: int) -> None:
    """After a SIGTERM: commits the save of `step`; the caller returns, and a rerun resumes from it."""
    checkpoint.finish(self.mngr)
    self.log(f"SIGTERM: saved step {step}; exiting so the run can resume from it")

  def finish(self, total: int, *, restored_final: bool) -> None:
    """Commits every save, then writes WORKDIR/DONE (the babysitter's stop sign) once the final step verifies.

    A final step without a record (killed between its commit and its record) counts as verified once it restored.
    """
    checkpoint.finish(self.mngr)
    note = checkpoint.verify_step(self.mngr, total)
    if note and not restored_final:
      raise checkpoint.CheckpointError(f"the final step {total} was saved but cannot be verified ({note}); "
                                       "DONE is not written")
    if jax.process_index() == 0:
      (epath.Path(self.path) / DONE_FILE).write_text(f"{total}\n")
