"""Integrity records of checkpoint steps: a CRC32 of every file, written after the step commits, checked before a
restore.

Each process records the files it wrote, in `<step>/integrity.process_<i>.json`:

  {"algorithm": "crc32", "process_index": i, "process_count": n, "files": {"state/_METADATA": [size, crc], ...}}

Orbax names what a process writes by its index (`ocdbt.process_<i>/`, `array_metadatas/process_<i>`); every other
file of a step is written by the primary process (0). So the records of one step cover each file once, whatever the
number of processes, and work on any `etils.epath` path (local disks, gs://).

A check reads every recorded file back and compares size and CRC; a missing, truncated or altered file is named.
CRC32 is a check against damage (bit flips, truncation, lost objects), not against tampering.
"""

from __future__ import annotations

import json
import re
import zlib
from typing import Iterator

from etils import epath

from npp_jax import errors

ALGORITHM = "crc32"
RECORD_PREFIX = "integrity.process_"
_OWNER = re.compile(r"(?:^|\.)process_(\d+)$")
_CHUNK = 16 << 20


class IntegrityError(ValueError):
  """A checkpoint step does not match its integrity record."""


def record_name(process_index: int) -> str:
  return f"{RECORD_PREFIX}{process_index}.json"


def owner(relative: str, primary: int = 0) -> int:
  """The process that wrote a file of a step, from Orbax's per-process names; `primary` for the shared files."""
  for part in relative.split("/"):
    match = _OWNER.search(part)
    if match:
      return int(match.group(1))
  return primary


def _walk(directory: epath.Path, prefix: str = "") -> Iterator[tuple[str, epath.Path]]:
  for child in sorted(directory.iterdir(), key=lambda p: p.name):
    relative = prefix + child.name
    if child.is_dir():
      yield from _walk(child, relative + "/")
    elif not (prefix == "" and child.name.startswith(RECORD_PREFIX)):
      yield relative, child


def file_crc(path: epath.Path) -> tuple[int, int]:
  """(size in bytes, CRC32) of one file, read in chunks."""
  crc, size = 0, 0
  with path.open("rb") as f:
    while chunk := f.read(_CHUNK):
      crc = zlib.crc32(chunk, crc)
      size += len(chunk)
  return size, crc


def write_record(step_dir: epath.PathLike, process_index: int = 0, process_count: int = 1) -> dict:
  """Records this process's files of a committed step; returns the record."""
  step_dir = epath.Path(step_dir)
  files = {rel: list(file_crc(path)) for rel, path in _walk(step_dir) if owner(rel) == process_index}
  record = {"algorithm": ALGORITHM, "process_index": process_index, "process_count": process_count,
            "files": files}
  tmp = step_dir / (record_name(process_index) + ".tmp")
  tmp.write_text(json.dumps(record, sort_keys=True))
  tmp.replace(step_dir / record_name(process_index))  # a reader sees the whole record or none
  return record


def has_record(step_dir: epath.PathLike) -> bool:
  return (epath.Path(step_dir) / record_name(0)).exists()


def verify(step_dir: epath.PathLike, process_index: int = 0, process_count: int = 1) -> str | None:
  """Checks the step against its records; a share of them when several processes check it together.

  Returns None if the step is intact (as far as its records go), or a note when it has no (or not every) record.
  Raises IntegrityError naming the first damaged or missing file.
  """
  step_dir = epath.Path(step_dir)
  if not step_dir.is_dir():
    raise IntegrityError(f"{step_dir} is not a directory")
  first = step_dir / record_name(0)
  if not first.exists():
    return f"{step_dir} has no integrity record (written before records existed or killed before it was written)"
  writers = _read(first)["process_count"]
  missing = [i for i in range(writers) if not (step_dir / record_name(i)).exists()]
  for i in range(process_index, writers, process_count):
    if i in missing:
      continue
    record = _read(step_dir / record_name(i))
    if record.get("algorithm") != ALGORITHM:
      raise IntegrityError(f"{step_dir / record_name(i)} uses the unknown algorithm {record.get('algorithm')!r}")
    for rel, (size, crc) in sorted(record["files"].items()):
      path = step_dir / rel
      if not path.exists():
        raise IntegrityError(f"{path} is missing")
      got_size, got_crc = file_crc(path)
      if got_size != size:
        raise IntegrityError(f"{path} has {got_size} bytes, {size} were written")
      if got_crc != crc:
        raise IntegrityError(f"{path} differs from what was written (CRC32 {got_crc:08x}, recorded {crc:08x})")
  if missing:
    return f"{step_dir} lacks the integrity records of processes {missing}; their files are unchecked"
  return None


def _read(path: epath.Path) -> dict:
  try:
    record = json.loads(path.read_text())
    if not isinstance(record.get("files"), dict) or not isinstance(record.get("process_count"), int):
      raise errors.InvalidInput("fields missing")
    return record
  except ValueError as e:
    raise IntegrityError(f"{path} is not a valid integrity record ({e})") from None
