"""Writing files so that a crash never leaves half of one behind, and their checksums."""

from __future__ import annotations

import hashlib
import os
import pathlib
import tempfile
from typing import Callable

import numpy as np


def write_atomically(path: str | os.PathLike, write: Callable[[str], None]) -> None:
  """Calls `write(tmp_path)` for a temporary file beside `path`, then renames it over `path`."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
  os.close(fd)
  try:
    write(tmp)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def write_text(path: str | os.PathLike, text: str) -> None:
  """Writes `text` to `path`, atomically."""
  write_atomically(path, lambda tmp: pathlib.Path(tmp).write_text(text))


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
  """np.savez to `path`, atomically."""

  def write(tmp: str) -> None:
    with open(tmp, "wb") as f:  # A file object: given a name, np.savez would append .npz to it.
      np.savez(f, **arrays)

  write_atomically(path, write)


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
  """The hex sha256 of a file's bytes, read in chunks (reference batches are gigabytes)."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(chunk_bytes):
      digest.update(block)
  return digest.hexdigest()
