"""VQ import/export: strict key and shape checks, exact export, save_vq/load_vq, the `vq` CLI subcommand."""

import json
import pathlib

import numpy as np
import pytest

from npp_jax import convert
from npp_jax.model_files import param_mapping
from npp_jax.model_files import store
from npp_jax.model_files import torch_io
from npp_jax.models import vq
from test_vq import tiny_config

KERNEL = "decoder.conv_out.weight"
VQ16_CONFIG = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "vq_16.py")


@pytest.fixture(scope="module")
def vq_pt(fixtures_dir):
  return fixtures_dir / "llamagen_tiny" / "vq.pt"


@pytest.fixture(scope="module")
def original(vq_pt):
  return torch_io.load_state_dict(vq_pt)


@pytest.fixture(scope="module")
def model(vq_pt):
  return param_mapping.vq_from_torch(vq_pt, tiny_config())


@pytest.fixture(scope="module")
def ref(fixtures_dir):
  return dict(np.load(fixtures_dir / "llamagen_tiny" / "vq_io.npz"))


def _import_error(state_dict) -> str:
  model = vq.abstract_model(tiny_config())
  with pytest.raises(ValueError) as info:
    param_mapping.import_params(model, state_dict, param_mapping.vq_rules(model), source="ckpt.pt")
  return str(info.value)


def test_missing_key_is_named(original):
  sd = dict(original)
  del sd["encoder.mid.1.q.bias"]
  message = _import_error(sd)
  assert "missing keys: encoder.mid.1.q.bias" in message and "unexpected" not in message


def test_unexpected_key_is_named(original):
  message = _import_error(dict(original, **{"encoder.extra.weight": np.zeros(3, np.float32)}))
  assert "unexpected keys: encoder.extra.weight" in message and "missing" not in message


def test_misshaped_key_is_named_with_both_shapes(original):
  message = _import_error(dict(original, **{KERNEL: np.zeros((3, 32, 1, 1), np.float32)}))
  assert f"{KERNEL} (checkpoint (3, 32, 1, 1), model (3, 32, 3, 3))" in message


def test_all_problems_in_one_error(original):
  sd = dict(original, **{"extra": np.zeros(1, np.float32), KERNEL: np.zeros(2, np.float32)})
  del sd["quant_conv.bias"]
  message = _import_error(sd)
  for part in ("missing keys: quant_conv.bias", "unexpected keys: extra", f"mis-shaped keys: {KERNEL}"):
    assert part in message


def test_wrong_config_is_refused(vq_pt):
  cfg = tiny_config()
  cfg.codebook_size = 128
  with pytest.raises(ValueError, match=r"quantize\.embedding\.weight \(checkpoint \(64, 8\), model \(128, 8\)\)"):
    param_mapping.vq_from_torch(vq_pt, cfg)


def test_codebook_used_is_optional(original, model):
  sd = {k: v for k, v in original.items() if k != "quantize.codebook_used"}
  again = vq.abstract_model(tiny_config())
  param_mapping.import_params(again, sd, param_mapping.vq_rules(again))
  assert vq.params_checksum(again) == vq.params_checksum(model)


def test_export_round_trip_is_exact(original, model):
  exported = param_mapping.vq_to_torch(model)
  assert set(exported) == set(original)
  for key, value in original.items():
    if key == "quantize.codebook_used":
      continue
    assert exported[key].dtype == value.dtype and exported[key].shape == value.shape, key
    assert exported[key].tobytes() == value.tobytes(), key
  np.testing.assert_array_equal(exported["quantize.codebook_used"], np.zeros(65536, np.float32))


@pytest.mark.parametrize("name,key", [("vq.pt", None), ("vq_ema.pt", "ema"), ("vq.safetensors", None)])
def test_exported_files_load_back(tmp_path, model, name, key):
  path = tmp_path / name
  sd = param_mapping.vq_to_torch(model)
  if key:
    torch_io.save({"model": {k: v * 0 for k, v in sd.items()}, key: sd}, path)
  else:
    torch_io.save_state_dict(sd, path)
  cfg = tiny_config()
  loaded = param_mapping.vq_from_torch(path, cfg, key=key)
  assert vq.params_checksum(loaded) == vq.params_checksum(model)


def test_save_and_load_directory(tmp_path, model, ref):
  directory = tmp_path / "tok"
  checksum = store.save_vq(model, tiny_config(), directory)
  assert checksum == vq.params_checksum(model)
  saved = json.loads((directory / "config.json").read_text())
  assert saved["checksum"] == checksum and saved["vq"]["ch"] == 32
  cfg = tiny_config()
  cfg.checkpoint = str(directory)
  loaded = store.load_vq(cfg)
  assert vq.params_checksum(loaded) == checksum
  np.testing.assert_array_equal(loaded.encode(ref["images"]), ref["codes"])
  saved_cfg, saved_checksum = store.read_saved_vq(directory)
  assert saved_checksum == checksum and saved_cfg.encoder_ch_mult == (1, 2)
  assert saved_cfg.checkpoint == str(directory)
  with pytest.raises(FileExistsError):
    store.save_vq(model, tiny_config(), directory)
  cfg.z_channels = 64
  with pytest.raises(ValueError, match=r"z_channels \(saved 32, config 64\)"):
    store.load_vq(cfg)


def test_load_vq_sources_and_errors(tmp_path, vq_pt, model):
  cfg = tiny_config()
  cfg.checkpoint = str(vq_pt)
  assert vq.params_checksum(store.load_vq(cfg)) == vq.params_checksum(model)
  cfg.checkpoint = ""
  with pytest.raises(ValueError, match="empty"):
    store.load_vq(cfg)
  cfg.checkpoint = str(tmp_path / "absent.pt")
  with pytest.raises(FileNotFoundError, match="absent.pt"):
    store.load_vq(cfg)
  cfg.checkpoint = str(tmp_path)  # a directory, but not one save_vq wrote
  with pytest.raises(FileNotFoundError, match="save_vq"):
    store.load_vq(cfg)


def test_main_vq(tmp_path, vq_pt, ref, capsys):
  out = tmp_path / "converted"
  argv = ["convert", "--src", str(vq_pt), "--out", str(out), "--config", VQ16_CONFIG,
          "--config.vq.ch=32", "--config.vq.encoder_ch_mult=(1,2)", "--config.vq.decoder_ch_mult=(1,2)",
          "--config.vq.z_channels=32", "--config.vq.codebook_size=64", "--config.vq.image_size=32"]
  assert convert.main([argv[0], "vq", *argv[1:]]) == 0
  saved_cfg, _ = store.read_saved_vq(out)
  np.testing.assert_array_equal(store.load_vq(saved_cfg).encode(ref["images"]), ref["codes"])
  capsys.readouterr()
  # Without the overrides the VQ-16 config does not fit the tiny checkpoint: one line, non-zero status.
  assert convert.main(["convert", "vq", "--src", str(vq_pt), "--out", str(tmp_path / "x"),
                          "--config", VQ16_CONFIG]) == 1
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "mis-shaped keys" in err and err.count("\n") == 1
  assert not (tmp_path / "x").exists()
  assert convert.main(["convert", "vq", "--src", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "y"),
                          "--config", VQ16_CONFIG]) == 1
  assert "nope.pt" in capsys.readouterr().err
