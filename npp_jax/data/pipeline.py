"""The training input: Grain over pre-extracted code records (or synthetic codes), batched per process.

The example order is a function of (seed, global index) alone: the records are shuffled anew each epoch, one
augmentation view is drawn per image and epoch, and global batch t holds examples [t*B, (t+1)*B). Each process
reads only its own rows of each global batch. So the data at step t is the same for any number of processes, and
resuming at step t means starting the dataset at batch t: no iterator state has to survive a change of topology.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Iterator

import grain
import ml_collections
import numpy as np

from npp_jax.data import records
from npp_jax.data import synthetic


@dataclasses.dataclass(frozen=True)
class InputSpec:
  """What the model expects of its input."""

  vocab_size: int
  grid: int
  num_classes: int
  tokenizer_checksum: str = ""


class _RecordSource(grain.sources.RandomAccessDataSource):
  """ArrayRecord shards of code records, decoded and validated against the model."""

  def __init__(self, directory: str, spec: InputSpec):
    self.manifest = records.Manifest.read(directory)
    records.check_compatible(self.manifest, vocab_size=spec.vocab_size, grid=spec.grid,
                             num_classes=spec.num_classes, tokenizer_checksum=spec.tokenizer_checksum,
                             where=directory)
    paths = self.manifest.shard_paths(directory)
    missing = [p for p in paths if not _exists(p)]
    if missing:
      raise FileNotFoundError(f"{len(missing)} code shard(s) listed in the manifest are missing, e.g. {missing[0]}")
    self._source = grain.sources.ArrayRecordDataSource(paths)
    if len(self._source) != self.manifest.num_images:
      raise ValueError(f"{directory} holds {len(self._source)} records but its manifest says "
                       f"{self.manifest.num_images}: the preparation did not finish")
    self._vocab_size = spec.vocab_size
    self._directory = directory

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    codes, label = records.decode_record(self._source[index])
    if codes.max(initial=0) >= self._vocab_size:
      raise ValueError(f"record {index} in {self._directory} holds code id {int(codes.max())}, "
                       f"outside the model's vocabulary of {self._vocab_size}")
    return codes, label

  def fingerprint(self) -> str:
    return hashlib.sha256(self.manifest.to_json().encode()).hexdigest()[:16]


def _exists(path: str) -> bool:
  from etils import epath  # pylint: disable=g-import-not-at-top  (also understands gs:// paths)
  return epath.Path(path).exists()


class _ProcessRows(grain.MapDataset):
  """Row r of local batch t is global example t*global_batch + process_index*local_batch + r."""

  def __init__(self, parent: grain.MapDataset, global_batch: int, process_index: int, process_count: int):
    super().__init__(parent)
    self._global, self._local = global_batch, global_batch // process_count
    self._offset = process_index * self._local

  def __len__(self) -> int:
    return len(self._parent) // self._global * self._local

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    batch, row = divmod(index, self._local)
    return self._parent[batch * self._global + self._offset + row]


def _pick_view(example: tuple[np.ndarray, int], rng: np.random.Generator) -> dict[str, np.ndarray]:
  codes, label = example
  view = codes[rng.integers(codes.shape[0])] if codes.shape[0] > 1 else codes[0]
  return {"tokens": view.astype(np.int32), "labels": np.int32(label)}


class TrainInput:
  """An endless, deterministic stream of local batches {'tokens': (b, S) int32, 'labels': (b,) int32}."""

  def __init__(self, data: ml_collections.ConfigDict, spec: InputSpec, *, global_batch: int, seed: int,
               process_index: int = 0, process_count: int = 1, codes_dir: str | None = None):
    if global_batch % process_count:
      raise ValueError(f"the global batch {global_batch} does not split over {process_count} processes")
    if data.kind == "synthetic":
      source = synthetic.SyntheticCodes(spec.vocab_size, spec.grid, spec.num_classes, num_images=data.num_images,
                                        seed=seed)
      self.fingerprint = source.fingerprint()
    elif data.kind == "codes":
      directory = codes_dir or data.codes_dir
      if not directory:
        raise ValueError("data.codes_dir is empty: point it at codes made by `python -m npp_jax.prepare`")
      source = _RecordSource(directory, spec)
      self.fingerprint = source.fingerprint()
    else:
      raise ValueError(f"data.kind must be 'codes' or 'synthetic', got {data.kind!r}")
    self.num_images = len(source)
    if self.num_images < global_batch:
      raise ValueError(f"the data holds {self.num_images} images, fewer than one global batch of {global_batch}")
    dataset = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
    dataset = dataset.random_map(_pick_view, seed=seed + 1)
    dataset = _ProcessRows(dataset, global_batch, process_index, process_count)
    self._batches = dataset.batch(global_batch // process_count, drop_remainder=True)
    self._data = data

  def iterator(self, start_batch: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Batches from global batch `start_batch` on (the train step to resume at)."""
    dataset = self._batches[start_batch:]
    options = grain.ReadOptions(num_threads=max(1, int(self._data.get("read_threads", 4))),
                                prefetch_buffer_size=int(self._data.prefetch) * 8)
    iter_ds = dataset.to_iter_dataset(options)
    if self._data.worker_count > 0:
      iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._data.worker_count))
    return iter(iter_ds)


def steps_per_epoch(num_images: int, global_batch: int) -> int:
  return max(1, num_images // global_batch)

