"""Sample-quality metrics with the formulas of OpenAI's ADM evaluator (guided-diffusion `evaluations/evaluator.py`,
the evaluator LlamaGen and NPP report), without TensorFlow; and the pipeline behind `python -m npp_jax.evaluate`.

Metrics, with ADM's float conventions:
  FID / sFID   mu = np.mean (float32 for float32 features), sigma = np.cov(rowvar=False) (float64); the Frechet
               distance takes scipy's sqrtm of sigma1 @ sigma2, drops a negligible imaginary part, and retries with
               1e-6 added to the diagonals if the square root is not finite. FID uses the 2048-d pool3 features,
               sFID the 2023-d spatial ones (Mixed_6d.branch1x1[..., :7]).
  IS           softmax(pool3 @ fc.weight.T), with no bias (ADM's `softmax/logits/MatMul`), float32 throughout; one
               score per split of `split_size` = 5000 samples, averaged (50,000 samples make 10 splits).
  P / R        improved precision/recall (Kynkaanniemi et al.), k = 3: a point's radius is its squared distance to
               its 3rd nearest neighbour in its own set (itself being neighbour 0); precision is the fraction of
               samples inside some reference point's ball, recall the fraction of reference points inside some
               sample's ball.

One deliberate difference: ADM computes the P/R distances in float16 (falling back to float32 only on overflow).
Here they are float32 at full matmul precision, on centred features, so they are exact to about 1e-6 relative.
Decisions that sit within float16 error of a radius can therefore flip: on the reference fixture 2 of 800 samples
do (precision 0.10375 here and with float64 distances, 0.10625 in ADM); cases with clear margins agree exactly.

Reference batches: with `ref_stats="images"` (default) FID/sFID statistics are computed with *this* network from the
reference npz's `arr_0` images and cached next to it, keyed by the file's sha256 and the weights' sha256. ADM's
reference files also carry `mu`/`sigma`/`mu_s`/`sigma_s`, which ADM uses for FID (for VIRTUAL_imagenet256_labeled.npz
they describe the full ImageNet train set, not the 10k images); `ref_stats="stored"` uses them, which is only
meaningful with features that match ADM's TF graph (`preprocessing="tf1"` and the real weights).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import pathlib
import warnings
import zipfile
from typing import Callable, Iterator, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg
from tqdm import tqdm

from npp_jax import errors
from npp_jax import fileio
from npp_jax.model_files import param_mapping
from npp_jax.models import inception

PathLike = str | os.PathLike

PR_NEIGHBOURHOOD = 3  # ADM's nhood_sizes=(3,).
IS_SPLIT_SIZE = 5000  # ADM's compute_inception_score default.
PR_BLOCK_SIZE = 10000  # ADM's row/col batch sizes; only memory depends on it.
# Below feature_dim + 1 samples the covariance of the 2048-d pool features cannot be full rank: the square root in
# the Frechet distance becomes ill-posed and small-sample bias dominates FID (ADM/LlamaGen use 50,000 samples).
MIN_FID_SAMPLES = 2048 + 1
REF_STATS = ("images", "stored")
METRICS = ("fid", "sfid", "is", "pr")
_CACHE_VERSION = 1


# ----------------------------------------------------------------------------------------------------------------------
# FID.


class FIDStatistics(NamedTuple):
  mu: np.ndarray  # float32 for float32 features (np.mean keeps the dtype).
  sigma: np.ndarray  # float64 (np.cov upcasts).


def compute_statistics(acts: np.ndarray) -> FIDStatistics:
  """Mean and covariance of (N, D) features, exactly as ADM: np.mean(axis=0), np.cov(rowvar=False)."""
  acts = np.asarray(acts)
  if acts.ndim != 2 or acts.shape[0] < 2:
    raise errors.InvalidInput(f"feature statistics need an (N, D) array with N >= 2, got shape {acts.shape}")
  return FIDStatistics(np.mean(acts, axis=0), np.cov(acts, rowvar=False))


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
  """tr sqrtm(sigma1 @ sigma2) as ADM: scipy's sqrtm, eps retry if not finite, tiny imaginary part dropped."""
  with warnings.catch_warnings():
    # scipy's singular-matrix remarks; ADM silences them with disp=False (deprecated in scipy 1.17, same result).
    warnings.simplefilter("ignore", RuntimeWarning)
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
      warnings.warn(f"FID: sigma1 @ sigma2 is singular; adding {eps} to the diagonals, as ADM does")
      offset = np.eye(sigma1.shape[0]) * eps
      covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise errors.InvalidInput("FID: sqrtm(sigma1 @ sigma2) has an imaginary part of "
                                f"{np.max(np.abs(covmean.imag)):.3g}; the covariances are not valid")
    covmean = covmean.real
  return np.trace(covmean)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, *,
                     eps: float = 1e-6) -> float:
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), with ADM's arithmetic (scipy sqrtm path).

  The square root of a 2048 x 2048 product takes about 10-20 s of CPU on 2 cores.
  """
  mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
  sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise errors.InvalidInput(f"FID: statistics of different dimensions: mu {mu1.shape} vs {mu2.shape}, "
                              f"sigma {sigma1.shape} vs {sigma2.shape}")
  tr_covmean = _trace_sqrt_product(sigma1, sigma2, eps)
  diff = mu1 - mu2  # float32 for float32 means, as in ADM; the sum below is float64.
  return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


# ----------------------------------------------------------------------------------------------------------------------
# Inception Score.


def classifier_probabilities(pool: np.ndarray, fc_kernel: np.ndarray, batch_size: int = 4096) -> np.ndarray:
  """ADM's IS probabilities: float32 softmax(pool3 @ fc.weight.T), with no bias. fc_kernel is (2048, 1008)."""
  pool, fc_kernel = np.asarray(pool, np.float32), np.asarray(fc_kernel, np.float32)
  out = []
  for i in range(0, len(pool), batch_size):
    logits = pool[i:i + batch_size] @ fc_kernel
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    out.append(e / e.sum(axis=1, keepdims=True))
  return np.concatenate(out) if out else np.zeros((0, fc_kernel.shape[1]), np.float32)


def inception_score(probs: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
  """ADM's Inception Score: mean over splits of `split_size` rows of exp(E_x KL(p(y|x) || p(y))), float32.

  A zero probability contributes 0 (0 log 0 = 0), where ADM's formula would give NaN; otherwise identical.
  """
  probs = np.asarray(probs, np.float32)
  if probs.ndim != 2 or len(probs) == 0:
    raise errors.InvalidInput(f"Inception Score needs (N, classes) probabilities with N >= 1, got shape {probs.shape}")
  scores = []
  for i in range(0, len(probs), split_size):
    part = probs[i:i + split_size]
    marginal = np.expand_dims(np.mean(part, 0), 0)
    with np.errstate(divide="ignore", invalid="ignore"):
      kl = np.where(part > 0, part * (np.log(part) - np.log(marginal)), np.float32(0))
    scores.append(np.exp(np.mean(np.sum(kl, 1))))
  return float(np.mean(scores))


# ----------------------------------------------------------------------------------------------------------------------
# Improved precision and recall.


def _sq_distances(u: jnp.ndarray, v: jnp.ndarray) -> jnp.ndarray:
  """(n, m) squared euclidean distances, max(|u|^2 - 2 u.v + |v|^2, 0), float32 at full matmul precision."""
  nu = jnp.sum(u * u, axis=1)[:, None]
  nv = jnp.sum(v * v, axis=1)[None, :]
  uv = jnp.dot(u, v.T, precision=jax.lax.Precision.HIGHEST)
  return jnp.maximum(nu - 2 * uv + nv, 0.0)


@functools.partial(jax.jit, static_argnames=("count",))
def _merge_smallest(best: jnp.ndarray, rows: jnp.ndarray, cols: jnp.ndarray, count: int) -> jnp.ndarray:
  """The `count` smallest distances per row among `best` and the distances from `rows` to `cols`, ascending."""
  candidates = jnp.concatenate([best, _sq_distances(rows, cols)], axis=1)
  return -jax.lax.top_k(-candidates, count)[0]


@jax.jit
def _inside_balls(a: jnp.ndarray, radii_a: jnp.ndarray, b: jnp.ndarray, radii_b: jnp.ndarray):
  """(a_i inside some ball of b, b_j inside some ball of a) for one block pair; radii are squared."""
  d = _sq_distances(a, b)
  return jnp.any(d <= radii_b[None, :], axis=1), jnp.any(d <= radii_a[:, None], axis=0)


def _centred(features: np.ndarray, centre: np.ndarray) -> np.ndarray:
  # Distances do not change under a common shift; centring shrinks the norms and so the float32 cancellation.
  return (np.asarray(features, np.float64) - centre).astype(np.float32)


def manifold_radii(features: np.ndarray, k: int = PR_NEIGHBOURHOOD, block_size: int = PR_BLOCK_SIZE) -> np.ndarray:
  """(N,) float32 squared distance of each point to its k-th nearest neighbour in `features` (itself is the 0th)."""
  features = np.asarray(features)
  if len(features) <= k:
    raise errors.InvalidInput(f"precision/recall with k={k} needs more than {k} points per set, got {len(features)}")
  x = _centred(features, features.mean(axis=0, dtype=np.float64))
  radii = []
  for r in range(0, len(x), block_size):
    rows = jnp.asarray(x[r:r + block_size])
    best = jnp.full((rows.shape[0], k + 1), jnp.inf, jnp.float32)
    for c in range(0, len(x), block_size):
      best = _merge_smallest(best, rows, jnp.asarray(x[c:c + block_size]), k + 1)
    radii.append(np.asarray(best[:, k]))
  return np.concatenate(radii)


def precision_recall(ref: np.ndarray, sample: np.ndarray, k: int = PR_NEIGHBOURHOOD,
                     block_size: int = PR_BLOCK_SIZE) -> tuple[float, float]:
  """ADM's improved precision and recall of `sample` features against `ref` features (both (N, D))."""
  ref, sample = np.asarray(ref), np.asarray(sample)
  if ref.ndim != 2 or sample.ndim != 2 or ref.shape[1] != sample.shape[1]:
    raise errors.InvalidInput(f"precision/recall needs (N, D) features of equal D, got {ref.shape} and {sample.shape}")
  radii_ref, radii_sample = manifold_radii(ref, k, block_size), manifold_radii(sample, k, block_size)
  centre = ref.mean(axis=0, dtype=np.float64)
  ref_c, sample_c = _centred(ref, centre), _centred(sample, centre)
  ref_in = np.zeros(len(ref), bool)
  sample_in = np.zeros(len(sample), bool)
  for r in range(0, len(ref), block_size):
    for s in range(0, len(sample), block_size):
      a_in, b_in = _inside_balls(ref_c[r:r + block_size], radii_ref[r:r + block_size],
                                 sample_c[s:s + block_size], radii_sample[s:s + block_size])
      ref_in[r:r + block_size] |= np.asarray(a_in)
      sample_in[s:s + block_size] |= np.asarray(b_in)
  return float(np.mean(sample_in)), float(np.mean(ref_in))


# ----------------------------------------------------------------------------------------------------------------------
# Image batches in .npz files.


def _require_file(path: PathLike, what: str) -> pathlib.Path:
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{what} {path} does not exist")
  return path


@contextlib.contextmanager
def _npz_member(path: PathLike, name: str):
  """Opens `name` inside an .npz and yields (file positioned at the data, shape, dtype) without loading it."""
  path = pathlib.Path(path)
  try:
    archive = zipfile.ZipFile(path)
  except (zipfile.BadZipFile, OSError) as e:
    raise errors.InvalidInput(f"{path} is not a readable .npz file ({e})") from None
  with archive:
    if f"{name}.npy" not in archive.namelist():
      keys = ", ".join(sorted(n[:-4] for n in archive.namelist() if n.endswith(".npy"))) or "none"
      raise errors.InvalidInput(f"{path} has no array {name!r} (its arrays: {keys})")
    with archive.open(f"{name}.npy") as f:
      try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
          shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
          shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
          raise errors.InvalidInput(f"unsupported .npy format version {version}")
      except ValueError as e:
        raise errors.InvalidInput(f"{path}: {name} is not a valid .npy array ({e})") from None
      if fortran or dtype.hasobject:
        raise errors.InvalidInput(f"{path}: {name} must be a C-ordered numeric array")
      yield f, shape, dtype


def image_array_shape(path: PathLike) -> tuple[int, int, int, int]:
  """Shape (N, H, W, 3) of the uint8 `arr_0` in an ADM-style .npz, checked without reading the images."""
  with _npz_member(path, "arr_0") as (_, shape, dtype):
    if len(shape) != 4 or shape[-1] != 3 or dtype != np.uint8:
      raise errors.InvalidInput(f"{path}: arr_0 must be uint8 images of shape (N, H, W, 3), got {dtype} {shape}")
    return tuple(shape)


def iter_image_batches(path: PathLike, batch_size: int) -> Iterator[np.ndarray]:
  """Streams `arr_0` of an .npz in batches of `batch_size` images (the file is never read whole)."""
  image_array_shape(path)
  with _npz_member(path, "arr_0") as (f, shape, dtype):
    per_image = int(np.prod(shape[1:])) * dtype.itemsize
    for start in range(0, shape[0], batch_size):
      count = min(batch_size, shape[0] - start)
      data = f.read(count * per_image)
      if len(data) != count * per_image:
        raise errors.InvalidInput(f"{path}: arr_0 is truncated")
      yield np.frombuffer(data, dtype).reshape(count, *shape[1:])


def _jsonable(value: np.ndarray):
  """A small array as JSON (scalars and short lists); a large one summarised by shape, dtype, range and hash."""
  value = np.asarray(value)
  if value.dtype.kind not in "biuf" and value.dtype.kind not in "US":
    return {"shape": list(value.shape), "dtype": str(value.dtype)}
  if value.size <= 16:
    return value.tolist()
  summary = {"shape": list(value.shape), "dtype": str(value.dtype),
             "sha256": hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()}
  if value.dtype.kind in "biuf":
    summary.update(min=value.min().item(), max=value.max().item())
  return summary


def read_sampling_settings(path: PathLike) -> dict:
  """Every array of a samples .npz other than arr_0 (cfg_scale, temperature, top_k, top_p, seed, labels, ...)."""
  with np.load(path, allow_pickle=False) as data:
    return {name: _jsonable(data[name]) for name in data.files if name != "arr_0"}


# ----------------------------------------------------------------------------------------------------------------------
# Activations.


def compute_activations(feature_fn: Callable, path: PathLike, batch_size: int, *, desc: str = "",
                        progress: bool = True) -> dict[str, np.ndarray]:
  """pool3 (N, 2048) and spatial (N, 2023) float32 features of every image in an .npz, with a progress bar."""

  num = image_array_shape(path)[0]
  out = {"pool3": [], "spatial": []}
  pending = None

  def collect(result, count):
    for name in out:
      out[name].append(np.asarray(result[name][:count], np.float32))

  with tqdm(total=num, desc=desc, unit="img", disable=not progress, smoothing=0.1) as bar:
    for batch in iter_image_batches(path, batch_size):
      count = len(batch)
      if count < batch_size:  # Pad the last batch so that it reuses the compiled program.
        batch = np.concatenate([batch, np.zeros((batch_size - count, *batch.shape[1:]), batch.dtype)])
      result = feature_fn(batch)  # Dispatched asynchronously: read the previous batch's results meanwhile.
      if pending is not None:
        collect(*pending)
        bar.update(pending[1])
      pending = (result, count)
    if pending is not None:
      collect(*pending)
      bar.update(pending[1])
  return {name: np.concatenate(parts) for name, parts in out.items()}


def activation_cache_path(ref_path: PathLike, ref_sha256: str, weights_sha256: str, preprocessing: str) -> pathlib.Path:
  ref_path = pathlib.Path(ref_path)
  return ref_path.with_name(f"{ref_path.stem}.inception-{ref_sha256[:12]}-{weights_sha256[:12]}-{preprocessing}.npz")


def reference_activations(feature_fn: Callable, ref_path: PathLike, *, ref_sha256: str, weights_sha256: str,
                          preprocessing: str, batch_size: int, progress: bool = True
                          ) -> tuple[dict[str, np.ndarray], pathlib.Path | None]:
  """The reference images' features, from the cache next to the file when its key matches, else computed and cached.

  Returns (features, cache path or None when the directory is not writable).
  """
  cache = activation_cache_path(ref_path, ref_sha256, weights_sha256, preprocessing)
  key = {"version": _CACHE_VERSION, "ref_sha256": ref_sha256, "weights_sha256": weights_sha256,
         "preprocessing": preprocessing}
  if cache.is_file():
    try:
      with np.load(cache, allow_pickle=False) as data:
        if json.loads(str(data["key"])) == key:
          return {"pool3": data["pool3"], "spatial": data["spatial"]}, cache
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
      pass  # A damaged or foreign cache is recomputed.
  acts = compute_activations(feature_fn, ref_path, batch_size, desc="reference", progress=progress)
  try:
    fileio.save_npz(cache, key=np.asarray(json.dumps(key, sort_keys=True)), **acts)
  except OSError as e:
    warnings.warn(f"could not cache reference features at {cache}: {e}")
    cache = None
  return acts, cache


# ----------------------------------------------------------------------------------------------------------------------
# The whole evaluation.


def _stored_statistics(ref_path: pathlib.Path) -> tuple[FIDStatistics, FIDStatistics]:
  """The (pool, spatial) statistics an ADM reference file carries: mu, sigma, mu_s, sigma_s."""
  dims = {"mu": 2048, "mu_s": 17 * 17 * 7}
  with np.load(ref_path, allow_pickle=False) as data:
    missing = [k for k in ("mu", "sigma", "mu_s", "sigma_s") if k not in data.files]
    if missing:
      raise errors.InvalidInput(f"{ref_path} has no stored statistics ({', '.join(missing)} missing); use "
                                "ref_stats='images'")
    stats = FIDStatistics(data["mu"], data["sigma"]), FIDStatistics(data["mu_s"], data["sigma_s"])
  for (name, dim), (mu, sigma) in zip(dims.items(), stats):
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
      raise errors.InvalidInput(f"{ref_path}: stored {name} has shape {mu.shape} and its sigma {sigma.shape}; "
                                f"expected ({dim},) and ({dim}, {dim})")
  return stats


def _check_counts(samples_path, sample_shape, ref_path, ref_shape, metrics, ref_stats, min_samples) -> None:
  """Refuses a reference of another resolution, or too few images for the requested metrics."""
  if sample_shape[1:3] != ref_shape[1:3]:
    raise errors.InvalidInput(f"the reference images are {ref_shape[1]}x{ref_shape[2]} but the samples are "
                              f"{sample_shape[1]}x{sample_shape[2]}; use a reference batch of the samples' resolution")
  if {"fid", "sfid"} & set(metrics):
    fid_min = max(min_samples, 2)
    if sample_shape[0] < fid_min:
      raise errors.InvalidInput(f"{samples_path} holds {sample_shape[0]} images; FID needs at least {fid_min} "
                                "(min_samples; the default is the feature dimension + 1)")
    if ref_stats == "images" and ref_shape[0] < fid_min:
      raise errors.InvalidInput(f"the reference {ref_path} holds {ref_shape[0]} images; its FID statistics need at "
                                f"least {fid_min}")
  if "pr" in metrics and min(sample_shape[0], ref_shape[0]) <= PR_NEIGHBOURHOOD:
    raise errors.InvalidInput(f"precision/recall needs at least {PR_NEIGHBOURHOOD + 1} images in both the samples and "
                              "the reference")


def evaluate(samples_path: PathLike, ref_path: PathLike, weights_path: PathLike, *, batch_size: int = 200,
             preprocessing: str = "pytorch_fid", ref_stats: str = "images", metrics: tuple[str, ...] = METRICS,
             min_samples: int = MIN_FID_SAMPLES, progress: bool = True) -> dict:
  """FID, sFID, IS, precision and recall of an ADM-style samples .npz against a reference .npz; returns the report.

  Args:
    samples_path: .npz with arr_0 uint8 (N, H, W, 3) and optional sampling settings.
    ref_path: reference .npz with arr_0 images of the same resolution (and, for ref_stats="stored", mu/sigma).
    weights_path: pytorch-fid's Inception weight file.
    batch_size: images per feature-extraction step, over all devices.
    preprocessing: "pytorch_fid" or "tf1" (see models/inception.py).
    ref_stats: FID reference statistics from the reference "images" or the ones "stored" in the file.
    metrics: a subset of ("fid", "sfid", "is", "pr").
    min_samples: the fewest images accepted for FID/sFID (default: feature dimension + 1).
    progress: show progress bars.

  Raises:
    FileNotFoundError: a file does not exist.
    ValueError: unreadable or mismatched inputs (resolution, too few images, wrong weights, bad option).
  """
  samples_path = _require_file(samples_path, "samples file")
  ref_path = _require_file(ref_path, "reference batch")
  weights_path = _require_file(weights_path, "Inception weight file")
  metrics = tuple(metrics)
  unknown = [m for m in metrics if m not in METRICS]
  if unknown or not metrics:
    raise errors.InvalidInput(f"unknown or no metrics {list(unknown)}; choose from {', '.join(METRICS)}")
  if ref_stats not in REF_STATS:
    raise errors.InvalidInput(f"unknown ref_stats {ref_stats!r}; choose one of {', '.join(REF_STATS)}")
  if ref_stats == "stored" and preprocessing != "tf1":
    raise errors.InvalidInput("the statistics stored in an ADM reference come from TF's Inception preprocessing; "
                              "use preprocessing='tf1' with ref_stats='stored'")
  if batch_size < 1:
    raise errors.InvalidInput(f"batch size must be positive, got {batch_size}")
  sample_shape, ref_shape = image_array_shape(samples_path), image_array_shape(ref_path)
  _check_counts(samples_path, sample_shape, ref_path, ref_shape, metrics, ref_stats, min_samples)
  stored = _stored_statistics(ref_path) if ref_stats == "stored" else None  # Checked before the long part.

  weights_sha = fileio.file_sha256(weights_path)
  model = param_mapping.inception_from_torch(weights_path, preprocessing=preprocessing)
  fc_kernel = np.asarray(model.fc_kernel[...])
  feature_fn = inception.make_feature_fn(model, outputs=("pool3", "spatial"))
  ref_sha = fileio.file_sha256(ref_path)
  ref_acts, cache = reference_activations(feature_fn, ref_path, ref_sha256=ref_sha, weights_sha256=weights_sha,
                                          preprocessing=preprocessing, batch_size=batch_size, progress=progress)
  sample_acts = compute_activations(feature_fn, samples_path, batch_size, desc="samples", progress=progress)

  if stored is not None:
    ref_pool_stats, ref_spatial_stats = stored
  else:
    ref_pool_stats, ref_spatial_stats = (compute_statistics(ref_acts["pool3"]),
                                         compute_statistics(ref_acts["spatial"]))
  results = {}
  if "fid" in metrics:
    results["fid"] = frechet_distance(*compute_statistics(sample_acts["pool3"]), *ref_pool_stats)
  if "sfid" in metrics:
    results["sfid"] = frechet_distance(*compute_statistics(sample_acts["spatial"]), *ref_spatial_stats)
  if "is" in metrics:
    results["inception_score"] = inception_score(classifier_probabilities(sample_acts["pool3"], fc_kernel))
  if "pr" in metrics:
    results["precision"], results["recall"] = precision_recall(ref_acts["pool3"], sample_acts["pool3"])

  released = weights_sha.startswith(inception.RELEASED_WEIGHTS_SHA256_PREFIX)
  notes = []
  if not released:
    notes.append(f"the Inception weights' sha256 does not start with {inception.RELEASED_WEIGHTS_SHA256_PREFIX}, the "
                 "hash in pytorch-fid's released file name: unless they are that file, these numbers are not "
                 "comparable to published ones")
  if ref_stats == "images":
    notes.append(f"FID/sFID reference statistics come from the reference file's {ref_shape[0]} images with this "
                 "network, not from statistics stored in the file")
  if preprocessing == "pytorch_fid":
    notes.append("pytorch-fid preprocessing: features differ slightly from the ADM (TF) evaluator's")
  if "pr" in metrics:
    notes.append("precision/recall use exact float32 distances; ADM's float16 distances can move them by a few / N")
  return {
      "metrics": results,
      "num_samples": sample_shape[0],
      "num_reference_images": ref_shape[0],
      "image_size": list(sample_shape[1:3]),
      "samples": {"path": str(samples_path), "sha256": fileio.file_sha256(samples_path)},
      "reference": {"path": str(ref_path), "sha256": ref_sha, "statistics": ref_stats,
                    "activation_cache": str(cache) if cache else None},
      "inception": {"weights": str(weights_path), "sha256": weights_sha, "sha256_matches_released_name": released,
                    "preprocessing": preprocessing},
      "settings": {"is_split_size": IS_SPLIT_SIZE, "is_num_splits": math.ceil(sample_shape[0] / IS_SPLIT_SIZE),
                   "pr_k": PR_NEIGHBOURHOOD, "batch_size": batch_size, "devices": jax.device_count(),
                   "platform": jax.default_backend()},
      "sampling_settings": read_sampling_settings(samples_path),
      "notes": notes,
  }


def report_summary(report: Mapping) -> str:
  """One line: every metric in the report and the sample count."""
  names = {"fid": "FID", "sfid": "sFID", "inception_score": "IS", "precision": "precision", "recall": "recall"}
  parts = [f"{names[k]} {v:.4f}" for k, v in report["metrics"].items()]
  return "  ".join(parts) + f"  ({report['num_samples']} samples)"
