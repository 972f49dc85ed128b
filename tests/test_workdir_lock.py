"""The workdir lock: a second holder is refused with who holds it and since when; the lock goes with its holder
(close, or death); an object-store lease that stopped beating is taken over, a live one is not."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from npp_jax.checkpoints import workdir_lock


def test_a_second_lock_is_refused_until_the_first_is_released(tmp_path):
  first = workdir_lock.acquire(str(tmp_path))
  with pytest.raises(workdir_lock.WorkdirInUse) as refused:
    workdir_lock.acquire(str(tmp_path))
  message = str(refused.value)
  assert message.startswith(f"{tmp_path} is in use by pid {os.getpid()} on {socket.gethostname()} since 20")
  first.close()
  workdir_lock.acquire(str(tmp_path)).close()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from npp_jax.checkpoints import workdir_lock; "
       f"workdir_lock.acquire({str(tmp_path)!r}); print('held', flush=True); time.sleep(60)"],
      stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(workdir_lock.WorkdirInUse, match=f"in use by pid {holder.pid} on "):
      workdir_lock.acquire(str(tmp_path))
  finally:
    holder.kill()  # kill -9: no clean-up runs
    holder.wait()
  workdir_lock.acquire(str(tmp_path)).close()


def test_an_unwritable_workdir_is_one_sentence(tmp_path):
  (tmp_path / "file").write_text("")
  with pytest.raises(OSError, match=r"cannot write to the workdir .*/file/run: "):
    workdir_lock.acquire(str(tmp_path / "file" / "run"))


def lease(path, lines=None, **kwargs):
  return workdir_lock.Lease(str(path), (lines if lines is not None else []).append, settle_s=0, **kwargs)


def test_a_live_lease_refuses_and_a_stale_one_is_taken_over(tmp_path):
  first = lease(tmp_path, heartbeat_s=0.05)
  written = json.loads((tmp_path / workdir_lock.LEASE_FILE).read_text())
  assert written["pid"] == os.getpid() and written["host"] == socket.gethostname()
  time.sleep(0.3)  # several heartbeats: the lease stays fresh
  assert time.time() - json.loads((tmp_path / workdir_lock.LEASE_FILE).read_text())["heartbeat"] < 0.25
  with pytest.raises(workdir_lock.WorkdirInUse, match=f"in use by pid {os.getpid()} on "):
    lease(tmp_path, stale_after_s=10)
  first.close()
  assert not (tmp_path / workdir_lock.LEASE_FILE).exists()  # released

  # A holder that died: its lease is left with an old heartbeat.
  dead = {"host": "other-host", "pid": 4242, "since": "2026-01-01T00:00:00Z", "token": "x",
          "heartbeat": time.time() - 100}
  (tmp_path / workdir_lock.LEASE_FILE).write_text(json.dumps(dead))
  with pytest.raises(workdir_lock.WorkdirInUse, match="in use by pid 4242 on other-host since 2026-01-01"):
    lease(tmp_path, stale_after_s=1000)  # not stale yet by this rule
  lines = []
  taken = lease(tmp_path, stale_after_s=50, lines=lines)
  assert len(lines) == 1 and "taking over the stale lease of pid 4242 on other-host" in lines[0]
  assert json.loads((tmp_path / workdir_lock.LEASE_FILE).read_text())["pid"] == os.getpid()
  taken.close()


def test_two_takers_at_once_leave_one_holder(tmp_path, monkeypatch):
  """The later writer wins: a trainer whose lease was overwritten before it read it back refuses."""
  real_write = workdir_lock.Lease._write

  def write_then_lose(self):
    real_write(self)
    (tmp_path / workdir_lock.LEASE_FILE).write_text(json.dumps(
        {"host": "rival", "pid": 7, "since": "now", "token": "rival", "heartbeat": time.time()}))

  monkeypatch.setattr(workdir_lock.Lease, "_write", write_then_lose)
  with pytest.raises(workdir_lock.WorkdirInUse, match="in use by pid 7 on rival"):
    lease(tmp_path)
