"""Data throughput: how fast `prepare` turns images into codes (and where the time goes).

  python bench/data_throughput.py prepare --source=synthetic --augmentation=tencrop --image_size=256 --encoder=mean
  python bench/data_throughput.py prepare --source=fashion_mnist --augmentation=pad_flip --image_size=32 \
      --encoder=tiny --num_images=2000

  python bench/data_throughput.py input --config configs/fashion.py --codes_dir runs/fashion/codes --batches 200 \
      [--config.key=value ...]

Measurements (one function each):
  measure_host_views  decode + crop/flip on the host thread pool only (the usual bottleneck), images/s
  measure_prepare     the whole `prepare_codes` run into a temporary directory (decode, views, encode, write), images/s
  measure_input       the training input (Grain over the code shards: read, decode, pick a view, batch), records/s,
                      against what the config's train step consumes (the issue asks for at least 20x)

Encoders: `mean` (block means: no model, isolates the host side), `tiny` (the reference's tiny VQ from
tests/fixtures/llamagen_tiny, ch=32, downsample 2), `vq16` (the VQ-16 architecture; --vq_checkpoint for real weights,
otherwise random init).
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import pathlib
import sys
import tempfile
import time

import numpy as np
from absl import flags
from flax import nnx
from PIL import Image

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from npp_jax import cli  # noqa: E402
from npp_jax import config_schema  # noqa: E402
from npp_jax import errors  # noqa: E402
from npp_jax.data import augment  # noqa: E402
from npp_jax.data import pipeline  # noqa: E402
from npp_jax.data import prepare  # noqa: E402
from npp_jax.data import sources  # noqa: E402
from npp_jax.model_files import param_mapping  # noqa: E402
from npp_jax.model_files import store  # noqa: E402
from npp_jax.models import gpt  # noqa: E402
from npp_jax.models import vq  # noqa: E402

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures"


class FirstN(sources.Source):
  """The first n examples of a source (a benchmark needs a fixed, small amount of work)."""

  def __init__(self, source: sources.Source, n: int):
    self.source, self.n = source, min(n, len(source))
    self.class_names = source.class_names

  def __len__(self):
    return self.n

  def label(self, index):
    return self.source.label(index)

  def load(self, index):
    return self.source.load(index)

  def fingerprint(self):
    return f"{self.source.fingerprint()}:{self.n}"

  def describe(self):
    return {**self.source.describe(), "first_n": self.n}


def synthetic_jpeg_folder(root: pathlib.Path, n: int, size=(500, 375), classes: int = 10) -> pathlib.Path:
  """ImageNet-like JPEGs (typical 500x375, smooth content, quality 90) in `classes` folders."""
  rng = np.random.default_rng(0)
  for i in range(n):
    folder = root / f"class{i % classes:03d}"
    folder.mkdir(parents=True, exist_ok=True)
    coarse = rng.integers(0, 256, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
    Image.fromarray(coarse).resize(size, Image.BILINEAR).save(folder / f"{i:06d}.jpg", quality=90)
  return root


def make_encoder(name: str, image_size: int, vq_checkpoint: str = ""):
  """(batch encoder for prepare_codes, vocab_size, grid)."""
  if name == "mean":
    grid, vocab = image_size // 16 or 1, 16384

    def mean_codes(batch):
      b = batch.shape[0]
      blocks = batch.reshape(b, grid, image_size // grid, grid, image_size // grid, 3).mean(axis=(2, 4, 5))
      return blocks.reshape(b, grid * grid).astype(np.int64) * 61 % vocab

    return mean_codes, vocab, grid

  cfg = vq.default_config()
  cfg.image_size = image_size
  if name == "tiny":
    cfg.update(dict(codebook_size=64, encoder_ch_mult=(1, 2), decoder_ch_mult=(1, 2), z_channels=32, ch=32))
    model = param_mapping.vq_from_torch(FIXTURES / "llamagen_tiny" / "vq.pt", cfg)
  elif name == "vq16":
    if vq_checkpoint:
      cfg.checkpoint = vq_checkpoint
      model = store.load_vq(cfg)
    else:
      model = vq.VQModel(cfg, rngs=nnx.Rngs(0))
  else:
    raise ValueError(f"unknown encoder {name!r}")
  return prepare.device_encoder(vq.make_encode_fn(model)), cfg.codebook_size, vq.grid_size(cfg)


def measure_host_views(source: sources.Source, *, augmentation: str, image_size: int, extra_crop_range: float = 0.0,
                       num_threads: int = 0) -> dict[str, float]:
  """Decode + views for every image of `source` on a thread pool, nothing else."""
  view_fn = functools.partial(augment.make_views, augmentation=augmentation, image_size=image_size,
                              extra_crop_range=extra_crop_range)
  threads = num_threads or os.cpu_count() or 1
  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    views = sum(v.shape[0] for v in pool.map(lambda i: view_fn(source.load(i)), range(len(source))))
  seconds = time.perf_counter() - start
  return {"images": len(source), "views": views, "seconds": seconds, "images_per_s": len(source) / seconds,
          "threads": threads}


def measure_prepare(source: sources.Source, encoder, *, augmentation: str, image_size: int, vocab_size: int,
                    grid: int, batch_size: int, extra_crop_range: float = 0.0, num_threads: int = 0,
                    warmup: bool = True) -> dict[str, float]:
  """A whole `prepare_codes` run into a temporary directory; the encoder is compiled first when `warmup`."""
  if warmup:
    np.asarray(encoder(np.zeros((batch_size, image_size, image_size, 3), np.uint8)))
  with tempfile.TemporaryDirectory() as out:
    summary = prepare.prepare_codes(
        source, encoder, out, augmentation=augmentation, image_size=image_size, shard_size=max(1, len(source) // 4),
        batch_size=batch_size, vocab_size=vocab_size, grid=grid, tokenizer_checksum="bench",
        extra_crop_range=extra_crop_range, num_threads=num_threads, process_index=0, process_count=1,
        progress=False)
  return {"images": summary.images, "views": summary.images * summary.views, "seconds": summary.seconds,
          "images_per_s": summary.images_per_s}


def bench_prepare(args) -> None:
  with tempfile.TemporaryDirectory() as tmp:
    if args.source == "synthetic":
      source = sources.ImageFolderSource(synthetic_jpeg_folder(pathlib.Path(tmp), args.num_images))
    else:
      cfg = sources.default_data_config()
      cfg.update(dict(source=args.source, dir=args.data_dir, split=args.split))
      source = FirstN(sources.make_source(cfg), args.num_images)
    kw = dict(augmentation=args.augmentation, image_size=args.image_size, extra_crop_range=args.extra_crop_range,
              num_threads=args.num_threads)
    host = measure_host_views(source, **kw)
    print(f"host decode+views: {host['images_per_s']:.1f} images/s ({host['views']} views of {host['images']} "
          f"images in {host['seconds']:.2f} s, {host['threads']} threads)")
    encoder, vocab, grid = make_encoder(args.encoder, args.image_size, args.vq_checkpoint)
    batch = args.batch_size
    if hasattr(encoder, "num_devices"):
      batch = -(-batch // encoder.num_devices) * encoder.num_devices
    full = measure_prepare(source, encoder, vocab_size=vocab, grid=grid, batch_size=batch, **kw)
    print(f"prepare ({args.encoder} encoder, batch {batch}): {full['images_per_s']:.1f} images/s "
          f"({full['views']} views in {full['seconds']:.2f} s); host-only / prepare = "
          f"{host['images_per_s'] / full['images_per_s']:.2f}")


def measure_input(config, codes_dir: str, batches: int) -> dict:
  """Records/s of the training input, after one warm-up batch."""

  spec = pipeline.InputSpec(config.model.vocab_size, gpt.grid_side(config.model), config.model.num_classes)
  data = pipeline.TrainInput(config.data, spec, global_batch=config.train.global_batch_size, seed=config.seed,
                             codes_dir=codes_dir)
  it = data.iterator()
  next(it)
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  seconds = time.perf_counter() - start
  return {"records_per_s": batches * config.train.global_batch_size / seconds, "seconds": seconds}


def bench_input(args) -> None:
  if args.config is None or args.codes_dir is None:
    raise errors.InvalidInput("input needs --config (the run's config) and --codes_dir (codes made by prepare)")
  result = measure_input(args.config, args.codes_dir, args.batches)
  line = f"training input: {result['records_per_s']:,.0f} records/s over {args.batches} batches"
  if args.consumed_per_s:
    ratio = result["records_per_s"] / args.consumed_per_s
    line += f"; the train step consumes {args.consumed_per_s:,.0f} images/s: {ratio:.1f}x"
  print(line)


COMMANDS = {"prepare": bench_prepare, "input": bench_input}


def define_flags(fv: flags.FlagValues, argv: list[str]) -> None:
  # prepare: images/s of python -m npp_jax.prepare
  flags.DEFINE_enum("source", "synthetic", ["synthetic", "folder", "imagenet", "fashion_mnist"], "prepare: images.",
                    flag_values=fv)
  flags.DEFINE_string("data_dir", "", "prepare: the source's directory.", flag_values=fv)
  flags.DEFINE_string("split", "train", "prepare: the source's split.", flag_values=fv)
  flags.DEFINE_enum("augmentation", "tencrop", sorted(augment.AUGMENTATIONS), "prepare: views.", flag_values=fv)
  flags.DEFINE_integer("image_size", 256, "prepare: view side.", flag_values=fv)
  flags.DEFINE_float("extra_crop_range", 0.0, "prepare: the second ten-crop set's range (0: none).", flag_values=fv)
  flags.DEFINE_integer("num_images", 64, "prepare: images timed.", flag_values=fv)
  flags.DEFINE_enum("encoder", "mean", ["mean", "tiny", "vq16"], "prepare: the encoder (see above).", flag_values=fv)
  flags.DEFINE_string("vq_checkpoint", "", "prepare: VQ-16 weights for --encoder=vq16.", flag_values=fv)
  flags.DEFINE_integer("batch_size", 64, "prepare: encode batch.", flag_values=fv)
  flags.DEFINE_integer("num_threads", 0, "prepare: host threads (0: one per core).", flag_values=fv)
  # input: records/s of the training input pipeline
  cli.define_config(fv, argv, "input: the run's config file (e.g. configs/fashion.py).", config_schema.TRAINER)
  flags.DEFINE_string("codes_dir", None, "input: codes made by prepare (e.g. runs/fashion/codes).", flag_values=fv)
  flags.DEFINE_integer("batches", 200, "input: batches timed.", flag_values=fv)
  flags.DEFINE_float("consumed_per_s", 0.0, "input: images/s the train step consumes (from the trainer's progress "
                     "line), for the ratio.", flag_values=fv)


def main(argv: list[str] | None = None) -> int:
  return cli.main_with_commands(COMMANDS, define_flags, argv, doc=__doc__)


if __name__ == "__main__":
  sys.exit(main())
