"""Training-time samples and online metrics: a class-per-row sample grid, and a quality metric every N steps.

Needs a tokenizer (config.vq.checkpoint) to turn codes into images. The metric is the shipped Fashion-MNIST
classifier's Frechet distance and label agreement (config.eval.classifier='fashion'), or Inception FID against a
reference batch on a sample subset (config.eval.inception + config.eval.reference) for ImageNet runs.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from npp_jax import errors
from npp_jax import fileio
from npp_jax import images
from npp_jax.eval import adm
from npp_jax.eval import fashion
from npp_jax.model_files import param_mapping
from npp_jax.models import inception
from npp_jax.models import vq as vq_lib
from npp_jax.sampling import decoding
from npp_jax.sampling import generation


class Monitor:
  """Called as monitor(step, params) by the trainer; only process 0 writes."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, writer, graphdef: Any, vq_model):
    self._config = config
    self._writer = writer
    self._graphdef = graphdef
    self._decode = vq_lib.make_decode_fn(vq_model)
    self._dir = epath.Path(workdir) / "samples"
    self._settings = decoding.SamplingSettings.from_config(config.sample).validate(config.model.vocab_size)
    self._key = jax.random.fold_in(jax.random.key(config.seed), 2)  # the same samples at every step: comparable
    self._metric = _make_metric(config.eval)

  def __call__(self, step: int, params: dict) -> dict[str, float]:
    if jax.process_count() > 1:
      params = multihost_utils.process_allgather(params, tiled=True)  # sampling runs on local devices
    sampler = decoding.Sampler(nnx.merge(self._graphdef, params))
    classes, per_class = self._config.model.num_classes, self._config.eval.grid_columns
    labels = np.repeat(np.arange(classes), per_class)
    grid = images.make_grid(self._images(sampler, labels), rows=classes, pad=1)
    values = {}
    if self._metric is not None:
      n = self._config.eval.num_samples
      eval_labels = np.arange(n) % classes
      values = self._metric(self._images(sampler, eval_labels, offset=len(labels)), eval_labels)
    if jax.process_index() == 0:
      self._dir.mkdir(parents=True, exist_ok=True)
      images.save_png(self._dir / f"step_{step:07d}.png", grid)
      images.save_png(self._dir / "latest.png", grid)
      self._writer.image(step, "samples", grid)
      if values:
        self._writer.scalars(step, {f"eval/{k}": v for k, v in values.items()})
    return values

  def _images(self, sampler: decoding.Sampler, labels: np.ndarray, offset: int = 0) -> np.ndarray:
    return np.concatenate([batch for _, batch in generation.sample_images(
        sampler, self._decode, labels, self._key, self._settings, batch_size=self._config.eval.batch_size,
        offset=offset)])


def _make_metric(eval_cfg: ml_collections.ConfigDict) -> Callable[[np.ndarray, np.ndarray], dict] | None:
  if eval_cfg.classifier == "fashion":
    evaluator = fashion.Evaluator()  # loaded and compiled once for the whole run

    def classifier_metric(samples: np.ndarray, labels: np.ndarray) -> dict:
      result = evaluator(samples, labels)
      return {"fd": float(result["fd"]), "agreement": float(result["agreement"])}

    return classifier_metric
  if eval_cfg.classifier:
    raise errors.InvalidInput(f"eval.classifier must be '' or 'fashion', got {eval_cfg.classifier!r}")
  if eval_cfg.inception:
    return _inception_fid(eval_cfg)
  return None


def _inception_fid(eval_cfg: ml_collections.ConfigDict) -> Callable[[np.ndarray, np.ndarray], dict]:
  """FID of the samples against a reference batch's images (its activations cached next to it)."""
  if not eval_cfg.reference:
    raise errors.InvalidInput("eval.inception is set but eval.reference is empty: give a reference batch .npz")
  feature_fn = inception.make_feature_fn(param_mapping.inception_from_torch(eval_cfg.inception), ("pool3",))
  reference, _ = adm.reference_activations(
      feature_fn, eval_cfg.reference, ref_sha256=fileio.file_sha256(eval_cfg.reference),
      weights_sha256=fileio.file_sha256(eval_cfg.inception), preprocessing="pytorch_fid",
      batch_size=eval_cfg.batch_size, progress=False)
  ref_stats = adm.compute_statistics(reference["pool3"])

  def inception_metric(samples: np.ndarray, labels: np.ndarray) -> dict:
    del labels
    pool = np.concatenate([np.asarray(feature_fn(samples[i:i + eval_cfg.batch_size])["pool3"])
                           for i in range(0, len(samples), eval_cfg.batch_size)])
    stats = adm.compute_statistics(pool)
    return {"fid_subset": float(adm.frechet_distance(stats.mu, stats.sigma, ref_stats.mu, ref_stats.sigma))}

  return inception_metric
