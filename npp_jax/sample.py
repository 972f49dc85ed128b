"""Samples class-conditional images from a GPT checkpoint: PNGs, a grid and an ADM-style samples.npz.

  python -m npp_jax.sample --checkpoint WORKDIR --vq vq_ds16_c2i.pt --num_images 50000 --cfg_scale 2.0 --out OUT

Guidance, temperature, top-k and top-p default to the checkpoint's `config.sample` (the recipe's own values);
a flag overrides one. --vq takes a .pt/.safetensors file or a saved tokenizer directory, which brings its config.

Writes OUT/images/{i:06d}.png, OUT/grid.png (the first 64 images) and OUT/samples.npz (`arr_0` uint8 images,
`labels`, and every setting that decides the output). Sample i uses key fold_in(fold_in(key(seed), 0), i), so the
images do not depend on the batch size or the number of devices. Labels: `balanced` (N / num_classes per class, in
class order; the default) or `uniform` (drawn at random from the seed, LlamaGen's evaluation scheme). The outputs are
written beside OUT first and replace an earlier run's whole, so OUT never mixes images of two runs.
"""

from __future__ import annotations

import dataclasses
import pathlib
import shutil
import sys
from typing import Any, Callable, Iterator

import jax
import ml_collections
import numpy as np
from absl import flags
from flax import nnx
from tqdm import tqdm

from npp_jax import cli
from npp_jax import config_schema
from npp_jax import errors
from npp_jax import images as image_io
from npp_jax.sampling import decoding
from npp_jax.sampling import generation

LABEL_STREAM = 1  # fold_in tag of the uniform labels under the seed's key (the samples' is generation.SAMPLE_STREAM)
GRID_IMAGES = 64
LABEL_MODES = ("balanced", "uniform")


@dataclasses.dataclass(frozen=True)
class RunSettings:
  """Everything a sampling run records next to its images."""

  sampling: decoding.SamplingSettings
  seed: int = 0
  batch_size: int = 32
  dtype: str | None = None  # the compute dtype; None: the model config's
  checkpoint: str = ""
  vq: str = ""
  label_mode: str = "balanced"

  def record(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self.sampling), **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                                                    if f.name != "sampling"}}


def make_labels(num_images: int, num_classes: int, mode: str, seed: int = 0) -> np.ndarray:
  """int32 (num_images,) class labels.

  balanced: classes in order, each num_images // num_classes times; the first num_images % num_classes classes get
    one more. uniform: label i drawn from fold_in(label key, i), so a longer run extends a shorter one.
  """
  if num_images < 1:
    raise errors.InvalidInput(f"--num_images must be at least 1, got {num_images}")
  if mode == "balanced":
    return np.sort(np.arange(num_images) % num_classes).astype(np.int32)
  if mode == "uniform":
    key = jax.random.fold_in(jax.random.key(seed), LABEL_STREAM)
    draw = lambda i: jax.random.randint(jax.random.fold_in(key, i), (), 0, num_classes)
    return np.asarray(jax.vmap(draw)(np.arange(num_images, dtype=np.uint32)), np.int32)
  raise errors.InvalidInput(f"unknown label mode {mode!r}; choose one of {LABEL_MODES}")


def _read_back(paths: list[pathlib.Path], chunk: int = 256) -> Iterator[np.ndarray]:
  for start in range(0, len(paths), chunk):
    yield np.stack([image_io.load_png(p) for p in paths[start:start + chunk]])


OUTPUTS = ("images", "grid.png", "samples.npz")


def _replace_outputs(partial: pathlib.Path, out: pathlib.Path) -> None:
  """Moves the finished outputs into `out` in place of an earlier run's (other files in `out` stay)."""
  out.mkdir(parents=True, exist_ok=True)
  for name in OUTPUTS:
    old = out / name
    if old.is_dir():
      shutil.rmtree(old)
    elif old.exists():
      old.unlink()
    (partial / name).rename(old)
  partial.rmdir()


def run(model: nnx.Module, vq_decode_fn: Callable[[jax.Array], jax.Array], labels: Any, settings: RunSettings,
        out_dir: str | pathlib.Path, *, progress: bool = True) -> pathlib.Path:
  """Samples one image per label, writes the PNGs, the grid and samples.npz; returns the npz path.

  vq_decode_fn: codes (B, block_size) -> float images (B, H, W, 3) in [-1, 1] (jitted; called with full batches only,
  the last batch padded, so it compiles once).
  """
  settings.sampling.validate(model.cfg.vocab_size)
  labels = decoding.check_labels(labels, model.cfg.num_classes)
  sampler = decoding.Sampler(model, dtype=settings.dtype)
  settings = dataclasses.replace(settings, dtype=sampler.dtype)  # recorded as used
  out = pathlib.Path(out_dir)
  partial = out.with_name(f".{out.name}.partial")  # beside `out`: the same filesystem, so the moves are renames
  shutil.rmtree(partial, ignore_errors=True)  # an interrupted earlier run's
  (partial / "images").mkdir(parents=True)
  paths = [partial / "images" / f"{i:06d}.png" for i in range(len(labels))]
  grid: list[np.ndarray] = []
  batches = generation.sample_images(sampler, vq_decode_fn, labels, generation.sample_key(settings.seed),
                                     settings.sampling, batch_size=settings.batch_size)
  with tqdm(total=len(labels), unit="img", disable=not progress, desc="sampling") as bar:
    for start, batch_images in batches:
      for path, img in zip(paths[start:start + len(batch_images)], batch_images):
        image_io.save_png(path, img)
      grid.extend(batch_images[:max(0, GRID_IMAGES - len(grid))])
      bar.update(len(batch_images))

  image_io.save_png(partial / "grid.png", image_io.square_grid(np.stack(grid), pad=2))
  image_io.save_samples_npz(partial / "samples.npz", _read_back(paths), labels, num_images=len(labels),
                            **settings.record())
  _replace_outputs(partial, out)
  return out / "samples.npz"


# ----------------------------------------------------------------------------------------------------------------------
# Command line.


def define_flags(fv: flags.FlagValues, argv: list[str]) -> None:
  cli.define_config(fv, argv, "Config file with get_config() (default: the one stored with the checkpoint); "
                    "--config.key=value overrides its fields.", config_schema.MODEL_ONLY)
  flags.DEFINE_string("checkpoint", None, "Trainer workdir or converted checkpoint directory.", flag_values=fv)
  flags.DEFINE_string("vq", None, "VQ tokenizer: a .pt/.safetensors file (architecture from the config) or a saved "
                      "tokenizer directory (which has its own config).", flag_values=fv)
  flags.DEFINE_list("labels", None, "Comma-separated class ids, one image each (or --num_images).", flag_values=fv)
  flags.DEFINE_integer("num_images", None, "Number of images, labels from --label_mode (or --labels).",
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_enum("label_mode", "balanced", LABEL_MODES, "How --num_images draws its labels.", flag_values=fv)
  # Unset, these four come from the checkpoint's config.sample (the run's own recipe, e.g. gpt_xl's 1.70).
  flags.DEFINE_float("cfg_scale", None, "1 = no guidance, > 1 guides (default: config.sample.cfg_scale).",
                     flag_values=fv)
  flags.DEFINE_integer("cfg_interval", -1, "-1 guides every token; k guides tokens 0..k+1.", flag_values=fv)
  flags.DEFINE_float("temperature", None, "Sampling temperature (default: config.sample.temperature).",
                     flag_values=fv)
  flags.DEFINE_integer("top_k", None, "0 keeps every token (default: config.sample.top_k).", flag_values=fv)
  flags.DEFINE_float("top_p", None, "1 keeps every token (default: config.sample.top_p).", flag_values=fv)
  flags.DEFINE_bool("greedy", False, "Argmax decoding.", flag_values=fv)
  flags.DEFINE_integer("speculative_window", 0, "Speculative Jacobi decoding with this many draft tokens per forward "
                       "pass (0 = off): the same output distribution in fewer passes.", flag_values=fv)
  flags.DEFINE_enum("draft_init", decoding.SamplingSettings.draft_init, decoding.DRAFT_INITS,
                    "How speculative drafts entering the window are first drawn.", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Seed of the sample and label keys.", lower_bound=0, flag_values=fv)
  flags.DEFINE_integer("batch_size", 32, "Images per sampling batch (all devices).", lower_bound=1, flag_values=fv)
  flags.DEFINE_enum("dtype", None, decoding.COMPUTE_DTYPES, "Compute dtype (default: the model config's).",
                    flag_values=fv)
  flags.DEFINE_string("out", None, "Output directory.", flag_values=fv)
  flags.DEFINE_bool("progress", True, "Progress bar (--noprogress: none).", flag_values=fv)


def _labels(text: list[str]) -> list[int]:
  try:
    return [int(x) for x in text if x.strip()]
  except ValueError:
    raise errors.InvalidInput(f"--labels takes comma-separated class ids, got {','.join(text)!r}") from None


def run_from_flags(fv: flags.FlagValues) -> str:
  if (fv.labels is None) == (fv.num_images is None):
    raise errors.InvalidInput("give exactly one of --labels and --num_images")
  sampling_settings(fv, ml_collections.ConfigDict())  # bad flags fail before anything is read
  if pathlib.Path(fv.out).exists() and not pathlib.Path(fv.out).is_dir():
    raise errors.InvalidInput(f"--out {fv.out} is a file; name a directory for the images")
  labels = _labels(fv.labels) if fv.labels is not None else None
  model, config, decode = generation.load_model_and_tokenizer(fv.checkpoint, fv.vq, fv.config)
  settings = RunSettings(
      sampling=sampling_settings(fv, config.get("sample") or ml_collections.ConfigDict()),
      seed=fv.seed, batch_size=fv.batch_size, dtype=fv.dtype,
      checkpoint=str(pathlib.Path(fv.checkpoint).resolve()), vq=str(pathlib.Path(fv.vq).resolve()),
      label_mode="given" if fv.labels is not None else fv.label_mode)
  if labels is None:
    labels = make_labels(fv.num_images, model.cfg.num_classes, fv.label_mode, fv.seed)
  npz = run(model, decode, labels, settings, fv.out, progress=fv.progress)
  return f"wrote {len(labels)} images to {fv.out} ({npz.name})"


SAMPLE_FLAGS = ("cfg_scale", "temperature", "top_k", "top_p")


def sampling_settings(fv: flags.FlagValues, defaults: ml_collections.ConfigDict) -> decoding.SamplingSettings:
  """The flags given on the command line, the rest from `defaults` (a config's `sample` section)."""
  return decoding.SamplingSettings.from_config(
      defaults, **{k: fv[k].value for k in SAMPLE_FLAGS}, cfg_interval=fv.cfg_interval, greedy=fv.greedy,
      speculative_window=fv.speculative_window, draft_init=fv.draft_init)


def main(argv: list[str] | None = None) -> int:
  return cli.main(run_from_flags, define_flags, argv, doc=__doc__, required=("checkpoint", "vq", "out"))


if __name__ == "__main__":
  sys.exit(main())
