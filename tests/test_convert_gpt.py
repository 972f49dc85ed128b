"""The GPT importer/exporter against the reference's fixture checkpoint."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from npp_jax import config as config_lib
from npp_jax import convert
from npp_jax import npp
from npp_jax.model_files import param_mapping
from npp_jax.model_files import store
from npp_jax.model_files import torch_io

FIXTURE_MODEL = dict(dim=128, n_layer=2, n_head=4, vocab_size=512, num_classes=10, block_size=64,
                     dtype="float32")
OVERRIDES = [f"--config.model.{k}={v}" for k, v in FIXTURE_MODEL.items()]


def fixture_cfg(**extra):
  cfg = config_lib.model_config("B")
  cfg.update(dict(FIXTURE_MODEL, **extra))
  return cfg


@pytest.fixture(scope="module")
def gpt_pt(fixtures_dir):
  return fixtures_dir / "llamagen_tiny" / "gpt.pt"


@pytest.fixture(scope="module")
def gpt_io(fixtures_dir):
  return dict(np.load(fixtures_dir / "llamagen_tiny" / "gpt_io.npz"))


@pytest.mark.parametrize("scan_layers", [True, False])
def test_logits_and_losses_match_reference(gpt_pt, gpt_io, scan_layers):
  model = param_mapping.gpt_from_torch(gpt_pt, fixture_cfg(scan_layers=scan_layers))
  tokens, labels = jnp.asarray(gpt_io["tokens"]), jnp.asarray(gpt_io["labels"])
  for side, suffix in ((1, ""), (2, "_p4"), (4, "_p16"), (8, "_p64")):
    logits = model(tokens, labels, patch_side=side)
    np.testing.assert_allclose(logits, gpt_io["logits" + suffix], atol=1e-5, rtol=0)
    loss = npp.patch_loss(logits, tokens, side)
    np.testing.assert_allclose(loss, gpt_io["loss" + (suffix or "_p1")], atol=1e-5, rtol=0)


def test_eval_position_after_full_sequence(gpt_pt, gpt_io):
  """The decode path over class token + all 64 tokens: its last position is the reference's eval logits."""
  model = param_mapping.gpt_from_torch(gpt_pt, fixture_cfg())
  tokens, labels = jnp.asarray(gpt_io["tokens"]), jnp.asarray(gpt_io["labels"])
  x = jnp.concatenate([model.class_embedding(labels), model.token_embedding(tokens)], axis=1)
  logits, _ = model.decode(x, model.init_cache(3), 0)
  np.testing.assert_allclose(logits[:, :64], gpt_io["logits"], atol=1e-5, rtol=0)
  np.testing.assert_allclose(logits[:, 64], gpt_io["logits_eval_last"], atol=1e-5, rtol=0)


def test_export_round_trip_is_exact(gpt_pt, tmp_path):
  original = torch_io.load_state_dict(gpt_pt)
  exported = param_mapping.gpt_to_torch(param_mapping.gpt_from_torch(gpt_pt, fixture_cfg()))
  assert sorted(exported) == sorted(original)
  for key, value in original.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)
  torch_io.save_state_dict(exported, tmp_path / "again.pt")
  again = param_mapping.gpt_to_torch(param_mapping.gpt_from_torch(tmp_path / "again.pt", fixture_cfg()))
  for key, value in original.items():
    np.testing.assert_array_equal(again[key], value, err_msg=key)


def _broken(gpt_pt, tmp_path, edit):
  state = torch_io.load_state_dict(gpt_pt)
  edit(state)
  path = tmp_path / "broken.pt"
  torch_io.save_state_dict(state, path)
  with pytest.raises(ValueError) as err:
    param_mapping.gpt_from_torch(path, fixture_cfg())
  return str(err.value)


def test_missing_extra_and_misshaped_keys_are_named(gpt_pt, tmp_path):
  assert "missing keys: layers.1.feed_forward.w3.weight" in _broken(
      gpt_pt, tmp_path, lambda s: s.pop("layers.1.feed_forward.w3.weight"))
  assert "unexpected keys: layers.2.attention_norm.weight" in _broken(
      gpt_pt, tmp_path, lambda s: s.__setitem__("layers.2.attention_norm.weight", np.ones(128, np.float32)))
  message = _broken(gpt_pt, tmp_path,
                    lambda s: s.__setitem__("cls_embedding.embedding_table.weight", np.zeros((10, 128), np.float32)))
  assert "mis-shaped keys: cls_embedding.embedding_table.weight (checkpoint (10, 128), model (11, 128))" in message


def test_wrong_config_is_refused(gpt_pt):
  with pytest.raises(ValueError, match="tok_embeddings.weight"):
    param_mapping.gpt_from_torch(gpt_pt, fixture_cfg(vocab_size=1024))


def test_ema_container_is_chosen_by_key(gpt_pt, tmp_path):
  state = torch_io.load_state_dict(gpt_pt)
  ema = {k: v + 1.0 for k, v in state.items()}
  torch_io.save({"model": state, "ema": ema, "steps": 7}, tmp_path / "both.pt")
  model = param_mapping.gpt_from_torch(tmp_path / "both.pt", fixture_cfg(), key="ema")
  np.testing.assert_array_equal(model.norm[...], ema["norm.weight"])
  model = param_mapping.gpt_from_torch(tmp_path / "both.pt", fixture_cfg())
  np.testing.assert_array_equal(model.norm[...], state["norm.weight"])


def test_cli_writes_a_model_directory_that_loads_and_exports(gpt_pt, gpt_io, tmp_path):
  out = tmp_path / "converted"
  assert convert.main(["convert", "gpt", "--src", str(gpt_pt), "--config", "configs/tiny.py", "--out", str(out),
                       *OVERRIDES]) == 0
  model, config = store.load_model(str(out))
  assert config.model.vocab_size == 512
  logits = model(jnp.asarray(gpt_io["tokens"]), jnp.asarray(gpt_io["labels"]))
  np.testing.assert_allclose(logits, gpt_io["logits"], atol=1e-5, rtol=0)
  exported = tmp_path / "exported.pt"
  assert convert.main(["convert", "export", "--checkpoint", str(out), "--out", str(exported)]) == 0
  original = torch_io.load_state_dict(gpt_pt)
  for key, value in torch_io.load_state_dict(exported).items():
    np.testing.assert_array_equal(value, original[key], err_msg=key)
  # A second conversion into the same directory must not overwrite it.
  assert convert.main(["convert", "gpt", "--src", str(gpt_pt), "--config", "configs/tiny.py", "--out", str(out),
                       *OVERRIDES]) == 1


def test_cli_errors_are_one_line(gpt_pt, tmp_path, capsys):
  assert convert.main(["convert", "gpt", "--src", str(tmp_path / "nope.pt"), "--config", "configs/tiny.py",
                       "--out", str(tmp_path / "o"), *OVERRIDES]) == 1
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "nope.pt" in err and "\n" not in err
  assert convert.main(["convert", "gpt", "--src", str(gpt_pt), "--config", "configs/tiny.py",
                       "--out", str(tmp_path / "o")]) == 1  # the tiny model's shapes do not fit
  assert "does not match the model" in capsys.readouterr().err


def test_fine_tune_starts_from_converted_parameters(gpt_pt, tmp_path):
  from npp_jax.trainers import gpt_trainer  # pylint: disable=g-import-not-at-top
  out = tmp_path / "converted"
  assert convert.main(["convert", "gpt", "--src", str(gpt_pt), "--config", "configs/tiny.py", "--out", str(out),
                       *OVERRIDES]) == 0
  config = config_lib.base_config()
  config.model = fixture_cfg()
  config.data.kind = "synthetic"
  config.data.num_images = 64
  config.train.update(global_batch_size=8, total_steps=1, log_every=1, checkpoint_every=1)
  config.npp.stages = ((1, 1.0),)
  config.optim.update(lr=0.0, schedule="constant")  # a zero rate keeps the parameters as loaded
  config.init_from = str(out)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
  state = gpt_trainer.run(config, str(tmp_path / "run"), mesh=mesh)
  reference = torch_io.load_state_dict(gpt_pt)
  np.testing.assert_allclose(state["params"]["tok_embeddings"], reference["tok_embeddings.weight"], atol=1e-7)
  np.testing.assert_allclose(state["params"]["output"], reference["output.weight"].T, atol=1e-7)
