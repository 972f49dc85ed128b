"""The default run's plumbing end to end, on a handful of images: codes prepared into WORKDIR/codes with the shipped
tokenizer, a few NPP steps, and the class-per-row sample grid plus the classifier metric at the end."""

import json

import numpy as np
from PIL import Image

from npp_jax import config as config_lib
from npp_jax.trainers import gpt_trainer

CLASSES = 10


def image_folder(root, per_class=4):
  rng = np.random.default_rng(0)
  for c in range(CLASSES):
    folder = root / f"class_{c}"
    folder.mkdir(parents=True)
    for i in range(per_class):
      garment = np.zeros((28, 28), np.uint8)
      garment[4 + c: 24, 6:22] = rng.integers(60, 255)
      Image.fromarray(garment).save(folder / f"{i}.png")
  return root


def test_prepares_trains_and_samples(tmp_path):
  config = config_lib.load_file("configs/fashion.py")
  config.data.update(source="folder", dir=str(image_folder(tmp_path / "images")), shard_size=16)
  config.model.update(dim=64, n_layer=1, n_head=2)
  config.train.update(global_batch_size=8, total_steps=4, log_every=2, checkpoint_every=4)
  config.optim.warmup_steps = 1
  config.eval.update(every=2, num_samples=20, batch_size=10, grid_columns=2)
  workdir = tmp_path / "run"
  gpt_trainer.run(config, str(workdir))

  manifest = json.loads((workdir / "codes" / "manifest.json").read_text())
  assert manifest["num_images"] == 4 * CLASSES and manifest["grid"] == 8 and manifest["vocab_size"] == 512
  grid = np.asarray(Image.open(workdir / "samples" / "latest.png"))
  assert grid.shape == (CLASSES * 33 - 1, 2 * 33 - 1, 3)  # one row per class, 32 px images with 1 px gaps
  assert (workdir / "samples" / "step_0000002.png").exists() and (workdir / "samples" / "step_0000004.png").exists()
  evals = [row for row in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines()) if "eval/fd" in row]
  assert [row["step"] for row in evals] == [2, 4]
  assert all(0.0 <= row["eval/agreement"] <= 1.0 and np.isfinite(row["eval/fd"]) for row in evals)
