"""Samples class-conditional images from a GPT checkpoint: PNGs, a grid and an ADM-style samples.npz.

  python -m npp_jax.sample --checkpoint WORKDIR --vq vq_ds16_c2i.pt --num-images 50000 --cfg-scale 2.0 --out OUT

Guidance, temperature, top-k and top-p default to the checkpoint's `config.sample` (the recipe's own values);
a flag overrides one. --vq takes a .pt/.safetensors file or a saved tokenizer directory, which brings its config.

Writes OUT/images/{i:06d}.png, OUT/grid.png (the first 64 images) and OUT/samples.npz (`arr_0` uint8 images,
`labels`, and every setting that decides the output). Sample i uses key fold_in(fold_in(key(seed), 0), i), so the
images do not depend on the batch size or the number of devices. Labels: `balanced` (N / num_classes per class, in
class order; the default) or `uniform` (drawn at random from the seed, LlamaGen's evaluation scheme).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
import sys
from typing import Any, Callable, Iterator

import jax
import ml_collections
import numpy as np
from flax import nnx
from tqdm import tqdm

from npp_jax import config as config_lib
from npp_jax import images as image_io
from npp_jax import sampling

SAMPLE_STREAM, LABEL_STREAM = 0, 1  # fold_in tags under the seed's key
GRID_IMAGES = 64
LABEL_MODES = ("balanced", "uniform")


@dataclasses.dataclass(frozen=True)
class RunSettings:
  """Everything a sampling run records next to its images."""

  sampling: sampling.SamplingSettings
  seed: int = 0
  batch_size: int = 32
  dtype: str = "bfloat16"
  checkpoint: str = ""
  vq: str = ""
  label_mode: str = "balanced"

  def record(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self.sampling), **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                                                    if f.name != "sampling"}}


def sample_key(seed: int) -> jax.Array:
  """The key whose fold_in(·, i) is sample i's key."""
  return jax.random.fold_in(jax.random.key(seed), SAMPLE_STREAM)


def make_labels(num_images: int, num_classes: int, mode: str, seed: int = 0) -> np.ndarray:
  """int32 (num_images,) class labels.

  balanced: classes in order, each num_images // num_classes times; the first num_images % num_classes classes get
    one more. uniform: label i drawn from fold_in(label key, i), so a longer run extends a shorter one.
  """
  if num_images < 1:
    raise ValueError(f"--num-images must be at least 1, got {num_images}")
  if mode == "balanced":
    return np.sort(np.arange(num_images) % num_classes).astype(np.int32)
  if mode == "uniform":
    key = jax.random.fold_in(jax.random.key(seed), LABEL_STREAM)
    draw = lambda i: jax.random.randint(jax.random.fold_in(key, i), (), 0, num_classes)
    return np.asarray(jax.vmap(draw)(np.arange(num_images, dtype=np.uint32)), np.int32)
  raise ValueError(f"unknown label mode {mode!r}; choose one of {LABEL_MODES}")


def _read_back(paths: list[pathlib.Path], chunk: int = 256) -> Iterator[np.ndarray]:
  for start in range(0, len(paths), chunk):
    yield np.stack([image_io.load_png(p) for p in paths[start:start + chunk]])


def run(model: nnx.Module, vq_decode_fn: Callable[[jax.Array], jax.Array], labels: Any, settings: RunSettings,
        out_dir: str | pathlib.Path, *, progress: bool = True) -> pathlib.Path:
  """Samples one image per label, writes the PNGs, the grid and samples.npz; returns the npz path.

  vq_decode_fn: codes (B, block_size) -> float images (B, H, W, 3) in [-1, 1] (jitted; called with full batches only,
  the last batch padded, so it compiles once).
  """
  settings.sampling.validate(model.cfg.vocab_size)
  labels = sampling.check_labels(labels, model.cfg.num_classes)
  if settings.batch_size < 1:
    raise ValueError(f"batch size must be at least 1, got {settings.batch_size}")
  sampler = sampling.Sampler(model, dtype=settings.dtype)
  key = sample_key(settings.seed)
  out = pathlib.Path(out_dir)
  (out / "images").mkdir(parents=True, exist_ok=True)
  n_total, bs = len(labels), settings.batch_size
  paths = [out / "images" / f"{i:06d}.png" for i in range(n_total)]
  grid: list[np.ndarray] = []

  def dispatch(start: int):
    batch = labels[start:start + bs]
    padded = np.concatenate([batch, np.repeat(batch[:1], bs - len(batch))])
    tokens = sampler(padded, key, settings.sampling, sample_offset=start)
    return start, len(batch), vq_decode_fn(tokens)  # asynchronous: the device works while the host writes PNGs

  with tqdm(total=n_total, unit="img", disable=not progress, desc="sampling") as bar:
    pending = dispatch(0)
    while pending is not None:
      start, n, decoded = pending
      pending = dispatch(start + bs) if start + bs < n_total else None
      batch_images = image_io.to_uint8(np.asarray(decoded)[:n])
      for path, img in zip(paths[start:start + n], batch_images):
        image_io.save_png(path, img)
      grid.extend(batch_images[:max(0, GRID_IMAGES - len(grid))])
      bar.update(n)

  cols = math.ceil(math.sqrt(len(grid)))
  image_io.save_png(out / "grid.png", image_io.make_grid(np.stack(grid), math.ceil(len(grid) / cols), pad=2))
  npz = out / "samples.npz"
  image_io.save_samples_npz(npz, _read_back(paths), labels, num_images=n_total, **settings.record())
  return npz


# ----------------------------------------------------------------------------------------------------------------------
# Command line.


def check_tokenizer_fits(model_cfg: ml_collections.ConfigDict, vq_cfg: ml_collections.ConfigDict, grid: int) -> None:
  """A ValueError unless the GPT's tokens are the tokenizer's codes (same vocabulary, same grid)."""
  if model_cfg.vocab_size != vq_cfg.codebook_size:
    raise ValueError(f"the GPT's vocabulary ({model_cfg.vocab_size} tokens) does not match the tokenizer's codebook "
                     f"({vq_cfg.codebook_size} codes)")
  if model_cfg.block_size != grid * grid:
    raise ValueError(f"the GPT makes {model_cfg.block_size} tokens per image but the tokenizer decodes a "
                     f"{grid}x{grid} grid at vq.image_size={vq_cfg.image_size}")


def _parse_labels(text: str) -> list[int]:
  try:
    return [int(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"--labels takes comma-separated class ids, got {text!r}") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m npp_jax.sample", description=__doc__.split("\n")[0])
  p.add_argument("--config", help="config file with get_config() (default: the one stored with the checkpoint)")
  p.add_argument("--checkpoint", required=True, help="trainer workdir or converted checkpoint directory")
  p.add_argument("--vq", required=True, help="VQ tokenizer weights: a .pt/.safetensors file (architecture from the "
                 "config) or a saved tokenizer directory (which has its own config)")
  which = p.add_mutually_exclusive_group(required=True)
  which.add_argument("--labels", type=_parse_labels, help="comma-separated class ids, one image each")
  which.add_argument("--num-images", type=int, help="number of images, labels from --label-mode")
  p.add_argument("--label-mode", choices=LABEL_MODES, default="balanced")
  # Unset, these four come from the checkpoint's config.sample (the run's own recipe, e.g. gpt_xl's 1.70).
  p.add_argument("--cfg-scale", type=float, help="1 = no guidance, > 1 guides (default: config.sample.cfg_scale)")
  p.add_argument("--cfg-interval", type=int, default=-1, help="-1 guides every token; k guides tokens 0..k+1")
  p.add_argument("--temperature", type=float, help="default: config.sample.temperature")
  p.add_argument("--top-k", type=int, help="0 keeps every token (default: config.sample.top_k)")
  p.add_argument("--top-p", type=float, help="1 keeps every token (default: config.sample.top_p)")
  p.add_argument("--greedy", action="store_true", help="argmax decoding")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--dtype", choices=sampling.COMPUTE_DTYPES, default="bfloat16")
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  return p.parse_args(argv)


SAMPLE_FLAGS = ("cfg_scale", "temperature", "top_k", "top_p")


def sampling_settings(args: argparse.Namespace, defaults: ml_collections.ConfigDict) -> sampling.SamplingSettings:
  """The flags given on the command line, the rest from `defaults` (a config's `sample` section)."""
  base = config_lib.base_config().sample
  given = {k: getattr(args, k) for k in SAMPLE_FLAGS if getattr(args, k) is not None}
  return sampling.SamplingSettings(**{**{k: defaults.get(k, base[k]) for k in SAMPLE_FLAGS}, **given},
                                   cfg_interval=args.cfg_interval, greedy=args.greedy).validate()


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  try:
    sampling_settings(args, ml_collections.ConfigDict())  # bad flags fail before anything is read
    if args.batch_size < 1:
      raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    for name, path in (("checkpoint", args.checkpoint), ("VQ checkpoint", args.vq)):
      if not pathlib.Path(path).exists():
        raise FileNotFoundError(f"{name} {path} does not exist")
    if pathlib.Path(args.out).exists() and not pathlib.Path(args.out).is_dir():
      raise ValueError(f"--out {args.out} is a file; name a directory for the images")

    # Heavy imports only once the arguments are known to be sane.
    from npp_jax import checkpoint, convert  # pylint: disable=g-import-not-at-top
    from npp_jax.models import vq as vq_lib  # pylint: disable=g-import-not-at-top

    config = config_lib.load_file(args.config) if args.config else checkpoint.read_config(args.checkpoint)
    settings = RunSettings(
        sampling=sampling_settings(args, config.get("sample") or ml_collections.ConfigDict()),
        seed=args.seed, batch_size=args.batch_size, dtype=args.dtype,
        checkpoint=str(pathlib.Path(args.checkpoint).resolve()), vq=str(pathlib.Path(args.vq).resolve()),
        label_mode="given" if args.labels is not None else args.label_mode)
    model, config = checkpoint.load_model(args.checkpoint, config)
    with config.unlocked():
      if pathlib.Path(args.vq).is_dir():  # a saved tokenizer: its own config says what it is
        config.vq = convert.read_saved_vq(args.vq)[0]
      else:
        if "vq" not in config:
          config.vq = vq_lib.default_config()
        config.vq.checkpoint = args.vq
    check_tokenizer_fits(model.cfg, config.vq, vq_lib.grid_size(config.vq))
    decode = vq_lib.make_decode_fn(convert.load_vq(config.vq))
    if args.labels is not None:
      labels = args.labels
    else:
      labels = make_labels(args.num_images, model.cfg.num_classes, args.label_mode, args.seed)
    npz = run(model, decode, labels, settings, args.out, progress=not args.no_progress)
  except (ValueError, OSError) as e:
    print("error: " + " ".join(str(e).split()), file=sys.stderr)
    return 1
  print(f"wrote {len(labels)} images to {args.out} ({npz.name})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
