"""The FID Inception against pytorch-fid's outputs (fixtures/fid), its resize, and its strict weight converter."""

import json

import jax
import numpy as np
import pytest

from npp_jax import sharding as npp_sharding
from npp_jax.model_files import param_mapping
from npp_jax.model_files import torch_io
from npp_jax.models import inception
from fixture_rules import fid_state_dict  # pylint: disable=g-bad-import-order


@pytest.fixture(scope="module")
def spec(fixtures_dir):
  return json.loads((fixtures_dir / "fid" / "weights_spec.json").read_text())


@pytest.fixture(scope="module")
def state_dict(spec):
  return fid_state_dict(spec)


@pytest.fixture(scope="module")
def io(fixtures_dir):
  with np.load(fixtures_dir / "fid" / "inception_io.npz") as data:
    return dict(data)


@pytest.fixture(scope="module")
def model(state_dict):
  return param_mapping.inception_from_torch(state_dict)


@pytest.fixture(scope="module")
def outputs(model, io):
  """Every output for both fixture batches, through the sharded feature function (run once per session).

  Batch A is fed twice (8 images: one per device, no padding); batch B's 2 images are padded to 8.
  """
  fn = inception.make_feature_fn(model, outputs=inception.OUTPUTS)
  out64 = fn(np.concatenate([io["images64"], io["images64"]]))
  shardings = {k: v.sharding for k, v in out64.items()}
  out299 = fn(io["images299"])
  as_np = lambda out: {k: np.asarray(v) for k, v in out.items()}
  return {"64": as_np(out64), "299": as_np(out299), "shardings": shardings}


def test_weight_rule_reproduces_the_fixture_checksums(spec, state_dict):
  for entry in spec["keys"]:
    if "sum_float64" in entry:
      assert float(state_dict[entry["key"]].astype(np.float64).sum()) == entry["sum_float64"], entry["key"]
  assert len(state_dict) == spec["num_keys"] == 566


@pytest.mark.parametrize("half_pixel, expected", [
    # torch, 2 -> 4: sources max(0, (i + .5) / 2 - .5) = 0, .25, .75, 1.25 (clamped to the last pixel).
    (True, [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]]),
    # TF1, 2 -> 4: sources i / 2 = 0, .5, 1, 1.5.
    (False, [[1, 0], [0.5, 0.5], [0, 1], [0, 1]]),
])
def test_resize_matrix_by_hand(half_pixel, expected):
  np.testing.assert_allclose(inception.bilinear_resize_matrix(2, 4, half_pixel), expected, atol=1e-7)


@pytest.mark.parametrize("in_size, out_size", [(64, 299), (256, 299), (512, 299), (7, 3)])
@pytest.mark.parametrize("half_pixel", [True, False])
def test_resize_matrix_against_direct_interpolation(in_size, out_size, half_pixel):
  signal = np.random.default_rng(in_size).standard_normal(in_size)
  scale = in_size / out_size
  expected = []
  for dst in range(out_size):
    src = max((dst + 0.5) * scale - 0.5, 0.0) if half_pixel else dst * scale
    lo = min(int(np.floor(src)), in_size - 1)
    hi = min(lo + 1, in_size - 1)
    expected.append(signal[lo] * (1 - (src - lo)) + signal[hi] * (src - lo))
  got = inception.bilinear_resize_matrix(in_size, out_size, half_pixel).astype(np.float64) @ signal
  # The matrix takes its coordinates in float32, as torch and TF do (closer to the fixture than float64 ones), so a
  # coordinate near 512 is off by up to ~3e-5; a wrong formula (align_corners, no half-pixel) is off by ~0.1.
  np.testing.assert_allclose(got, expected, atol=5e-4)


def test_preprocessing_matches_pytorch_fid_resize(io):
  x = np.asarray(jax.jit(inception.preprocess)(io["images64"]))
  np.testing.assert_allclose((x + 1) / 2, io["resized_input64"], atol=1e-6, rtol=0)
  # 299 x 299 input: no resize at all, as F.interpolate (XLA may turn /255 into *(1/255): 1 ulp).
  x299 = np.asarray(jax.jit(inception.preprocess)(io["images299"]))
  np.testing.assert_allclose(x299, 2 * (io["images299"].astype(np.float32) / 255) - 1, atol=2.5e-7, rtol=0)


def test_tf1_preprocessing_normalises_like_the_tf_graph(io):
  x = np.asarray(jax.jit(lambda im: inception.preprocess(im, "tf1"))(io["images299"]))
  np.testing.assert_allclose(x, (io["images299"].astype(np.float32) - 128) / 128, atol=1e-7)


@pytest.mark.parametrize("batch", ["64", "299"])
@pytest.mark.parametrize("ours, theirs", [
    ("pool3", "pool3"), ("logits", "logits"), ("mixed_6e", "mixed_6e"),
    ("mixed_6d_branch1x1", "mixed_6d_branch1x1"), ("spatial", "adm_spatial")])
def test_outputs_match_pytorch_fid(outputs, io, batch, ours, theirs):
  expected = io[f"{theirs}_{batch}"]
  got = outputs[batch][ours]
  if batch == "64":  # Batch A went in twice.
    got = got.reshape(2, *expected.shape)
    np.testing.assert_array_equal(got[0], got[1])
    got = got[0]
  assert got.shape == expected.shape
  # 1e-5 of the largest value: rounding is ~1e-6 here, the smallest porting mistake in the README moves 2.5e-3.
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * max(1.0, np.abs(expected).max()))


def test_feature_fn_splits_the_batch_over_all_devices(outputs):
  for sharding in outputs["shardings"].values():
    assert len(sharding.device_set) == jax.device_count() == 8
    assert sharding.spec[0] == npp_sharding.ONE_AXIS


def test_converter_reads_the_pth_file(tmp_path, state_dict, model):
  path = tmp_path / "pt_inception-2015-12-05-test.pth"
  torch_io.save_state_dict(state_dict, path, container=None)
  loaded = param_mapping.inception_from_torch(path)
  np.testing.assert_array_equal(np.asarray(loaded.Mixed_7c.branch_pool.kernel[...]),
                                state_dict["Mixed_7c.branch_pool.conv.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(np.asarray(loaded.fc_kernel[...]), state_dict["fc.weight"].T)
  np.testing.assert_array_equal(np.asarray(loaded.Mixed_6d.branch1x1.var[...]),
                                state_dict["Mixed_6d.branch1x1.bn.running_var"])


def test_converter_names_every_bad_key(state_dict):
  bad = dict(state_dict)
  del bad["Mixed_5b.branch1x1.bn.running_mean"]
  bad["Mixed_5b.extra.conv.weight"] = np.zeros((1,), np.float32)
  bad["fc.weight"] = np.zeros((1000, 2048), np.float32)
  with pytest.raises(ValueError) as err:
    param_mapping.inception_from_torch(bad)
  message = str(err.value)
  for key in ("Mixed_5b.branch1x1.bn.running_mean", "Mixed_5b.extra.conv.weight", "fc.weight (1000, 2048)"):
    assert key in message
  assert "missing" in message and "unexpected" in message and "wrongly shaped" in message


def test_converter_refuses_a_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    param_mapping.inception_from_torch(tmp_path / "nope.pth")


def test_unknown_preprocessing_is_refused():
  with pytest.raises(ValueError, match="unknown Inception preprocessing"):
    inception.InceptionV3(preprocessing="bicubic")
