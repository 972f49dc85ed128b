"""Trains the Fashion-MNIST classifier of the online metric and writes it as a shippable directory.

  python -m npp_jax.train_classifier --config configs/fashion_classifier.py --out npp_jax/assets/fashion_classifier

Recipe: the 60,000 real training images as the pipeline makes them (28x28 centred on a black 32x32 canvas, gray
replicated to RGB, [-1, 1]); each batch shifted by a random -2..2 pixels per axis (a roll, exact because the
canvas has a 2-pixel black border); no flips (Fashion-MNIST's shoes all face left, and generated ones should too).
AdamW with a linear warm-up and cosine decay, cross-entropy, batches drawn from per-epoch permutations. Every
random choice comes from the config's seed. It takes a few minutes on 2 CPU cores.

The directory gets params.npz, meta.json (architecture, checksums, recipe, accuracies) and test_stats.npz (the
mean and covariance of the features over the 10,000 test images, the online FD's reference).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from npp_jax import errors
from npp_jax.eval import adm
from npp_jax.eval import fashion
from npp_jax.model_files import store
from npp_jax.models import classifier as classifier_lib

MAX_SHIFT = 2  # The `pad` canvas leaves 2 black pixels on each side of a 28x28 image in 32x32.


def random_shift(images: jax.Array, key: jax.Array, max_shift: int = MAX_SHIFT) -> jax.Array:
  """Rolls each (H, W, C) image by its own random (dy, dx) in [-max_shift, max_shift]."""
  shifts = jax.random.randint(key, (images.shape[0], 2), -max_shift, max_shift + 1)
  return jax.vmap(lambda image, s: jnp.roll(image, (s[0], s[1]), axis=(0, 1)))(images, shifts)


def make_optimizer(steps: int, lr: float, weight_decay: float, warmup: int) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(warmup, steps - 1), steps)
  return optax.adamw(schedule, weight_decay=weight_decay)


def train(images: np.ndarray, labels: np.ndarray, *, steps: int, batch_size: int, lr: float, weight_decay: float,
          warmup: int, seed: int, arch: dict, log_every: int = 200) -> classifier_lib.FashionClassifier:
  """Trains a classifier on uint8 (N, 32, 32, 3) images; returns the model."""
  model = classifier_lib.build(arch, seed)
  graphdef, params = nnx.split(model, nnx.Param)
  optimizer = make_optimizer(steps, lr, weight_decay, warmup)
  opt_state = optimizer.init(params)
  base_key = jax.random.key(seed)

  def loss_fn(params, batch, batch_labels):
    logits, _ = nnx.merge(graphdef, params)(batch)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch_labels).mean()
    return loss, jnp.mean(jnp.argmax(logits, -1) == batch_labels)

  @jax.jit
  def step(params, opt_state, batch, batch_labels, step_index):
    batch = random_shift(batch, jax.random.fold_in(base_key, step_index))
    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, batch_labels)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, acc

  rng = np.random.default_rng(seed)
  order, cursor = rng.permutation(len(images)), 0
  started, running = time.time(), []
  for i in range(steps):
    if cursor + batch_size > len(order):
      order, cursor = rng.permutation(len(images)), 0
    idx = order[cursor:cursor + batch_size]
    cursor += batch_size
    params, opt_state, loss, acc = step(params, opt_state, images[idx], labels[idx], i)
    running.append((loss, acc))
    if (i + 1) % log_every == 0 or i + 1 == steps:
      loss_avg, acc_avg = np.mean(np.asarray(jax.device_get(running)), axis=0)
      logging.info("[%d/%d] loss=%.4f train_acc=%.4f (%.0f s)", i + 1, steps, loss_avg, acc_avg,
                   time.time() - started)
      running = []
  nnx.update(model, params)
  return model


RECIPE_FIELDS = ("steps", "batch_size", "lr", "weight_decay", "warmup", "seed")


def run(config: ml_collections.ConfigDict, out: str) -> dict:
  """Trains on the config's recipe, evaluates, writes `out`; returns the saved meta."""
  if config.steps < 1 or config.batch_size < 1:
    raise errors.InvalidInput(f"steps and batch_size must be positive, got {config.steps} and {config.batch_size}")
  train_images, train_labels = fashion.load_real_images("train", config.data_dir)
  test_images, test_labels = fashion.load_real_images("test", config.data_dir)
  if config.batch_size > len(train_images):
    raise errors.InvalidInput(f"batch_size {config.batch_size} exceeds the {len(train_images)} training images")
  arch = dict(classifier_lib.DEFAULT_ARCH)
  recipe = {k: config[k] for k in RECIPE_FIELDS}
  started = time.time()
  model = train(train_images, train_labels, arch=arch, **recipe)
  train_seconds = time.time() - started
  apply_fn = classifier_lib.make_apply_fn(model)
  logits, features = fashion.predict(test_images, apply_fn)
  test_accuracy, per_class = fashion.agreement(logits, test_labels, arch["num_classes"])
  train_logits, _ = fashion.predict(train_images, apply_fn)
  train_accuracy, _ = fashion.agreement(train_logits, train_labels, arch["num_classes"])
  stats = adm.compute_statistics(np.asarray(features, np.float64))
  return store.save_classifier(out, model, arch, {
      "test_accuracy": round(test_accuracy, 4), "train_accuracy": round(train_accuracy, 4),
      "test_per_class_accuracy": [round(a, 4) for a in per_class], "recipe": recipe,
      "train_seconds": round(train_seconds), "jax_version": jax.__version__,
      "command": "python -m npp_jax.train_classifier --config configs/fashion_classifier.py " + " ".join(
          f"--config.{k}={v}" for k, v in recipe.items()) + " --out DIR",
      "reference_stats": "features of the 10000 Fashion-MNIST test images"}, (stats.mu, stats.sigma, len(features)))
