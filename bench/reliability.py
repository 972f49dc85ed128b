"""Reliability matrix (not a test): kill -9 at random moments, damaged checkpoints, two trainers, a full disk; each
case must end in a run that equals an uninterrupted one bit for bit, or in one clear sentence.

  python bench/reliability.py --kills 10            # the audit's matrix: 10 random kills, the damage cases
  python bench/reliability.py --kills 3 --steps 30  # quicker

Every run is `python -m npp_jax.main --config configs/tiny.py` in a subprocess on one CPU device:
  reference      an uninterrupted run; its final checkpoint is what every recovered run must equal
  kill i         one kill -9 at a random moment (odd i: right after a checkpoint step's log line, so mostly inside the
                 asynchronous save), then restarts until DONE; compared bitwise with the reference
  damage X       a copy of the reference without DONE whose newest step is damaged (flipped bytes, truncated file,
                 no _METADATA, no meta item, an empty newer step, no integrity record): the restart must move the
                 step aside (or note the missing record), resume from the previous one and end bitwise equal
  two trainers   a second trainer on a running workdir must exit 1 with "in use by pid N on HOST since T"
  full disk      (root only: a 3 MiB tmpfs) the save that does not fit must end with exit 1, one sentence, and no
                 partial directory; then, with room again, the run must resume and finish
Prints one table row per case: what was expected, what happened, and the seconds it took. The bad inputs (values a
command must refuse with one sentence, changing nothing on disk) are replayed by its sibling, bench/bad_inputs.py.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def trainer_command(workdir: pathlib.Path, steps: int, every: int) -> list[str]:
  return [sys.executable, "-m", "npp_jax.main", "--config", "configs/tiny.py", "--workdir", str(workdir),
          f"--config.train.total_steps={steps}", f"--config.train.checkpoint_every={every}",
          f"--config.train.log_every={every}", "--config.train.keep_checkpoints=3"]


ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


def run(workdir, steps, every, timeout=600) -> subprocess.CompletedProcess:
  return subprocess.run(trainer_command(workdir, steps, every), cwd=REPO, env=ENV, capture_output=True, text=True,
                        timeout=timeout, check=False)


def final_state(workdir: pathlib.Path, step: int) -> dict[str, np.ndarray]:
  """Every array of the step's train state, as numpy, by path."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  restored = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
  leaves = jax.tree_util.tree_flatten_with_path(restored)[0]
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def bitwise_equal(a: dict, b: dict) -> bool:
  return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes() for k in a)


def run_to_done(workdir, steps, every, attempts=4) -> tuple[bool, str]:
  """Restarts like the babysitter until DONE; (done, the last error line)."""
  last = ""
  for _ in range(attempts):
    result = run(workdir, steps, every)
    if (workdir / "DONE").exists():
      return True, last
    last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
  return False, last


def kill_case(index: int, root: pathlib.Path, steps: int, every: int, reference: dict, span: float,
              rng: random.Random) -> tuple[str, str, bool]:
  workdir = root / f"kill{index}"
  proc = subprocess.Popen(trainer_command(workdir, steps, every), cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)  # progress is logged to stderr
  saw_tmp = threading.Event()

  def watch():  # records whether a save was in flight at the kill
    while proc.poll() is None:
      if any(".orbax-checkpoint-tmp" in p.name for p in (workdir / "checkpoints").glob("*")):
        saw_tmp.set()
      time.sleep(0.001)

  threading.Thread(target=watch, daemon=True).start()
  moment = "random"
  if index % 2:  # right after a checkpoint step's progress line: the save starts there
    target = rng.randrange(every, steps, every)
    moment = f"after the log line of step {target}"
    for line in proc.stdout:
      if f"[{target}/" in line:  # the progress line of step `target` (after the log prefix)
        time.sleep(rng.uniform(0, 0.05))
        break
  else:
    delay = rng.uniform(0.2, 1.0) * span
    moment = f"{delay:.1f} s in"
    time.sleep(delay)
  tmp_at_kill = any(".orbax-checkpoint-tmp" in p.name for p in (workdir / "checkpoints").glob("*"))
  proc.kill()
  proc.wait()
  committed = sorted(int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()) \
      if (workdir / "checkpoints").exists() else []
  done, last = run_to_done(workdir, steps, every)
  same = done and bitwise_equal(final_state(workdir, steps), reference)
  what = (f"kill -9 {moment} (committed {committed[-1] if committed else 'none'}"
          f"{', save in flight' if tmp_at_kill else ''})")
  return what, "resumed, DONE, bitwise equal" if same else f"FAILED: done={done} {last}", same


def damage_newest(workdir: pathlib.Path, steps: int, kind: str) -> None:
  newest = workdir / "checkpoints" / str(steps)
  data = max((p for p in newest.rglob("*") if p.is_file() and "/d/" in str(p)), key=lambda p: p.stat().st_size)
  if kind == "flipped bytes":
    raw = bytearray(data.read_bytes())
    for i in range(len(raw) // 2, min(len(raw), len(raw) // 2 + 64)):
      raw[i] ^= 0xFF
    data.write_bytes(bytes(raw))
  elif kind == "truncated file":
    data.write_bytes(data.read_bytes()[: len(data.read_bytes()) // 2])
  elif kind == "no _METADATA":
    (newest / "state" / "_METADATA").unlink()
  elif kind == "no meta item":
    shutil.rmtree(newest / "meta")
  elif kind == "empty newer step":
    (workdir / "checkpoints" / str(steps + 1000)).mkdir()
  elif kind == "no integrity record":
    (newest / "integrity.process_0.json").unlink()


DAMAGES = ("flipped bytes", "truncated file", "no _METADATA", "no meta item", "empty newer step",
           "no integrity record")


def damage_case(kind: str, root: pathlib.Path, reference_dir: pathlib.Path, steps: int, every: int,
                reference: dict) -> tuple[str, str, bool]:
  workdir = root / ("damage-" + kind.replace(" ", "_"))
  shutil.copytree(reference_dir, workdir)
  (workdir / "DONE").unlink()
  damage_newest(workdir, steps, kind)
  result = run(workdir, steps, every)
  moved = sorted(p.name for p in (workdir / "checkpoints").iterdir() if ".corrupt-" in p.name)
  done = (workdir / "DONE").exists()
  same = done and bitwise_equal(final_state(workdir, steps), reference)
  if kind == "no integrity record":
    ok = same and "has no integrity record" in result.stdout + result.stderr and not moved
    return f"damage: {kind}", "restored unchecked with a note, DONE" if ok else f"FAILED: {result.stderr[-300:]}", ok
  line = [text for text in (result.stdout + result.stderr).splitlines() if "is damaged" in text]
  ok = same and len(moved) == 1 and len(line) == 1
  got = f"moved aside {moved[0]}, resumed, bitwise equal" if ok else f"FAILED: moved={moved} {result.stderr[-300:]}"
  return f"damage: {kind}", got, ok


def two_trainers_case(root: pathlib.Path, steps: int, every: int) -> tuple[str, str, bool]:
  workdir = root / "two"
  first = subprocess.Popen(trainer_command(workdir, steps * 4, every), cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)  # progress is logged to stderr
  try:
    for line in first.stdout:
      if re.search(r"\[\d+/\d+\]", line):  # a progress line: training, the lock is held
        break
    second = run(workdir, steps, every)
  finally:
    first.kill()
    first.wait()
  lines = second.stderr.strip().splitlines()
  ok = (second.returncode == 1 and len(lines) == 1 and f"is in use by pid {first.pid} on " in lines[0])
  return "two trainers on one workdir", (lines[0][:90] if ok else f"FAILED: {second.returncode} {lines[-1:]}"), ok


def full_disk_case(root: pathlib.Path, steps: int, every: int, reference: dict) -> tuple[str, str, bool]:
  mount = root / "full"
  mount.mkdir()
  if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
                                         capture_output=True).returncode != 0:
    return "full disk during a save", "not run (needs root to mount a small tmpfs)", True
  try:
    workdir = mount / "run"
    result = run(workdir, steps, every)
    lines = result.stderr.strip().splitlines()
    partial = [p.name for p in (workdir / "checkpoints").glob("*") if ".orbax-checkpoint-tmp" in p.name]
    refused = result.returncode == 1 and len(lines) == 1 and "Traceback" not in result.stderr and not partial
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit())
    # Room again: move the run to a real disk and finish it.
    moved = root / "full-resumed"
    shutil.copytree(workdir, moved)
  finally:
    subprocess.run(["umount", str(mount)], check=False)
  done, last = run_to_done(moved, steps, every)
  same = done and bitwise_equal(final_state(moved, steps), reference)
  ok = refused and same
  got = (f"exit 1 after step {saved[-1] if saved else 'none'}: {lines[-1][:70]}...; resumed elsewhere, equal"
         if ok else f"FAILED: rc={result.returncode} partial={partial} lines={len(lines)} {last}")
  return "full disk during a save", got, ok


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--kills", type=int, default=10)
  p.add_argument("--steps", type=int, default=40)
  p.add_argument("--every", type=int, default=5, help="checkpoint and log interval")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--keep", action="store_true", help="keep the workdirs (printed)")
  args = p.parse_args(argv)
  rng = random.Random(args.seed)
  root = pathlib.Path(tempfile.mkdtemp(prefix="npp-reliability-"))
  rows = []
  try:
    started = time.time()
    reference_dir = root / "reference"
    result = run(reference_dir, args.steps, args.every)
    span = time.time() - started
    if not (reference_dir / "DONE").exists():
      print(result.stderr[-3000:])
      return 1
    reference = final_state(reference_dir, args.steps)
    rows.append(("uninterrupted reference", f"DONE in {span:.0f} s", True, span))
    cases = [lambda i=i: kill_case(i, root, args.steps, args.every, reference, span, rng) for i in range(args.kills)]
    cases += [lambda k=k: damage_case(k, root, reference_dir, args.steps, args.every, reference) for k in DAMAGES]
    cases += [lambda: two_trainers_case(root, args.steps, args.every),
              lambda: full_disk_case(root, args.steps, args.every, reference)]
    for case in cases:
      t = time.time()
      what, got, ok = case()
      rows.append((what, got, ok, time.time() - t))
      print(f"{'ok ' if ok else 'BAD'} {what}: {got} ({time.time() - t:.0f} s)", flush=True)
  finally:
    if not args.keep:
      shutil.rmtree(root, ignore_errors=True)
  width = max(len(r[0]) for r in rows)
  print()
  print(f"{'case':{width}}  {'ok':3}  {'s':>4}  result")
  for what, got, ok, seconds in rows:
    print(f"{what:{width}}  {'yes' if ok else 'NO':3}  {seconds:4.0f}  {got}")
  bad = sum(not r[2] for r in rows)
  kills = [r for r in rows if r[0].startswith("kill")]
  print(f"\n{sum(r[2] for r in kills)}/{len(kills)} kills resumed bitwise equal; {bad} case(s) failed"
        + (f"; workdirs in {root}" if args.keep else ""))
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
