"""An online metric for small class-conditional datasets (Fashion-MNIST): classifier FD and label agreement.

A small CNN trained on real Fashion-MNIST (`npp_jax.models.classifier`, shipped weights) maps each generated image
to a feature vector and logits. Two numbers follow:

  fd         the Frechet distance between the Gaussian of the images' features and that of the 10,000 real test
             images (statistics shipped beside the weights, so no dataset is needed at run time), with the ADM
             arithmetic of `adm.frechet_distance`. Near 0 for real images, large for noise or shifted sets.
             Like FID, it is biased upwards for small N; compare values at the same sample count.
  agreement  the fraction of images whose argmax class equals their conditioning label (also per class). Real test
             images score the classifier's test accuracy, which is the ceiling.

Images are NHWC 32x32x3, float in [-1, 1] (what the VQ decoder returns) or uint8, as the default Fashion-MNIST
pipeline makes them (`load_real_images` builds the real ones the same way: `pad` augmentation, gray to RGB).
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable

import jax
import numpy as np

from npp_jax import assets
from npp_jax import errors
from npp_jax import sharding
from npp_jax.data import augment, sources
from npp_jax.eval import adm
from npp_jax.model_files import store
from npp_jax.models import classifier as classifier_lib

DEFAULT_BATCH_SIZE = 500


def load_real_images(split: str = "test", directory: str | os.PathLike = sources.FASHION_MNIST_DIR,
                     limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Fashion-MNIST as the pipeline sees it: uint8 (N, 32, 32, 3) (centred on black, gray replicated), labels (N,).

  `limit` keeps only the first `limit` images of the split.
  """
  images, labels = sources.load_fashion_mnist(directory, split)
  images, labels = images[:limit], labels[:limit]
  views = np.stack([augment.make_views(image, "pad", classifier_lib.IMAGE_SIZE)[0] for image in images])
  return views, labels


def predict(images: Any, apply_fn: Callable, batch_size: int = DEFAULT_BATCH_SIZE) -> tuple[np.ndarray, np.ndarray]:
  """(logits (N, classes), features (N, D)) as float32 numpy, in fixed-size batches (one compile per dtype).

  The last batch is padded with zeros up to `batch_size`, so any N compiles the same shape.
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] == 0:
    raise errors.InvalidInput(f"expected images of shape (N, H, W, 3) with N >= 1, got {images.shape}")
  n = images.shape[0]
  batch_size = min(batch_size, n)
  padded_apply = sharding.pad_shard_unpad(apply_fn, size=batch_size)
  outputs = [padded_apply(images[start:start + batch_size]) for start in range(0, n, batch_size)]  # not waited for
  logits = np.concatenate([np.asarray(batch_logits) for batch_logits, _ in outputs])
  features = np.concatenate([np.asarray(f) for _, f in outputs])
  return logits, features


def agreement(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[float, list[float]]:
  """Overall and per-class fraction of argmax(logits) == label; a class with no images gets NaN."""
  hits = np.argmax(logits, axis=-1) == labels
  per_class = [float(hits[labels == c].mean()) if np.any(labels == c) else math.nan for c in range(num_classes)]
  return float(hits.mean()), per_class


def frechet_distance_to(features: np.ndarray, reference: tuple[np.ndarray, np.ndarray]) -> float:
  """FD between the Gaussian of (N, D) features and reference (mu, sigma), via `adm.frechet_distance`."""
  mu, sigma = adm.compute_statistics(np.asarray(features, np.float64))
  return adm.frechet_distance(mu, sigma, *reference)


class Evaluator:
  """The classifier, its jitted forward and the reference statistics, loaded once and reused every call."""

  def __init__(self, directory: str | os.PathLike = assets.FASHION_CLASSIFIER,
               batch_size: int = DEFAULT_BATCH_SIZE):
    self.model, self.meta = store.load_classifier(directory)
    self.apply_fn = classifier_lib.make_apply_fn(self.model)
    self.reference = store.load_reference_stats(directory)
    self.batch_size = batch_size

  def __call__(self, images: Any, labels: Any, *, bootstrap: int = 0) -> dict:
    return classifier_metrics(images, labels, model=self, reference=self.reference, bootstrap=bootstrap)


def sampling_errors(hits: np.ndarray, features: np.ndarray, reference: tuple[np.ndarray, np.ndarray], rounds: int,
                    seed: int = 0) -> tuple[float, float]:
  """Standard errors of (FD, agreement) from the finite sample: the spread of both over `rounds` resamplings of the
  images with replacement (a fixed seed, so the same images give the same errors)."""
  rng = np.random.default_rng(seed)
  n = len(hits)
  draws = [rng.integers(0, n, n) for _ in range(rounds)]
  fds = [frechet_distance_to(features[i], reference) for i in draws]
  agreements = [hits[i].mean() for i in draws]
  return float(np.std(fds, ddof=1)), float(np.std(agreements, ddof=1))


def classifier_metrics(images: Any, labels: Any, model: Evaluator | classifier_lib.FashionClassifier | None = None,
                       reference: tuple[np.ndarray, np.ndarray] | None = None, bootstrap: int = 0) -> dict:
  """The online metric of generated images against their conditioning labels.

  Args:
    images: (N, 32, 32, 3) float in [-1, 1] or uint8, numpy or (fully addressable) jax array.
    labels: (N,) int conditioning labels.
    model: an `Evaluator` (reuses its compiled forward: the choice for periodic calls), a `FashionClassifier`, or
      None for the shipped classifier (loaded, and compiled, on each call).
    reference: (mu, sigma) to measure FD against; default: the statistics shipped with the classifier (`Evaluator`)
      or the real test set's statistics in the shipped directory.

    bootstrap: if > 1, also "fd_se" and "agreement_se", the standard errors from this many resamplings of the
      images (`sampling_errors`): how much the figures would move with other samples of the same model.

  Returns:
    {"fd": float, "agreement": float, "per_class_agreement": [float] * classes (NaN for an absent class), "n": N}.
    "fd" is NaN when N < 2 (no covariance).
  """
  if model is None:
    model = Evaluator()
  if isinstance(model, Evaluator):
    apply_fn, batch_size, num_classes = model.apply_fn, model.batch_size, model.meta["arch"]["num_classes"]
    reference = model.reference if reference is None else reference
  else:
    apply_fn, batch_size, num_classes = classifier_lib.make_apply_fn(model), DEFAULT_BATCH_SIZE, model.head.out_features
    reference = store.load_reference_stats() if reference is None else reference
  images = np.asarray(jax.device_get(images))
  labels = np.asarray(jax.device_get(labels)).astype(np.int64).reshape(-1)
  if len(labels) != len(images):
    raise errors.InvalidInput(f"classifier_metrics got {len(images)} images but {len(labels)} labels")
  if np.any((labels < 0) | (labels >= num_classes)):
    raise errors.InvalidInput(f"conditioning labels must lie in 0..{num_classes - 1}, got "
                              f"{labels.min()}..{labels.max()}")
  logits, features = predict(images, apply_fn, batch_size)
  overall, per_class = agreement(logits, labels, num_classes)
  fd = frechet_distance_to(features, reference) if len(images) >= 2 else math.nan
  result = {"fd": fd, "agreement": overall, "per_class_agreement": per_class, "n": int(len(images))}
  if bootstrap > 1:
    hits = np.argmax(logits, axis=-1) == labels
    result["fd_se"], result["agreement_se"] = sampling_errors(hits, features, reference, bootstrap)
  return result
