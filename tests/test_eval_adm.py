"""ADM-evaluator metrics against the reference run (fixtures/fid/adm_metrics*), closed forms, and the CLI."""

import json

import numpy as np
import pytest

from npp_jax import evaluate as evaluate_cli
from npp_jax import fileio
from npp_jax.eval import adm
from npp_jax.model_files import torch_io
import fixture_rules  # pylint: disable=g-bad-import-order


@pytest.fixture(scope="module")
def adm_run(fixtures_dir):
  """The evaluator's outputs (stored) and its input activations (rebuilt from the recipe in adm_metrics.json)."""
  with np.load(fixtures_dir / "fid" / "adm_metrics_io.npz") as data:
    arrays = dict(data)
  meta = json.loads((fixtures_dir / "fid" / "adm_metrics.json").read_text())
  arrays.update(fixture_rules.adm_activations(meta["data"]))
  arrays["is_weight_sum"] = meta["data"]["is_softmax_weight_checksum"]["sum_float64"]
  return arrays, meta["results"]


@pytest.fixture(scope="module")
def adm_fids(adm_run):
  """(FID, sFID, the four statistics) on the fixture features; two 2048-d square roots, so computed once."""
  arrays, _ = adm_run
  stats = {name: adm.compute_statistics(arrays[name])
           for name in ("sample_pool", "ref_pool", "sample_spatial", "ref_spatial")}
  fid = adm.frechet_distance(*stats["sample_pool"], *stats["ref_pool"])
  sfid = adm.frechet_distance(*stats["sample_spatial"], *stats["ref_spatial"])
  return fid, sfid, stats


# ----------------------------------------------------------------------------------------------------------------------
# Against ADM's evaluator.


def test_recipe_rebuilds_the_activations_the_evaluator_was_given(adm_run):
  arrays, _ = adm_run
  for name, digest in fixture_rules.ADM_ACTIVATION_SHA256.items():
    assert arrays[name].dtype == np.float32
    assert fixture_rules.array_sha256(arrays[name]) == digest, name


def test_fid_and_sfid_match_adm(adm_run, adm_fids):
  _, expected = adm_run
  fid, sfid, stats = adm_fids
  assert abs(fid - expected["FID"]) < 1e-3
  assert abs(sfid - expected["sFID"]) < 1e-3
  assert stats["ref_pool"].mu.dtype == np.float32 and stats["ref_pool"].sigma.dtype == np.float64  # ADM's dtypes.
  diff = stats["sample_pool"].mu - stats["ref_pool"].mu
  assert diff.dot(diff) == np.float32(expected["FID_parts"]["diff_dot_diff"])


def test_inception_score_matches_adm(adm_run):
  arrays, expected = adm_run
  softmax = arrays["sample_softmax"]
  assert abs(adm.inception_score(softmax) - expected["IS"]) < 1e-3  # 800 samples: one split of 5000.
  assert abs(adm.inception_score(softmax, split_size=80) - expected["IS_split80"]) < 1e-3
  for i, split in enumerate(expected["IS_split80_per_split"]):
    assert abs(adm.inception_score(softmax[80 * i:80 * (i + 1)]) - split) < 1e-4


def test_is_probabilities_are_the_softmax_of_pool_times_weight_without_bias(adm_run):
  arrays, expected = adm_run
  weight = (np.random.default_rng(7).standard_normal((2048, 1008)) * 0.08).astype(np.float32)
  assert float(weight.astype(np.float64).sum()) == arrays["is_weight_sum"]
  probs = adm.classifier_probabilities(arrays["sample_pool"], weight)
  assert probs.dtype == np.float32
  np.testing.assert_allclose(probs, arrays["sample_softmax"], atol=1e-5, rtol=0)
  assert abs(adm.inception_score(probs) - expected["IS"]) < 1e-3


def test_precision_recall_robust_case_exact(adm_run):
  arrays, expected = adm_run
  case = expected["precision_recall_robust_case"]
  for block_size in (adm.PR_BLOCK_SIZE, 100):  # Blocking changes nothing.
    assert adm.precision_recall(arrays["pr_robust_ref"], arrays["pr_robust_sample"], block_size=block_size) == (
        case["precision"], case["recall"])


def test_precision_recall_main_case_is_exact_and_within_2_of_800_of_adm(adm_run):
  arrays, expected = adm_run
  ref, sample = arrays["ref_pool"], arrays["sample_pool"]
  precision, recall = adm.precision_recall(ref, sample)
  # Exact distances (float64 in the fixture) decide every point as we do.
  exact = expected["float64_distance_reference"]
  assert (precision, recall) == (exact["precision"], exact["recall"])
  # ADM's float16 distances put 2 of the 800 samples on the other side of a radius.
  assert abs(precision - expected["precision"]) * len(sample) == pytest.approx(2)
  assert recall == expected["recall"]


def test_radii_are_exact_and_within_float16_error_of_adm(adm_run):
  arrays, _ = adm_run
  ref = arrays["ref_pool"].astype(np.float64)
  gram = ref @ ref.T
  sq = np.diag(gram)
  exact = np.partition(sq[:, None] - 2 * gram + sq[None, :], 3, axis=1)[:, 3]
  radii = adm.manifold_radii(arrays["ref_pool"])
  np.testing.assert_allclose(radii, exact, rtol=1e-5)
  np.testing.assert_allclose(radii, arrays["radii_ref"][:, 0], rtol=2e-3)  # ADM: float16 distances.


# ----------------------------------------------------------------------------------------------------------------------
# Formulas.


def test_radius_is_the_kth_neighbour_counting_the_point_itself():
  points = np.array([[0.0], [1.0], [3.0], [6.0], [10.0]], np.float32)
  # Squared distances from 0: 0 (itself), 1, 9, 36, 100.
  np.testing.assert_allclose(adm.manifold_radii(points, k=3)[0], 36.0)
  np.testing.assert_allclose(adm.manifold_radii(points, k=1), [1, 1, 4, 9, 16])


def test_precision_recall_of_disjoint_and_identical_sets():
  rng = np.random.default_rng(0)
  a = rng.standard_normal((50, 8)).astype(np.float32)
  assert adm.precision_recall(a, a) == (1.0, 1.0)
  assert adm.precision_recall(a, a + 100) == (0.0, 0.0)


def test_fid_of_a_set_with_itself_is_zero():
  acts = np.random.default_rng(1).standard_normal((400, 32)).astype(np.float32)
  stats = adm.compute_statistics(acts)
  assert abs(adm.frechet_distance(*stats, *stats)) < 1e-9


def test_fid_between_gaussians_equals_the_closed_form():
  rng = np.random.default_rng(2)
  d = 24
  mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
  q, _ = np.linalg.qr(rng.standard_normal((d, d)))
  eig2 = rng.uniform(0.1, 3.0, d)
  sigma2 = (q * eig2) @ q.T
  c = 2.5
  sigma1 = c * np.eye(d)
  # tr sqrt(c I . S2) = sqrt(c) * sum sqrt(eig(S2)).
  expected = np.sum((mu1 - mu2) ** 2) + c * d + eig2.sum() - 2 * np.sqrt(c) * np.sqrt(eig2).sum()
  assert adm.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-10)
  # Diagonal covariances: sum (sqrt a - sqrt b)^2.
  a, b = rng.uniform(0.1, 2, d), rng.uniform(0.1, 2, d)
  assert adm.frechet_distance(mu1, np.diag(a), mu1, np.diag(b)) == pytest.approx(
      np.sum((np.sqrt(a) - np.sqrt(b)) ** 2), rel=1e-9)


def test_fid_refuses_statistics_of_different_dimensions():
  with pytest.raises(ValueError, match="different dimensions"):
    adm.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_inception_score_of_uniform_and_of_confident_even_predictions():
  assert adm.inception_score(np.full((100, 10), 0.1, np.float32)) == pytest.approx(1.0, abs=1e-6)
  confident = np.eye(10, dtype=np.float32)[np.arange(100) % 10]
  assert adm.inception_score(confident) == pytest.approx(10.0, rel=1e-6)
  # Two splits, each holding only 5 of the classes: 5 per split.
  assert adm.inception_score(np.eye(10, dtype=np.float32)[np.arange(100) // 50 * 5 + np.arange(100) % 5],
                                    split_size=50) == pytest.approx(5.0, rel=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# Files.


def test_image_batches_stream_plain_and_compressed_npz(tmp_path):
  images = np.random.default_rng(3).integers(0, 256, (10, 5, 6, 3), dtype=np.uint8)
  for save in (np.savez, np.savez_compressed):
    path = tmp_path / f"{save.__name__}.npz"
    save(path, arr_0=images, cfg_scale=np.float32(2.0))
    batches = list(adm.iter_image_batches(path, 4))
    assert [len(b) for b in batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate(batches), images)


def test_sampling_settings_keep_scalars_and_summarise_arrays(tmp_path):
  path = tmp_path / "s.npz"
  labels = np.arange(100) % 7
  np.savez(path, arr_0=np.zeros((1, 2, 2, 3), np.uint8), cfg_scale=np.float32(1.75), top_k=np.int64(0),
           seed=np.int64(7), labels=labels)
  settings = adm.read_sampling_settings(path)
  assert settings["cfg_scale"] == 1.75 and settings["top_k"] == 0 and settings["seed"] == 7
  assert settings["labels"]["shape"] == [100] and settings["labels"]["max"] == 6
  assert "arr_0" not in settings


def test_npz_that_is_not_images_is_refused(tmp_path):
  path = tmp_path / "f.npz"
  np.savez(path, arr_0=np.zeros((4, 8, 8, 3), np.float32))
  with pytest.raises(ValueError, match="must be uint8 images"):
    adm.image_array_shape(path)
  np.savez(path, images=np.zeros((4, 8, 8, 3), np.uint8))
  with pytest.raises(ValueError, match="has no array 'arr_0'"):
    adm.image_array_shape(path)


def test_reference_features_are_cached_by_content_and_weights(tmp_path):
  ref = tmp_path / "ref.npz"
  images = np.random.default_rng(4).integers(0, 256, (6, 4, 4, 3), dtype=np.uint8)
  np.savez(ref, arr_0=images)
  calls = []

  def fake_features(batch):  # Stands in for the Inception: 2 numbers per image.
    calls.append(len(batch))
    flat = batch.reshape(len(batch), -1).astype(np.float32)
    return {"pool3": flat[:, :2], "spatial": flat[:, 2:4]}

  kwargs = dict(ref_sha256=fileio.file_sha256(ref), preprocessing="pytorch_fid", batch_size=4, progress=False)
  acts, cache = adm.reference_activations(fake_features, ref, weights_sha256="a" * 64, **kwargs)
  np.testing.assert_array_equal(acts["pool3"], images.reshape(6, -1)[:, :2])  # Padding cut off.
  assert calls == [4, 4] and cache.is_file()
  again, _ = adm.reference_activations(fake_features, ref, weights_sha256="a" * 64, **kwargs)
  assert calls == [4, 4]  # From the cache.
  np.testing.assert_array_equal(again["spatial"], acts["spatial"])
  adm.reference_activations(fake_features, ref, weights_sha256="b" * 64, **kwargs)
  assert calls == [4, 4, 4, 4]  # Other weights: recomputed.
  cache.write_bytes(b"damaged")
  adm.reference_activations(fake_features, ref, weights_sha256="a" * 64, **kwargs)
  assert len(calls) == 6  # A damaged cache is recomputed.


# ----------------------------------------------------------------------------------------------------------------------
# The CLI, end to end.


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory, fixtures_dir):
  """Random-weight .pth, samples and reference made of the fixture's 64x64 images (whose features are known)."""
  root = tmp_path_factory.mktemp("eval")
  spec = json.loads((fixtures_dir / "fid" / "weights_spec.json").read_text())
  state_dict = fixture_rules.fid_state_dict(spec)
  weights = root / "inception.pth"
  torch_io.save_state_dict(state_dict, weights, container=None)
  with np.load(fixtures_dir / "fid" / "inception_io.npz") as data:
    io = {k: data[k] for k in ("images64", "pool3_64", "adm_spatial_64")}
  sample_idx, ref_idx = np.arange(8) % 4, np.array([0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 2, 1])
  samples, ref = root / "samples.npz", root / "ref.npz"
  np.savez(samples, arr_0=io["images64"][sample_idx], cfg_scale=np.float32(2.0), temperature=np.float32(1.0),
           top_k=np.int64(0), top_p=np.float32(1.0), seed=np.int64(0), labels=np.arange(8))
  np.savez(ref, arr_0=io["images64"][ref_idx])
  return dict(root=root, weights=weights, samples=samples, ref=ref, io=io, state_dict=state_dict,
              sample_idx=sample_idx, ref_idx=ref_idx)


def _run(argv, capsys):
  code = evaluate_cli.main(["evaluate", *(str(a) for a in argv)])
  return code, capsys.readouterr()


def test_cli_report(cli_files, capsys, monkeypatch):
  f = cli_files
  # frechet_distance itself is checked against ADM above (two 2048-d square roots, ~10 s each); here, record which
  # statistics the pipeline hands it and return a cheap stand-in value.
  calls = []

  def recording_frechet_distance(mu1, sigma1, mu2, sigma2):
    calls.append((mu1, sigma1, mu2, sigma2))
    return float(len(calls))

  monkeypatch.setattr(adm, "frechet_distance", recording_frechet_distance)
  out = f["root"] / "report.json"
  code, printed = _run(["--samples", f["samples"], "--ref", f["ref"], "--inception", f["weights"], "--out", out,
                        "--batch_size", 8, "--min_samples", 8, "--noprogress"], capsys)
  assert code == 0, printed.err
  report = json.loads(out.read_text())
  io = f["io"]
  pool_s, pool_r = io["pool3_64"][f["sample_idx"]], io["pool3_64"][f["ref_idx"]]
  spatial_s, spatial_r = io["adm_spatial_64"][f["sample_idx"]], io["adm_spatial_64"][f["ref_idx"]]
  metrics = report["metrics"]
  assert (metrics["fid"], metrics["sfid"]) == (1.0, 2.0)
  for (mu1, sigma1, mu2, sigma2), sample, ref in zip(calls, (pool_s, spatial_s), (pool_r, spatial_r)):
    for got, want in zip((mu1, sigma1, mu2, sigma2), (*adm.compute_statistics(sample),
                                                       *adm.compute_statistics(ref))):
      assert got.dtype == want.dtype
      np.testing.assert_allclose(got, want, atol=1e-5)
  expected_is = adm.inception_score(adm.classifier_probabilities(pool_s, f["state_dict"]["fc.weight"].T))
  assert metrics["inception_score"] == pytest.approx(expected_is, rel=1e-5)
  assert (metrics["precision"], metrics["recall"]) == adm.precision_recall(pool_r, pool_s)
  assert report["num_samples"] == 8 and report["num_reference_images"] == 12 and report["image_size"] == [64, 64]
  assert report["samples"]["sha256"] == fileio.file_sha256(f["samples"])
  assert report["reference"]["sha256"] == fileio.file_sha256(f["ref"])
  assert report["inception"]["sha256"] == fileio.file_sha256(f["weights"])
  assert report["inception"]["sha256_matches_released_name"] is False
  settings = report["sampling_settings"]
  assert settings["cfg_scale"] == 2.0 and settings["top_k"] == 0 and settings["top_p"] == 1.0
  assert settings["labels"] == list(range(8))
  # The cached reference features are the network's features of those images.
  with np.load(report["reference"]["activation_cache"]) as cache:
    np.testing.assert_allclose(cache["pool3"], pool_r, atol=1e-5)
    np.testing.assert_allclose(cache["spatial"], spatial_r, atol=1e-5)
  assert "sFID 2.0000" in printed.out and "IS" in printed.out


@pytest.mark.parametrize("case, message", [
    ("resolution", "reference images are 32x32 but the samples are 64x64"),
    ("too_few", "FID needs at least 2049"),
    ("missing_weights", "Inception weight file"),
    ("wrong_weights", "is not pytorch-fid's FID Inception"),
    ("missing_samples", "samples file"),
    ("stored_needs_tf1", "use preprocessing='tf1' with ref_stats='stored'"),
    ("stored_missing", "has no stored statistics (mu, sigma, mu_s, sigma_s missing)"),
])
def test_cli_errors_are_one_sentence_and_nonzero(cli_files, capsys, tmp_path, case, message):
  f = cli_files
  samples, ref, weights, extra = f["samples"], f["ref"], f["weights"], ["--min_samples", 8]
  if case == "resolution":
    ref = tmp_path / "ref32.npz"
    np.savez(ref, arr_0=np.zeros((12, 32, 32, 3), np.uint8))
  elif case == "too_few":
    extra = []
  elif case == "missing_weights":
    weights = tmp_path / "missing.pth"
  elif case == "wrong_weights":
    weights = tmp_path / "wrong.pth"
    torch_io.save_state_dict({"fc.weight": np.zeros((2, 2), np.float32)}, weights, container=None)
  elif case == "missing_samples":
    samples = tmp_path / "missing.npz"
  elif case == "stored_needs_tf1":
    extra += ["--ref_stats", "stored"]
  elif case == "stored_missing":
    extra += ["--ref_stats", "stored", "--preprocessing", "tf1"]
  code, printed = _run(["--samples", samples, "--ref", ref, "--inception", weights, "--out", tmp_path / "r.json",
                        "--noprogress", *extra], capsys)
  assert code != 0
  assert message in printed.err and "Traceback" not in printed.err
  assert len(printed.err.strip().splitlines()) == 1
  assert not (tmp_path / "r.json").exists()
