"""The shipped Fashion-MNIST classifier, the online metric (FD + label agreement) and the training recipe."""

import gzip
import hashlib
import json
import math
import os
import pathlib
import shutil
import struct

import jax
import numpy as np
import pytest

from npp_jax import assets
from npp_jax import images as images_lib
from npp_jax import train_classifier
from npp_jax.data import augment, sources
from npp_jax.eval import adm, fashion
from npp_jax.model_files import store
from npp_jax.models import classifier as classifier_lib
from npp_jax.trainers import classifier_trainer
import system_packages

ACCURACY_MARGIN = 0.03  # 1000 test images: the binomial standard error is ~1%.


@pytest.fixture(scope="module")
def evaluator() -> fashion.Evaluator:
  return fashion.Evaluator(batch_size=250)


def _require_dataset() -> None:
  system_packages.require("dataset-fashion-mnist", os.path.isdir(sources.FASHION_MNIST_DIR))


@pytest.fixture(scope="module")
def test_set() -> tuple[np.ndarray, np.ndarray]:
  _require_dataset()
  return fashion.load_real_images("test", limit=1000)


@pytest.fixture(scope="module")
def train_halves() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
  _require_dataset()
  images, labels = fashion.load_real_images("train", limit=4000)
  return (images[:2000], labels[:2000]), (images[2000:], labels[2000:])


def _features(evaluator, images) -> np.ndarray:
  return fashion.predict(images, evaluator.apply_fn, evaluator.batch_size)[1]


def test_shipped_files_match_their_checksums():
  meta = json.loads((assets.FASHION_CLASSIFIER / store.CLASSIFIER_META_FILE).read_text())
  for name in (store.CLASSIFIER_PARAMS_FILE, store.CLASSIFIER_STATS_FILE):
    digest = hashlib.sha256((assets.FASHION_CLASSIFIER / name).read_bytes()).hexdigest()
    assert digest == meta["sha256"][name]
  size = sum(p.stat().st_size for p in assets.FASHION_CLASSIFIER.iterdir())
  assert size < 4 << 20
  assert 0.85 <= meta["test_accuracy"] <= 1.0
  model, loaded_meta = store.load_classifier()
  assert loaded_meta == meta
  with np.load(assets.FASHION_CLASSIFIER / store.CLASSIFIER_PARAMS_FILE) as npz:
    for key, value in classifier_lib.flat_params(model).items():
      np.testing.assert_array_equal(value, npz[key])


def test_damaged_weights_are_refused(tmp_path):
  copy = tmp_path / "cls"
  shutil.copytree(assets.FASHION_CLASSIFIER, copy)
  data = bytearray((copy / store.CLASSIFIER_PARAMS_FILE).read_bytes())
  data[-100] ^= 1
  (copy / store.CLASSIFIER_PARAMS_FILE).write_bytes(bytes(data))
  with pytest.raises(ValueError, match="sha256"):
    store.load_classifier(copy)
  with pytest.raises(FileNotFoundError, match="meta.json"):
    store.load_classifier(tmp_path)


def test_real_images_match_the_pad_augmentation(test_set):
  images, _ = test_set
  raw, _ = sources.load_fashion_mnist(sources.FASHION_MNIST_DIR, "test")
  np.testing.assert_array_equal(images[7], augment.make_views(raw[7], "pad", 32)[0])
  np.testing.assert_array_equal(images[7, 2:30, 2:30, 1], raw[7])
  assert images[:, :2].max() == 0 and images[:, 30:].max() == 0


def test_accuracy_and_agreement_on_real_test_images(evaluator, test_set):
  images, labels = test_set
  result = fashion.classifier_metrics(images, labels, model=evaluator)
  # Independent: the unjitted model on float inputs, argmax by hand.
  logits, _ = evaluator.model(images.astype(np.float32) / 127.5 - 1)
  accuracy = float(np.mean(np.argmax(np.asarray(logits), -1) == labels))
  assert result["n"] == 1000
  assert result["agreement"] == pytest.approx(accuracy, abs=1e-3)
  assert accuracy >= evaluator.meta["test_accuracy"] - ACCURACY_MARGIN
  per_class = [np.mean(np.argmax(np.asarray(logits), -1)[labels == c] == c) for c in range(10)]
  np.testing.assert_allclose(result["per_class_agreement"], per_class, atol=1e-3)
  shuffled = np.random.default_rng(0).permutation(labels)
  assert 0.05 <= fashion.classifier_metrics(images, shuffled, model=evaluator)["agreement"] <= 0.15


def test_uint8_and_float_images_give_the_same_features(evaluator, test_set):
  images = test_set[0][:64]
  as_uint8 = _features(evaluator, images)
  as_float = _features(evaluator, images.astype(np.float32) / 127.5 - 1)
  np.testing.assert_allclose(as_uint8, as_float, atol=1e-4)
  # The float -> uint8 round trip of saved samples moves features only slightly.
  round_trip = _features(evaluator, images_lib.to_uint8(images.astype(np.float32) / 127.5 - 1))
  assert np.abs(round_trip - as_uint8).max() < 0.05 * np.abs(as_uint8).max()


def test_fd_of_a_set_with_itself_is_zero(evaluator, test_set):
  images, labels = test_set
  features = _features(evaluator, images)
  reference = adm.compute_statistics(features.astype(np.float64))
  fd = fashion.classifier_metrics(images, labels, model=evaluator, reference=reference)["fd"]
  scale = np.trace(reference.sigma)
  assert abs(fd) < 1e-6 * scale


def test_fd_separates_real_from_noise_and_shifted_sets(evaluator, train_halves, test_set):
  (first, first_labels), (second, _) = train_halves
  reference = adm.compute_statistics(_features(evaluator, second).astype(np.float64))
  noise = np.random.default_rng(0).integers(0, 256, first.shape, dtype=np.uint8)
  fds = {
      "halves": fashion.classifier_metrics(first, first_labels, model=evaluator, reference=reference)["fd"],
      "noise": fashion.classifier_metrics(noise, first_labels, model=evaluator, reference=reference)["fd"],
      "rolled": fashion.classifier_metrics(np.roll(first, 8, axis=(1, 2)), first_labels, model=evaluator,
                                               reference=reference)["fd"],
      "inverted": fashion.classifier_metrics(255 - first, first_labels, model=evaluator, reference=reference)["fd"],
  }
  print("FD:", {k: round(v, 3) for k, v in fds.items()})
  assert fds["halves"] > 0
  assert fds["noise"] > 50 * fds["halves"]
  assert fds["rolled"] > 10 * fds["halves"]
  assert fds["inverted"] > 10 * fds["halves"]
  # Against the shipped test-set statistics, real train images are as close as the other train half is.
  shipped = fashion.classifier_metrics(first, first_labels, model=evaluator)["fd"]
  assert shipped < 2 * fds["halves"] + 0.1 * fds["rolled"]


def test_per_class_agreement_marks_absent_classes(evaluator, test_set):
  images, labels = test_set
  keep = labels < 3
  result = fashion.classifier_metrics(images[keep], labels[keep], model=evaluator)
  assert all(math.isnan(a) for a in result["per_class_agreement"][3:])
  assert all(0.5 < a <= 1 for a in result["per_class_agreement"][:3])
  with pytest.raises(ValueError, match="labels"):
    fashion.classifier_metrics(images[:4], np.array([0, 1, 2, 10]), model=evaluator)
  with pytest.raises(ValueError, match="labels"):
    fashion.classifier_metrics(images[:4], np.array([0, 1]), model=evaluator)


def test_predict_pads_the_last_batch(evaluator, test_set):
  images = test_set[0][:7]
  logits, features = fashion.predict(images, evaluator.apply_fn, batch_size=4)
  direct_logits, direct_features = evaluator.model(images)
  np.testing.assert_allclose(logits, np.asarray(direct_logits), atol=1e-4)
  np.testing.assert_allclose(features, np.asarray(direct_features), atol=1e-4)


def test_random_shift_is_an_exact_translation():
  rng = np.random.default_rng(0)
  small = rng.integers(1, 256, (28, 28, 1), dtype=np.uint8)
  canvas = augment.pad_to(small, 32)
  key = jax.random.key(3)
  shifted = np.asarray(classifier_trainer.random_shift(np.stack([canvas] * 16), key))
  offsets = set()
  for image in shifted:
    rows, cols = np.nonzero(image[..., 0])
    top, left = rows.min(), cols.min()
    offsets.add((int(top), int(left)))
    expected = np.zeros_like(canvas)
    expected[top:top + 28, left:left + 28] = small
    np.testing.assert_array_equal(image, expected)
  assert all(0 <= t <= 4 and 0 <= left <= 4 for t, left in offsets) and len(offsets) > 3


def _write_idx(path: pathlib.Path, array: np.ndarray) -> None:
  magic = 0x803 if array.ndim == 3 else 0x801
  with gzip.open(path, "wb") as f:
    f.write(struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes())


def test_train_classifier_cli_writes_a_loadable_classifier(tmp_path, capsys):
  rng = np.random.default_rng(0)
  data = tmp_path / "data"
  data.mkdir()
  for prefix, n in (("train", 64), ("t10k", 32)):
    labels = np.arange(n, dtype=np.uint8) % 10
    images = (labels[:, None, None] * 25 + rng.integers(0, 5, (n, 28, 28))).astype(np.uint8)
    _write_idx(data / f"{prefix}-images-idx3-ubyte.gz", images)
    _write_idx(data / f"{prefix}-labels-idx1-ubyte.gz", labels)
  out = tmp_path / "cls"
  config = ["--config", "configs/fashion_classifier.py", f"--config.data_dir={data}"]
  assert train_classifier.main(["train_classifier", *config, "--out", str(out), "--config.steps=3",
                                "--config.batch_size=16", "--config.warmup=1"]) == 0
  model, meta = store.load_classifier(out)
  assert meta["recipe"]["steps"] == 3 and 0 <= meta["test_accuracy"] <= 1
  test_images, test_labels = fashion.load_real_images("test", data)
  features = np.asarray(model(test_images)[1], np.float64)
  mu, sigma = store.load_reference_stats(out)
  np.testing.assert_allclose(mu, features.mean(0), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(sigma, np.cov(features, rowvar=False), rtol=1e-3, atol=1e-5)
  result = fashion.classifier_metrics(test_images, test_labels, model=fashion.Evaluator(out))
  assert result["agreement"] == pytest.approx(meta["test_accuracy"], abs=1e-4)

  assert train_classifier.main(["train_classifier", "--config", "configs/fashion_classifier.py", "--out", str(out),
                                f"--config.data_dir={tmp_path / 'missing'}"]) == 1
  assert "does not exist" in capsys.readouterr().err


def test_sampling_errors_follow_the_binomial_and_shrink_with_more_samples():
  rng = np.random.default_rng(0)
  dim = 8
  reference = (np.zeros(dim), np.eye(dim))
  errors = {}
  for n in (200, 800):
    hits = rng.random(n) < 0.75
    features = rng.normal(size=(n, dim)) + 0.5
    fd_se, agreement_se = fashion.sampling_errors(hits, features, reference, rounds=300)
    binomial = math.sqrt(hits.mean() * (1 - hits.mean()) / n)
    assert agreement_se == pytest.approx(binomial, rel=0.2)
    errors[n] = fd_se
  assert 0.3 < errors[800] / errors[200] < 0.7  # about 1/sqrt(4)
  again = fashion.sampling_errors(hits, features, reference, rounds=300)
  assert again == (errors[800], again[1])  # seeded: the same images give the same errors
