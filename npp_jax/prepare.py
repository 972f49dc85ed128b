"""Encode a dataset into VQ codes for training: `python -m npp_jax.prepare --config CONFIG --out DIR`.

The config file defines `get_config()` with two sections: `data` (see `npp_jax.data.sources.default_data_config`)
and `vq` (see `npp_jax.models.vq.default_config`, with `checkpoint` naming the tokenizer weights). Any field can
be overridden on the command line, e.g. `--config.data.dir=/data/imagenet --config.data.shard_size=5000`.
Running the same command again after an interruption continues where it stopped.
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file with `data` and `vq` sections.",
                                          lock_config=True)
_OUT = flags.DEFINE_string("out", None, "Output directory for the code shards and manifest.json.")
_PROCESS_INDEX = flags.DEFINE_integer(
    "process_index", -1, "This process's share of the shards (i % process_count == process_index); -1: jax's.")
_PROCESS_COUNT = flags.DEFINE_integer(
    "process_count", -1, "How many processes share the work; -1: jax.process_count(). Processes need no "
    "jax.distributed: each encodes its own shards on its local devices, and process 0 writes the manifest.")
flags.mark_flags_as_required(["config", "out"])


def run(config, out_dir: str, process_index: int = -1, process_count: int = -1):
  """Builds the source and the tokenizer from `config`, prepares the codes, prints a summary."""
  from npp_jax.data import prepare as prepare_lib  # pylint: disable=g-import-not-at-top
  from npp_jax.data import sources  # pylint: disable=g-import-not-at-top

  for section in ("data", "vq"):
    if section not in config:
      raise ValueError(f"the config has no `{section}` section (prepare needs `data` and `vq`)")
  data = config.data
  image_size = data.get("image_size", 0) or config.vq.image_size
  if image_size != config.vq.image_size:
    raise ValueError(f"data.image_size={image_size} but the tokenizer is configured for vq.image_size="
                     f"{config.vq.image_size}; set both to the same size")
  if (process_index < 0) != (process_count < 0) or process_index >= max(process_count, 1):
    raise ValueError(f"--process_index={process_index} and --process_count={process_count} must be given together, "
                     "with 0 <= process_index < process_count")
  source = sources.make_source(data)  # first: a bad data path fails before the tokenizer loads

  import jax  # pylint: disable=g-import-not-at-top
  from npp_jax import convert  # pylint: disable=g-import-not-at-top
  from npp_jax.models import vq  # pylint: disable=g-import-not-at-top

  model = convert.load_vq(config.vq)
  encoder = prepare_lib.device_encoder(vq.make_encode_fn(model))
  batch_size = -(-int(data.get("encode_batch_size", 256)) // encoder.num_devices) * encoder.num_devices
  summary = prepare_lib.prepare_codes(
      source, encoder, out_dir, augmentation=data.get("augmentation", "tencrop"), image_size=image_size,
      shard_size=int(data.get("shard_size", 10000)), batch_size=batch_size, vocab_size=config.vq.codebook_size,
      grid=vq.grid_size(config.vq), tokenizer_checksum=vq.params_checksum(model),
      crop_range=float(data.get("crop_range", 1.1)), extra_crop_range=float(data.get("extra_crop_range", 0.0)),
      pad_value=int(data.get("pad_value", 0)), num_threads=int(data.get("num_threads", 0)),
      process_index=jax.process_index() if process_index < 0 else process_index,
      process_count=jax.process_count() if process_count < 0 else process_count)
  print(f"encoded {summary.images} images x {summary.views} views in {summary.seconds:.1f} s "
        f"({summary.images_per_s:.1f} images/s); shards written {summary.shards_written}, "
        f"already done {summary.shards_reused}")
  ignored = len(getattr(source, "ignored_files", []))
  if ignored:
    print(f"ignored {ignored} non-image files (e.g. {source.ignored_files[0]})")
  if summary.manifest is not None:
    m = summary.manifest
    print(f"{out_dir}: {m.num_images} images, {m.num_classes} classes, {m.views} views, {m.grid}x{m.grid} codes, "
          f"{len(m.shards)} shards; {len(m.skipped)} unreadable files skipped")
    for entry in prepare_lib.skipped_details(out_dir)[:20]:
      print(f"  skipped {entry['index']}: {entry['error']}")
  return summary


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    run(_CONFIG.value, _OUT.value, _PROCESS_INDEX.value, _PROCESS_COUNT.value)
  except (ValueError, FileNotFoundError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
