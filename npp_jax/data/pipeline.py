"""The training input: Grain over pre-extracted code records (or synthetic codes), batched per process.

The example order is a function of (seed, global index) alone: the records are shuffled anew each epoch, one
augmentation view is drawn per image and epoch, and global batch t holds examples [t*B, (t+1)*B). Each process
reads only its own rows of each global batch. So the data at step t is the same for any number of processes, and
resuming at step t means starting the dataset at batch t: no iterator state has to survive a change of topology.
`data.subset_per_class` trains on a seeded, class-balanced subset of the records (the many-epochs regime of a
small set); `heldout_codes` reads codes that the model never trains on, for the held-out loss.

Grain's elements are whole local batches, read with one batched ArrayRecord call: per-record Python overhead
would otherwise cap the input at a few thousand records/s.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from typing import Iterator

import grain
import ml_collections
import numpy as np
from array_record.python import array_record_module
from etils import epath  # also understands gs:// paths

from npp_jax import errors
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
    self._paths = paths
    self._thread = threading.local()  # one set of readers per Grain read thread: no locks on the hot path
    sizes = [reader.num_records() for reader in self._readers()]
    self._starts = np.cumsum([0] + sizes)
    if self._starts[-1] != self.manifest.num_images:
      raise errors.InvalidInput(f"{directory} holds {self._starts[-1]} records but its manifest says "
                                f"{self.manifest.num_images}: the preparation did not finish")
    self._vocab_size = spec.vocab_size
    # Labels index the class embedding, whose last row is the null class: a label past the classes would be
    # clamped onto it by the gather and trained on silently.
    self._num_classes = self.manifest.num_classes or spec.num_classes
    self._directory = directory

  def _readers(self) -> list:
    if not hasattr(self._thread, "readers"):
      self._thread.readers = [array_record_module.ArrayRecordReader(p, "readahead_buffer_size:0")
                              for p in self._paths]
    return self._thread.readers

  def __len__(self) -> int:
    return int(self._starts[-1])

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    return self.read_many([index])[0]

  def read_many(self, indices: list[int]) -> list[tuple[np.ndarray, int]]:
    """One batched read per shard (ArrayRecordDataSource's per-call thread pool costs more than the reads)."""
    indices_arr = np.asarray(indices)
    shards = np.searchsorted(self._starts, indices_arr, side="right") - 1
    raw: list[bytes] = [b""] * len(indices)
    readers = self._readers()
    for shard in np.unique(shards):
      rows = np.nonzero(shards == shard)[0]
      for row, record in zip(rows, readers[shard].read((indices_arr[rows] - self._starts[shard]).tolist())):
        raw[row] = record
    examples = [records.decode_record(r) for r in raw]
    for index, (codes, label) in zip(indices, examples):
      if codes.max(initial=0) >= self._vocab_size:
        raise errors.InvalidInput(f"record {index} in {self._directory} holds code id {int(codes.max())}, "
                                  f"outside the model's vocabulary of {self._vocab_size}")
      if not 0 <= label < self._num_classes:
        raise errors.InvalidInput(f"record {index} in {self._directory} has label {label}, outside the "
                                  f"{self._num_classes} classes [0, {self._num_classes}) of its manifest and model")
    return examples

  def fingerprint(self) -> str:
    return hashlib.sha256(self.manifest.to_json().encode()).hexdigest()[:16]

  def labels(self) -> np.ndarray:
    """Every record's label, in record order (one pass over the shards)."""
    chunk = 4096
    return np.asarray([label for start in range(0, len(self), chunk)
                       for _, label in self.read_many(list(range(start, min(start + chunk, len(self)))))], np.int64)


class _Subset:
  """The records at `indices` of a source, renumbered 0..len-1."""

  def __init__(self, source: _RecordSource, indices: np.ndarray, description: str):
    self._source, self._indices, self._description = source, indices, description

  def __len__(self) -> int:
    return len(self._indices)

  def read_many(self, indices: list[int]) -> list[tuple[np.ndarray, int]]:
    return self._source.read_many(self._indices[np.asarray(indices)].tolist())

  def fingerprint(self) -> str:
    return hashlib.sha256(f"{self._source.fingerprint()} {self._description}".encode()).hexdigest()[:16]


def class_balanced_subset(labels: np.ndarray, per_class: int, seed: int, field: str = "data.subset_per_class"
                          ) -> np.ndarray:
  """Sorted indices of `per_class` examples of every class present, each class's drawn by a permutation seeded by
  (seed, class): growing `per_class` keeps the smaller subset's examples."""
  chosen = []
  for label in np.unique(labels):
    members = np.flatnonzero(labels == label)
    if len(members) < per_class:
      raise errors.InvalidInput(f"class {label} has {len(members)} examples, fewer than the {per_class} per "
                                f"class that {field} asks for")
    chosen.append(members[np.random.default_rng([seed, int(label)]).permutation(len(members))[:per_class]])
  return np.sort(np.concatenate(chosen))


def _subset(source: _RecordSource, per_class: int, seed: int) -> _Subset:
  indices = class_balanced_subset(source.labels(), per_class, seed)
  return _Subset(source, indices, f"subset {per_class} per class, seed {seed}")


def heldout_codes(directory: str, spec: InputSpec, num_images: int = 0) -> dict[str, np.ndarray]:
  """{'tokens': (N, S) int32, 'labels': (N,) int32}: the first view of held-out records, all of them or a
  class-balanced `num_images` (rounded down to whole classes; seed 0, so every run scores the same images)."""
  source = _RecordSource(directory, spec)
  if num_images and num_images < len(source):
    labels = source.labels()
    indices = class_balanced_subset(labels, num_images // len(np.unique(labels)), seed=0,
                                    field="data.heldout_images")
  else:
    indices = np.arange(len(source))
  examples = source.read_many(indices.tolist())
  return {"tokens": np.stack([codes[0] for codes, _ in examples]).astype(np.int32),
          "labels": np.asarray([label for _, label in examples], np.int32)}


def _exists(path: str) -> bool:
  return epath.Path(path).exists()


class _LocalBatches(grain.sources.RandomAccessDataSource):
  """Element t: this process's rows of global batch t, as {'tokens': (b, S) int32, 'labels': (b,) int32}.

  Global example position q lies in epoch q // N at offset q % N of that epoch's permutation of the N images; the
  view of each example is drawn from a generator seeded by (seed, t), for the whole global batch, so it does not
  depend on how the batch is split over processes.
  """

  _ENDLESS = 1 << 50  # batches; resuming slices from the step, so the stream only needs to be long enough

  def __init__(self, source, global_batch: int, seed: int, process_index: int, process_count: int):
    self._source, self._global, self._seed = source, global_batch, seed
    self._local = global_batch // process_count
    self._offset = process_index * self._local
    self._permutations: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()  # Grain reads batches from several threads

  def __len__(self) -> int:
    return self._ENDLESS

  def _permutation(self, epoch: int) -> np.ndarray:
    with self._lock:
      if epoch not in self._permutations:
        if len(self._permutations) > 3:  # threads read a few batches ahead; keep memory flat
          self._permutations.pop(min(self._permutations))
        self._permutations[epoch] = np.random.default_rng([self._seed, epoch]).permutation(len(self._source))
      return self._permutations[epoch]

  def __getitem__(self, batch: int) -> dict[str, np.ndarray]:
    n = len(self._source)
    positions = batch * self._global + self._offset + np.arange(self._local)
    epochs, offsets = np.divmod(positions, n)
    indices = [int(self._permutation(int(e))[o]) for e, o in zip(epochs, offsets)]
    examples = self._source.read_many(indices)
    draws = np.random.default_rng([self._seed, 1, batch]).integers(0, 1 << 30, self._global)
    draws = draws[self._offset:self._offset + self._local]
    tokens = np.stack([codes[d % codes.shape[0]] for (codes, _), d in zip(examples, draws)]).astype(np.int32)
    labels = np.asarray([label for _, label in examples], np.int32)
    return {"tokens": tokens, "labels": labels}


class TrainInput:
  """An endless, deterministic stream of local batches {'tokens': (b, S) int32, 'labels': (b,) int32}."""

  def __init__(self, data: ml_collections.ConfigDict, spec: InputSpec, *, global_batch: int, seed: int,
               process_index: int = 0, process_count: int = 1, codes_dir: str | None = None):
    if global_batch % process_count:
      raise errors.InvalidInput(f"the global batch {global_batch} does not split over {process_count} processes")
    if data.kind == "synthetic":
      if data.get("subset_per_class", 0) > 0:
        raise errors.InvalidInput("data.subset_per_class selects records of prepared codes; synthetic data has none")
      source = synthetic.SyntheticCodes(spec.vocab_size, spec.grid, spec.num_classes, num_images=data.num_images,
                                        seed=seed)
      self.fingerprint = source.fingerprint()
    elif data.kind == "codes":
      directory = codes_dir or data.codes_dir
      if not directory:
        raise errors.InvalidInput("data.codes_dir is empty: point it at codes made by `python -m npp_jax.prepare`")
      source = _RecordSource(directory, spec)
      if data.get("subset_per_class", 0) > 0:
        source = _subset(source, int(data.subset_per_class), int(data.get("subset_seed", 0)))
      self.fingerprint = source.fingerprint()
    else:
      raise errors.InvalidInput(f"data.kind must be 'codes' or 'synthetic', got {data.kind!r}")
    self.num_images = len(source)
    if self.num_images < global_batch:
      raise errors.InvalidInput(f"the data holds {self.num_images} images, fewer than one global batch of "
                                f"{global_batch}")
    self._batches = grain.MapDataset.source(
        _LocalBatches(source, global_batch, seed, process_index, process_count))
    self._data = data

  def iterator(self, start_batch: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Batches from global batch `start_batch` on (the train step to resume at)."""
    dataset = self._batches[start_batch:]
    threads = max(1, int(self._data.read_threads))
    options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(threads, int(self._data.prefetch)))
    iter_ds = dataset.to_iter_dataset(options)
    if self._data.worker_count > 0:
      iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._data.worker_count))
    return iter(iter_ds)


def steps_per_epoch(num_images: int, global_batch: int) -> int:
  return max(1, num_images // global_batch)

