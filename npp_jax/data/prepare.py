"""Images -> augmentation views -> VQ codes -> ArrayRecord shards plus a manifest; resumable and multi-process.

Layout of an output directory:

  codes-00000-of-00004.arrayrecord ...  shard i holds the records of source indices [i*shard_size, (i+1)*shard_size)
                                         in index order, one `records.encode_record(codes (V, S), label)` each
  progress/codes-00000-of-00004.json    written right after its shard: record count, bytes, skipped files
  prepare_state.json                    the settings of the run that started here; a later run must match them
  manifest.json                         written last, by process 0, once every shard is there

Resume: a shard counts as done when its progress file exists and the shard's size and record count agree with it;
anything else is encoded again (shards are written to a temp file and renamed, so a kill never leaves half a
shard under the final name). A file that cannot be decoded gets no record; its index is listed in the manifest's
`skipped`, and no other index moves, so a resumed run produces byte-identical shards.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import json
import math
import os
import pathlib
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from array_record.python import array_record_module
from etils import epath
from tqdm import tqdm

from npp_jax import config_schema
from npp_jax import errors
from npp_jax import fileio
from npp_jax import sharding
from npp_jax.model_files import store

from npp_jax.data import augment
from npp_jax.data import records
from npp_jax.data import sources
from npp_jax.data.sources import Source, UnreadableImageError
from npp_jax.models import vq

STATE = "prepare_state.json"
PROGRESS_DIR = "progress"

# A host-side batch encoder: uint8 views (B, H, W, 3) -> codes (B, S), a numpy or (not yet ready) jax array.
BatchEncoder = Callable[[np.ndarray], Any]


def shard_name(index: int, num_shards: int) -> str:
  return f"codes-{index:05d}-of-{num_shards:05d}.arrayrecord"


def to_model_input(images_uint8):
  """uint8 pixels -> float32 in [-1, 1] exactly as the reference (ToTensor, then Normalize(0.5, 0.5))."""
  return (images_uint8.astype(jnp.float32) / 255.0 - 0.5) / 0.5


def device_encoder(encode_fn: Callable, devices: Sequence[Any] | None = None) -> BatchEncoder:
  """Wraps a jax `encode_fn(images float NHWC in [-1, 1]) -> codes (B, S)` for `prepare_codes`.

  The uint8 batch goes to the devices sharded along the batch (4x fewer bytes than float32), is normalised there,
  and encoded; the result is returned without waiting, so the host prepares the next batch meanwhile. Devices
  default to this process's local devices (each process encodes its own shards), where
  `npp_jax.models.vq.make_encode_fn` puts the model's state; `num_devices` divides the batch sizes that need no
  padding.
  """
  mesh = sharding.one_axis_mesh(devices)
  normalize = jax.jit(to_model_input)
  encode = sharding.pad_shard_unpad(lambda batch: encode_fn(normalize(batch)), mesh)
  encode.num_devices = mesh.size
  return encode


@dataclasses.dataclass
class PrepareSummary:
  """What a `prepare_codes` call did (this process)."""

  images: int  # images decoded and encoded in this run
  views: int  # views per image
  skipped: list[dict[str, Any]]  # unreadable files met in this run: {"index", "error"}
  shards_written: int
  shards_reused: int
  seconds: float  # this process's own shards (scanning excluded, waiting for other processes excluded)
  manifest: records.Manifest | None  # None on processes other than 0

  @property
  def images_per_s(self) -> float:
    return self.images / self.seconds if self.seconds > 0 else 0.0


def augmentation_args(augmentation: str, crop_range: float, extra_crop_range: float, pad_value: int
                      ) -> dict[str, Any]:
  """The settings that change the views of `augmentation` (recorded in the manifest and compared on resume)."""
  if augmentation == "tencrop":
    return {"crop_range": crop_range, "extra_crop_range": extra_crop_range}
  if augmentation in ("pad", "pad_flip"):
    return {"pad_value": pad_value}
  return {}


def prepare_codes(source: Source, encode_fn: BatchEncoder, out_dir: str | os.PathLike, *, augmentation: str,
                  image_size: int, shard_size: int, batch_size: int, vocab_size: int, grid: int,
                  tokenizer_checksum: str, crop_range: float = 1.1, extra_crop_range: float = 0.0,
                  pad_value: int = 0, num_threads: int = 0, process_index: int | None = None,
                  process_count: int | None = None, wait_timeout_s: float = 24 * 3600.0,
                  poll_interval_s: float = 5.0, progress: bool = True) -> PrepareSummary:
  """Encodes every image of `source` into `out_dir` (see the module docstring); resumes a killed run.

  Args:
    source: where the images come from (`npp_jax.data.sources`).
    encode_fn: uint8 views (batch_size, image_size, image_size, 3) -> codes (batch_size, grid * grid); e.g.
      `device_encoder(vq.make_encode_fn(model))`. Always called with exactly batch_size views (the last batch of
      a shard is padded with black images whose codes are dropped).
    augmentation, image_size, crop_range, extra_crop_range, pad_value: the views (`augment.make_views`).
    shard_size: images per shard.
    batch_size: views per encoder call.
    vocab_size, grid, tokenizer_checksum: what the tokenizer makes; recorded in the manifest and checked.
    num_threads: threads decoding and cropping images (PIL releases the GIL); 0 means os.cpu_count().
    process_index, process_count: this process's share: shards i with i % process_count == process_index
      (default: from jax). Process 0 writes the manifest once all shards exist, waiting up to wait_timeout_s.
    progress: show a tqdm bar.
  """
  start_time = time.perf_counter()
  augment.check_augmentation(augmentation, extra_crop_range, crop_range)
  for name, value in (("shard_size", shard_size), ("batch_size", batch_size), ("image_size", image_size),
                      ("grid", grid)):
    if value <= 0:
      raise errors.InvalidInput(f"{name} must be positive, got {value}")
  if not 0 < vocab_size <= records.MAX_VOCAB:
    raise errors.InvalidInput(f"vocab_size {vocab_size} does not fit the uint16 code records (at most "
                              f"{records.MAX_VOCAB})")
  if len(source) == 0:
    raise errors.InvalidInput("the data source has no images")
  if process_index is None or process_count is None:
    process_index, process_count = jax.process_index(), jax.process_count()
  if not 0 <= process_index < process_count:
    raise errors.InvalidInput(f"process_index {process_index} is not in [0, process_count={process_count})")

  out = pathlib.Path(out_dir)
  views = augment.num_views(augmentation, extra_crop_range)
  aug_args = augmentation_args(augmentation, crop_range, extra_crop_range, pad_value)
  num_shards = math.ceil(len(source) / shard_size)
  settings = {
      "format_version": records.VERSION, "source": source.describe(), "num_images": len(source),
      "class_names": list(source.class_names), "augmentation": augmentation, "augmentation_args": aug_args,
      "image_size": image_size, "views": views, "shard_size": shard_size, "num_shards": num_shards,
      "vocab_size": vocab_size, "grid": grid, "tokenizer_checksum": tokenizer_checksum,
  }
  _check_or_write_state(out, settings)

  mine = [i for i in range(num_shards) if i % process_count == process_index]
  todo = [i for i in mine if not _shard_done(out, i, num_shards)]
  bounds = {i: (i * shard_size, min((i + 1) * shard_size, len(source))) for i in todo}
  view_fn = functools.partial(augment.make_views, augmentation=augmentation, image_size=image_size,
                              extra_crop_range=extra_crop_range, crop_range=crop_range, pad_value=pad_value)
  skipped: list[dict[str, Any]] = []
  images = 0
  threads = num_threads or os.cpu_count() or 1
  with concurrent.futures.ThreadPoolExecutor(threads) as pool, \
      tqdm(total=sum(b - a for a, b in bounds.values()), unit="img", disable=not progress,
           desc=f"prepare {len(todo)}/{len(mine)} shards", dynamic_ncols=True) as bar:
    for shard in todo:
      start, end = bounds[shard]
      loaded = _load_views(source, range(start, end), view_fn, pool,
                           window=max(4 * threads, 2 * math.ceil(batch_size / views)))
      shard_records, shard_skipped = _encode_shard(loaded, encode_fn, batch_size=batch_size, views=views,
                                                   image_size=image_size, grid=grid, vocab_size=vocab_size,
                                                   on_image=bar.update)
      _write_shard(out, shard, num_shards, shard_records, shard_skipped, start, end)
      skipped += shard_skipped
      images += end - start - len(shard_skipped)

  seconds = time.perf_counter() - start_time  # this process's own work, not the wait for the others
  manifest = None
  if process_index == 0:
    manifest = _write_manifest(out, num_shards, settings, source, wait_timeout_s, poll_interval_s)
  return PrepareSummary(images=images, views=views, skipped=skipped, shards_written=len(todo),
                        shards_reused=len(mine) - len(todo), seconds=seconds, manifest=manifest)


# --- loading and encoding ----------------------------------------------------------------------------------------


def _load_one(source: Source, index: int, view_fn: Callable) -> tuple[int, np.ndarray | None, int, str]:
  try:
    image = source.load(index)
  except UnreadableImageError as e:
    return index, None, source.label(index), str(e)
  return index, view_fn(image), source.label(index), ""


def _load_views(source: Source, indices: Sequence[int], view_fn: Callable,
                pool: concurrent.futures.Executor, window: int) -> Iterator[tuple[int, np.ndarray | None, int, str]]:
  """(index, views (V, H, W, 3) or None, label, error) in index order, decoding up to `window` images ahead."""
  pending: collections.deque = collections.deque()
  it = iter(indices)
  for index in it:
    pending.append(pool.submit(_load_one, source, index, view_fn))
    if len(pending) >= window:
      break
  while pending:
    result = pending.popleft().result()
    index = next(it, None)
    if index is not None:
      pending.append(pool.submit(_load_one, source, index, view_fn))
    yield result


def _encode_shard(loaded: Iterator[tuple[int, np.ndarray | None, int, str]], encode_fn: BatchEncoder, *,
                  batch_size: int, views: int, image_size: int, grid: int, vocab_size: int,
                  on_image: Callable[[int], Any]) -> tuple[list[bytes], list[dict[str, Any]]]:
  """Encodes one shard's images in batches of `batch_size` views; returns (records, skipped files)."""
  labels: list[int] = []
  skipped: list[dict[str, Any]] = []
  in_flight: collections.deque = collections.deque()  # (codes not yet fetched, number of real views)
  chunks: list[np.ndarray] = []
  batch = np.zeros((batch_size, image_size, image_size, 3), np.uint8)
  fill = 0

  def fetch_one() -> None:
    codes, count = in_flight.popleft()
    codes = np.asarray(codes)
    if codes.shape != (batch_size, grid * grid):
      raise errors.InvalidInput(f"the tokenizer returned codes of shape {codes.shape} for {batch_size} images; "
                                f"expected ({batch_size}, {grid * grid}) for a {grid}x{grid} grid (check vq.image_size "
                                "and data.image_size)")
    codes = codes[:count]
    if codes.size and (codes.min() < 0 or codes.max() >= vocab_size):
      raise errors.InvalidInput(f"the tokenizer returned code ids in [{codes.min()}, {codes.max()}], outside its "
                                f"vocabulary of {vocab_size} (check vq.codebook_size)")
    chunks.append(codes.astype(np.uint16))

  def flush() -> None:
    nonlocal batch, fill
    batch[fill:] = 0  # padding of the last batch: fixed content, so every call has the same shape and inputs
    in_flight.append((encode_fn(batch), fill))
    batch, fill = np.zeros_like(batch), 0  # a fresh buffer: the device copy of the last one may still be pending
    if len(in_flight) > 1:  # keep one batch on the device while the host fills the next
      fetch_one()

  for index, image_views, label, error in loaded:
    on_image(1)
    if image_views is None:
      skipped.append({"index": index, "error": error})
      continue
    if image_views.shape[0] != views:
      raise errors.InvalidInput(f"image {index} gave {image_views.shape[0]} views, expected {views}")
    labels.append(label)
    for view in image_views:
      batch[fill] = view
      fill += 1
      if fill == batch_size:
        flush()
  if fill:
    flush()
  while in_flight:
    fetch_one()
  codes = np.concatenate(chunks) if chunks else np.zeros((0, grid * grid), np.uint16)
  codes = codes.reshape(len(labels), views, grid * grid)
  return [records.encode_record(c, y) for c, y in zip(codes, labels)], skipped


# --- files ---------------------------------------------------------------------------------------------------------


def _write_json(path: pathlib.Path, content: Any) -> None:
  fileio.write_text(path, json.dumps(content, indent=1))


def _progress_path(out: pathlib.Path, shard: int, num_shards: int) -> pathlib.Path:
  return out / PROGRESS_DIR / (shard_name(shard, num_shards).removesuffix(".arrayrecord") + ".json")


def _write_shard(out: pathlib.Path, shard: int, num_shards: int, shard_records: list[bytes],
                 skipped: list[dict[str, Any]], start: int, end: int) -> None:
  path = out / shard_name(shard, num_shards)
  records.write_shard(path, shard_records)
  (out / PROGRESS_DIR).mkdir(exist_ok=True)
  _write_json(_progress_path(out, shard, num_shards),
              {"shard": path.name, "records": len(shard_records), "bytes": path.stat().st_size,
               "start": start, "end": end, "skipped": skipped})


def _read_progress(out: pathlib.Path, shard: int, num_shards: int) -> dict[str, Any] | None:
  """The shard's progress entry if the shard is complete (size and record count agree), else None."""
  progress_path = _progress_path(out, shard, num_shards)
  path = out / shard_name(shard, num_shards)
  if not (progress_path.is_file() and path.is_file()):
    return None
  try:
    entry = json.loads(progress_path.read_text())
  except json.JSONDecodeError:
    return None
  if path.stat().st_size != entry.get("bytes"):
    return None
  reader = array_record_module.ArrayRecordReader(str(path))
  try:
    count = reader.num_records()
  finally:
    reader.close()
  return entry if count == entry.get("records") else None


def _shard_done(out: pathlib.Path, shard: int, num_shards: int) -> bool:
  return _read_progress(out, shard, num_shards) is not None


def _describe_difference(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
  diffs = []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key), new.get(key)
    if key == "source" and isinstance(a, dict) and isinstance(b, dict):
      a = {k: v for k, v in a.items() if k != "dir"}  # the same files moved elsewhere are still the same data
      b = {k: v for k, v in b.items() if k != "dir"}
      if a.get("fingerprint") != b.get("fingerprint") and a.get("kind") == b.get("kind"):
        diffs.append("the source lists different files or labels")
        continue
    if a != b:
      short = lambda v: (json.dumps(v)[:60] + "...") if len(json.dumps(v)) > 60 else json.dumps(v)
      diffs.append(f"{key} {short(a)} then, {short(b)} now")
  return diffs


def _check_or_write_state(out: pathlib.Path, settings: dict[str, Any]) -> None:
  """Refuses an output directory started with other settings; records the settings in a new one."""
  path = out / STATE
  if path.is_file():
    try:
      old = json.loads(path.read_text())
    except json.JSONDecodeError:
      raise errors.InvalidInput(f"{path} is not valid JSON; delete the directory {out} to start again") from None
    diffs = _describe_difference(old, settings)
    if diffs:
      raise errors.InvalidInput(f"{out} was prepared with other settings ({'; '.join(diffs)}); use a new --out "
                                "directory or delete this one")
    return
  if out.is_dir() and (any(out.glob("codes-*.arrayrecord")) or (out / records.MANIFEST).exists()):
    raise errors.InvalidInput(f"{out} holds code shards but no {STATE}, so they cannot be checked against this run; "
                              "use a new --out directory")
  out.mkdir(parents=True, exist_ok=True)
  _write_json(path, settings)


def _write_manifest(out: pathlib.Path, num_shards: int, settings: dict[str, Any], source: Source,
                    wait_timeout_s: float, poll_interval_s: float) -> records.Manifest:
  """Waits until every shard is complete (other processes), then writes manifest.json."""
  deadline = time.monotonic() + wait_timeout_s
  while True:
    entries = [_read_progress(out, i, num_shards) for i in range(num_shards)]
    missing = [i for i, e in enumerate(entries) if e is None]
    if not missing:
      break
    if time.monotonic() > deadline:
      raise TimeoutError(f"waited {wait_timeout_s:.0f} s for {len(missing)} shards from other processes "
                         f"(e.g. {shard_name(missing[0], num_shards)}) that never appeared in {out}; run prepare "
                         "again to finish them")
    time.sleep(poll_interval_s)
  skipped = sorted(s["index"] for e in entries for s in e["skipped"])
  sizes = [e["records"] for e in entries]
  if not sum(sizes):
    raise errors.InvalidInput(f"none of the {len(source)} images could be decoded; nothing to write")
  manifest = records.Manifest(
      num_images=sum(sizes), num_classes=len(settings["class_names"]), views=settings["views"],
      grid=settings["grid"], vocab_size=settings["vocab_size"],
      shards=[shard_name(i, num_shards) for i in range(num_shards)], shard_sizes=sizes,
      class_names=settings["class_names"], tokenizer_checksum=settings["tokenizer_checksum"],
      augmentation=settings["augmentation"], source=settings["source"], image_size=settings["image_size"],
      augmentation_args=settings["augmentation_args"], skipped=skipped)
  manifest.write(out)
  return manifest


def skipped_details(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
  """Every unreadable file of a prepared directory: {"index", "error"} (from its progress files)."""
  entries = []
  for path in sorted((pathlib.Path(out_dir) / PROGRESS_DIR).glob("*.json")):
    entries += json.loads(path.read_text())["skipped"]
  return sorted(entries, key=lambda e: e["index"])


def prepare_once(config, out_dir: str, log: Callable[[str], None]) -> str:
  """`out_dir`, holding the config's codes: prepared now unless an earlier run did (its manifest is there).

  How a trainer (WORKDIR/codes) and the study (one set for every run) get codes of a small dataset.
  """
  if not (epath.Path(out_dir) / records.MANIFEST).exists():  # a trainer's workdir may be gs://
    if not config.data.source:
      raise errors.InvalidInput(f"{out_dir} holds no codes and data.source is empty: set data.source or "
                                "data.codes_dir")
    log(f"preparing {config.data.source} codes into {out_dir} (once; later runs reuse them)")
    prepare_from_config(config, out_dir)
  return out_dir


def heldout_codes_once(config, workdir: str, log: Callable[[str], None]) -> str:
  """The held-out codes of `eval.heldout_every`: data.heldout_codes_dir, or the source's data.heldout_split prepared
  once into WORKDIR/codes_<split> (how a trainer and the study get them for a small dataset)."""
  if config.data.heldout_codes_dir:
    return config.data.heldout_codes_dir
  missing = config_schema.heldout_data_missing(config)
  if missing:
    raise errors.InvalidInput(missing)
  split = config.data.heldout_split
  split_config = ml_collections.ConfigDict(config.to_dict())
  split_config.data.split = split
  return prepare_once(split_config, str(epath.Path(workdir) / f"codes_{split}"), log)


def prepare_from_config(config, out_dir: str, process_index: int = -1, process_count: int = -1):
  """Builds the source and the tokenizer from `config`, prepares the codes, logs a summary; returns it."""
  for section in ("data", "vq"):
    if section not in config:
      raise errors.InvalidInput(f"the config has no `{section}` section (prepare needs `data` and `vq`)")
  data = config.data
  image_size = data.get("image_size", 0) or config.vq.image_size
  if image_size != config.vq.image_size:
    raise errors.InvalidInput(f"data.image_size={image_size} but the tokenizer is configured for vq.image_size="
                              f"{config.vq.image_size}; set both to the same size")
  if (process_index < 0) != (process_count < 0) or process_index >= max(process_count, 1):
    raise errors.InvalidInput(f"--process_index={process_index} and --process_count={process_count} must be given "
                              "together, with 0 <= process_index < process_count")
  source = sources.make_source(data)  # first: a bad data path fails before the tokenizer loads

  model = store.load_vq(config.vq)
  encoder = device_encoder(vq.make_encode_fn(model))
  batch_size = -(-int(data.get("encode_batch_size", 256)) // encoder.num_devices) * encoder.num_devices
  summary = prepare_codes(
      source, encoder, out_dir, augmentation=data.get("augmentation", "tencrop"), image_size=image_size,
      shard_size=int(data.get("shard_size", 10000)), batch_size=batch_size, vocab_size=config.vq.codebook_size,
      grid=vq.grid_size(config.vq), tokenizer_checksum=vq.params_checksum(model),
      crop_range=float(data.get("crop_range", 1.1)), extra_crop_range=float(data.get("extra_crop_range", 0.0)),
      pad_value=int(data.get("pad_value", 0)), num_threads=int(data.get("num_threads", 0)),
      process_index=jax.process_index() if process_index < 0 else process_index,
      process_count=jax.process_count() if process_count < 0 else process_count)
  logging.info("encoded %d images x %d views in %.1f s (%.1f images/s); shards written %d, already done %d",
               summary.images, summary.views, summary.seconds, summary.images_per_s, summary.shards_written,
               summary.shards_reused)
  ignored = len(getattr(source, "ignored_files", []))
  if ignored:
    logging.info("ignored %d non-image files (e.g. %s)", ignored, source.ignored_files[0])
  if summary.manifest is not None:
    m = summary.manifest
    logging.info("%s: %d images, %d classes, %d views, %dx%d codes, %d shards; %d unreadable files skipped", out_dir,
                 m.num_images, m.num_classes, m.views, m.grid, m.grid, len(m.shards), len(m.skipped))
    for entry in skipped_details(out_dir)[:20]:
      logging.warning("skipped %s: %s", entry["index"], entry["error"])
  return summary
