"""Throughput of the evaluation pipeline: Inception features (images/s), precision/recall and FID times.

  python bench/eval_throughput.py [--image_size 256] [--batch_sizes 64,200] [--images 1000] [--pr_points 10000]

Uses placeholder weights (speed does not depend on their values). Prints images/s per batch size at full float32
matmul precision (what the evaluator uses) and at the backend's default precision (TF32 on recent GPUs), with their
ratio, then the time of precision/recall on N x N random 2048-d features and of one 2048-d FID square root.
"""

import sys
import time

import jax
import numpy as np
from absl import flags

from npp_jax import cli
from npp_jax import huge_pages
from npp_jax.eval import adm
from npp_jax.models import inception


def images_per_second(precision, image_size: int, batch_size: int, num_images: int) -> float:
  model = inception.InceptionV3(precision=precision)
  fn = inception.make_feature_fn(model, outputs=("pool3", "spatial"))
  batch = np.random.default_rng(0).integers(0, 256, (batch_size, image_size, image_size, 3), dtype=np.uint8)
  jax.block_until_ready(fn(batch))  # Compile.
  steps = max(1, num_images // batch_size)
  start = time.perf_counter()
  for _ in range(steps):
    out = fn(batch)
  jax.block_until_ready(out)
  return steps * batch_size / (time.perf_counter() - start)


def define_flags(fv: flags.FlagValues, argv: list[str]) -> None:
  del argv  # No config.
  flags.DEFINE_integer("image_size", 256, "Side of the images fed to the Inception.", flag_values=fv)
  flags.DEFINE_list("batch_sizes", ["64", "200"], "Inception batch sizes to time.", flag_values=fv)
  flags.DEFINE_integer("images", 1000, "Images timed per setting.", flag_values=fv)
  flags.DEFINE_integer("pr_points", 10000, "Points per set for precision/recall.", flag_values=fv)


def run(args: flags.FlagValues) -> None:
  print(f"backend {jax.default_backend()}, {jax.device_count()} devices: {jax.devices()[0].device_kind}")
  for batch_size in (int(b) for b in args.batch_sizes):
    full = images_per_second(jax.lax.Precision.HIGHEST, args.image_size, batch_size, args.images)
    fast = images_per_second(jax.lax.Precision.DEFAULT, args.image_size, batch_size, args.images)
    print(f"batch {batch_size}: {full:.1f} images/s (float32 HIGHEST), {fast:.1f} images/s (DEFAULT), "
          f"ratio {fast / full:.2f}")

  rng = np.random.default_rng(1)
  ref = rng.random((args.pr_points, 2048), np.float32)
  sample = rng.random((args.pr_points, 2048), np.float32)
  adm.precision_recall(ref[:64], sample[:64])  # Warm-up (the full-size shapes still compile once).
  start = time.perf_counter()
  adm.precision_recall(ref, sample)
  print(f"precision/recall, {args.pr_points} x {args.pr_points} points: {time.perf_counter() - start:.1f} s")

  stats = adm.compute_statistics(ref[:4096])
  start = time.perf_counter()
  adm.frechet_distance(*stats, *adm.compute_statistics(sample[:4096]))
  print(f"one FID (2048-d sqrtm): {time.perf_counter() - start:.1f} s")


def main(argv: list[str] | None = None) -> int:
  return cli.main(run, define_flags, argv, doc=__doc__)


if __name__ == "__main__":
  huge_pages.restart_with_huge_pages(this_program=True)
  sys.exit(main())
