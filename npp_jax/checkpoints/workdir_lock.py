"""One trainer per workdir: an exclusive lock held for the whole run.

Local disks: `fcntl.flock` on WORKDIR/LOCK. The kernel drops the lock when the process dies (even by kill -9), so a
crash never leaves a stale lock; the file's text (host, pid, start time) only names the holder.

Object stores (gs://, s3://), which have no locks: a lease object WORKDIR/LEASE.json with host, pid, start time and
a heartbeat that the holder rewrites every `heartbeat_s` seconds from a background thread. The stale-lease rule: a
lease whose heartbeat is older than `stale_after_s` (five heartbeats; a live holder is never that late) belongs to a
dead trainer and is taken over, with one log line. After writing its lease a trainer reads it back once the store
has settled; if another trainer's lease is there instead (two took over at once), the later writer won and the
other refuses.

A second trainer on a held workdir gets WorkdirInUse: "WORKDIR is in use by pid N on HOST since T".
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
import uuid
from typing import Callable

import numpy as np
from etils import epath

from npp_jax import errors

LOCK_FILE = "LOCK"
LEASE_FILE = "LEASE.json"
HEARTBEAT_S = 60.0
STALE_AFTER_S = 5 * HEARTBEAT_S


class WorkdirInUse(errors.UserError, OSError):
  """Another live trainer holds the workdir."""


def _now() -> str:
  return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _holder() -> dict:
  return {"host": socket.gethostname(), "pid": os.getpid(), "since": _now()}


def _in_use(workdir: str, holder: dict) -> WorkdirInUse:
  return WorkdirInUse(f"{workdir} is in use by pid {holder.get('pid', '?')} on {holder.get('host', '?')} since "
                      f"{holder.get('since', '?')}; stop that trainer or use another workdir")


def _unwritable(workdir: str, error: OSError) -> OSError:
  return OSError(f"cannot write to the workdir {workdir}: {error.strerror or error}")


class FileLock:
  """flock on a local file; released by close() or by the process's death."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    path = os.path.join(workdir, LOCK_FILE)
    try:
      os.makedirs(workdir, exist_ok=True)
      self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise _unwritable(workdir, e) from None
    try:
      fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read_json(lambda: os.pread(self._fd, 4096, 0).decode())
      os.close(self._fd)
      raise _in_use(workdir, holder) from None
    except OSError as e:  # e.g. a network filesystem without locks
      os.close(self._fd)
      raise OSError(f"cannot lock the workdir {workdir}: {e.strerror or e}") from None
    os.ftruncate(self._fd, 0)
    os.pwrite(self._fd, json.dumps(_holder()).encode(), 0)

  def close(self) -> None:
    if self._fd is not None:
      os.close(self._fd)  # releases the flock; the file stays (unlinking it would race with a new locker)
      self._fd = None


class Lease:
  """A heartbeat lease object, for stores without locks."""

  def __init__(self, workdir: str, log: Callable[[str], None] = print, *, heartbeat_s: float = HEARTBEAT_S,
               stale_after_s: float = STALE_AFTER_S, settle_s: float = 2.0):
    self.workdir, self._heartbeat_s = workdir, heartbeat_s
    self._path = epath.Path(workdir) / LEASE_FILE
    self._token = uuid.uuid4().hex
    self._holder = _holder()
    self._stop = threading.Event()
    current = _read_json(self._path.read_text) if self._path.exists() else None
    if current is not None and not current:
      log(f"replacing the unreadable lease {self._path} (its writer died while writing it)")
    if current:
      age = time.time() - float(current.get("heartbeat", 0))
      if age < stale_after_s:
        raise _in_use(workdir, current)
      log(f"taking over the stale lease of pid {current.get('pid')} on {current.get('host')} in {workdir} "
          f"(no heartbeat for {age:.0f} s, more than {stale_after_s:.0f} s)")
    try:
      epath.Path(workdir).mkdir(parents=True, exist_ok=True)
      self._write()
    except OSError as e:
      raise _unwritable(workdir, e) from None
    time.sleep(settle_s)
    current = _read_json(self._path.read_text)
    if current.get("token") != self._token:
      raise _in_use(workdir, current)
    self._thread = threading.Thread(target=self._beat, name="workdir-lease", daemon=True)
    self._thread.start()

  def _write(self) -> None:
    self._path.write_text(json.dumps({**self._holder, "token": self._token, "heartbeat": time.time()}))

  def _beat(self) -> None:
    while not self._stop.wait(self._heartbeat_s):
      try:
        self._write()
      except OSError as e:  # a store hiccup; the next beat retries well within the stale limit
        print(f"warning: could not renew the lease {self._path}: {e}", flush=True)

  def close(self) -> None:
    self._stop.set()
    self._thread.join()
    try:
      if _read_json(self._path.read_text).get("token") == self._token:
        self._path.unlink()
    except OSError:
      pass  # the lease goes stale by itself


def _read_json(read: Callable[[], str]) -> dict:
  try:
    return json.loads(read() or "{}")
  except (OSError, ValueError):
    return {}  # written by a holder that died mid-write, or unreadable: the caller says "?"


class _NotHeld:
  """What processes other than 0 hold: process 0 holds the lock for the whole run."""

  def close(self) -> None:
    pass


def acquire(workdir: str, log: Callable[[str], None] = print) -> FileLock | Lease | _NotHeld:
  """The workdir's lock: flock on local paths, a lease on object stores. Call close() when the run ends.

  With several processes, process 0 takes it and tells the others, so that every process stops or none does.
  """
  import jax  # pylint: disable=g-import-not-at-top

  if jax.process_count() == 1:
    return Lease(workdir, log) if "://" in workdir else FileLock(workdir)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  lock, error = _NotHeld(), None
  if jax.process_index() == 0:
    try:
      lock = Lease(workdir, log) if "://" in workdir else FileLock(workdir)
    except OSError as e:
      error = e
  held = bool(multihost_utils.broadcast_one_to_all(np.array(error is None)))
  if error is not None:
    raise error
  if not held:
    raise WorkdirInUse(f"{workdir} is in use or not writable (process 0 says why)")
  return lock
