"""The on-disk format of pre-extracted codes: one ArrayRecord record per image, plus a manifest.

A record holds every augmentation view of one image and its label:

  header  <4s B B H I i>  magic b"NPPC", format version, reserved, views V, sequence length S, label
  body    V * S little-endian uint16 code ids, view-major, each view in raster order

uint16 covers every vocabulary up to 65,536 codes (VQ-16 has 16,384) at half the bytes of int32.

The manifest (`manifest.json` beside the shards) says what the codes are, so the training input can refuse
codes that do not fit the model: vocabulary, grid, tokenizer checksum, class map.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import struct
from typing import Any, Sequence

import numpy as np
from array_record.python import array_record_module

from npp_jax import errors
from npp_jax import fileio

MAGIC = b"NPPC"
VERSION = 1
_HEADER = struct.Struct("<4sBBHIi")
MANIFEST = "manifest.json"
MAX_VOCAB = 1 << 16


def encode_record(codes: np.ndarray, label: int) -> bytes:
  """Serialises one image's views (V, S) of code ids and its label."""
  codes = np.asarray(codes)
  if codes.ndim != 2:
    raise errors.InvalidInput(f"codes must be (views, seq_len), got shape {codes.shape}")
  if codes.size and (codes.min() < 0 or codes.max() >= MAX_VOCAB):
    raise errors.InvalidInput(f"code ids must lie in [0, {MAX_VOCAB}), got [{codes.min()}, {codes.max()}]")
  views, seq_len = codes.shape
  header = _HEADER.pack(MAGIC, VERSION, 0, views, seq_len, int(label))
  return header + codes.astype("<u2").tobytes()


def decode_record(record: bytes) -> tuple[np.ndarray, int]:
  """Inverse of `encode_record`: returns (codes (V, S) uint16, label)."""
  if len(record) < _HEADER.size:
    raise errors.InvalidInput(f"record of {len(record)} bytes is shorter than its header")
  magic, version, _, views, seq_len, label = _HEADER.unpack_from(record)
  if magic != MAGIC or version != VERSION:
    raise errors.InvalidInput(f"not an npp-jax code record (magic {magic!r}, version {version})")
  expected = _HEADER.size + 2 * views * seq_len
  if len(record) != expected:
    raise errors.InvalidInput(f"record has {len(record)} bytes, its header promises {expected}")
  codes = np.frombuffer(record, dtype="<u2", offset=_HEADER.size).reshape(views, seq_len)
  return codes, label


@dataclasses.dataclass
class Manifest:
  """What a directory of code shards holds. Written last, so its presence means the shards are complete."""

  num_images: int
  num_classes: int
  views: int
  grid: int  # codes per side; seq_len = grid * grid
  vocab_size: int
  shards: list[str]  # file names relative to the directory, in order
  shard_sizes: list[int]
  class_names: list[str] = dataclasses.field(default_factory=list)  # index -> name
  tokenizer_checksum: str = ""
  augmentation: str = ""
  source: dict[str, Any] = dataclasses.field(default_factory=dict)
  image_size: int = 0
  augmentation_args: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. crop_range, extra_crop_range
  skipped: list[int] = dataclasses.field(default_factory=list)  # source indices without a record (unreadable files)

  @property
  def seq_len(self) -> int:
    return self.grid * self.grid

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=1)

  def write(self, directory: str | os.PathLike) -> None:
    """Writes atomically (temp file + rename), so a reader never sees half a manifest."""
    fileio.write_text(pathlib.Path(directory) / MANIFEST, self.to_json())

  @classmethod
  def read(cls, directory: str | os.PathLike) -> "Manifest":
    path = pathlib.Path(directory) / MANIFEST
    if not path.is_file():
      raise FileNotFoundError(f"no {MANIFEST} in {directory}: not a prepared code directory "
                              "(see `python -m npp_jax.prepare`)")
    try:
      fields = json.loads(path.read_text())
      return cls(**fields)
    except (json.JSONDecodeError, TypeError) as e:
      raise errors.InvalidInput(f"{path} is not a valid manifest: {e}") from None

  def shard_paths(self, directory: str | os.PathLike) -> list[str]:
    return [str(pathlib.Path(directory) / name) for name in self.shards]


def check_compatible(manifest: Manifest, *, vocab_size: int, grid: int, num_classes: int,
                     tokenizer_checksum: str = "", where: str = "") -> None:
  """Raises ValueError with one sentence naming every mismatch between codes and the model config."""
  problems: list[str] = []
  if manifest.vocab_size > vocab_size:
    problems.append(f"the codes use a vocabulary of {manifest.vocab_size} but the model has vocab_size={vocab_size}")
  if manifest.grid != grid:
    problems.append(f"the codes are a {manifest.grid}x{manifest.grid} grid but the model's block_size "
                    f"is {grid * grid} ({grid}x{grid})")
  if manifest.num_classes > num_classes:
    problems.append(f"the codes have {manifest.num_classes} classes but the model has num_classes={num_classes}")
  if tokenizer_checksum and manifest.tokenizer_checksum != tokenizer_checksum:
    problems.append(f"the codes were made by tokenizer {manifest.tokenizer_checksum[:12] or '(unrecorded)'} but "
                    f"the config names tokenizer {tokenizer_checksum[:12]}")
  if problems:
    raise errors.InvalidInput(f"codes{(' in ' + where) if where else ''} do not fit the config: " + "; ".join(problems))


def write_shard(path: str | os.PathLike, records: Sequence[bytes]) -> None:
  """Writes one ArrayRecord shard atomically (temp file + rename)."""
  def write(tmp: str) -> None:
    writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
    for record in records:
      writer.write(record)
    writer.close()

  fileio.write_atomically(path, write)
