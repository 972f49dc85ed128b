"""The sampling CLI (`python -m npp_jax.sample`), its run() path, its labels, and the image helpers it writes with."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from npp_jax import assets
from npp_jax import config as config_lib
from npp_jax import errors
from npp_jax import images as image_io
from npp_jax import sample as sample_cli
from npp_jax.model_files import store
from npp_jax.models import vq as vq_lib
from npp_jax.models.gpt import GPT
from npp_jax.sampling import decoding
from npp_jax.sampling import generation

VOCAB, CLASSES, GRID = 32, 3, 4


@pytest.fixture(scope="module")
def tiny_gpt() -> GPT:
  cfg = config_lib.model_config("B")
  cfg.update(dim=32, n_layer=1, n_head=2, vocab_size=VOCAB, num_classes=CLASSES, block_size=GRID * GRID,
             multiple_of=32, dtype="float32")
  model = GPT(cfg, rngs=nnx.Rngs(0))
  # The head is zero-initialised; random weights make the samples depend on the labels and the context.
  model.output[...] = np.random.default_rng(0).normal(size=model.output.shape).astype(np.float32)
  return model


def fake_decode(codes: jax.Array) -> jax.Array:
  """Codes (B, 16) -> (B, 8, 8, 3) images, partly outside [-1, 1] so that clipping matters."""
  x = codes.reshape(-1, GRID, GRID).astype(jnp.float32) / (VOCAB - 1) * 2.4 - 1.2
  x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  return jnp.stack([x, x * 0.5, -x], axis=-1)


# -- run() ------------------------------------------------------------------------------------------------------


def test_run_writes_pngs_grid_and_samples_npz(tiny_gpt, tmp_path):
  labels = [0, 2, 1, 1, 0, 2]
  settings = sample_cli.RunSettings(
      sampling=decoding.SamplingSettings(cfg_scale=2.0, temperature=0.9, top_k=20, top_p=0.9), seed=7,
      batch_size=4, dtype="float32", checkpoint="/ckpt/dir", vq="/vq.pt", label_mode="given")
  npz_path = sample_cli.run(tiny_gpt, jax.jit(fake_decode), labels, settings, tmp_path, progress=False)

  # Independent recomputation: one batch of 6 on every device (the run used batches of 4, the last one padded).
  tokens = decoding.Sampler(tiny_gpt, dtype="float32")(labels, generation.sample_key(7), settings.sampling)
  expected = np.clip(127.5 * np.asarray(fake_decode(tokens)) + 128, 0, 255).astype(np.uint8)
  assert len(np.unique(expected.reshape(6, -1), axis=0)) == 6

  with np.load(npz_path) as npz:
    np.testing.assert_array_equal(npz["arr_0"], expected)
    np.testing.assert_array_equal(npz["labels"], labels)
    stored = {k: npz[k].item() for k in npz.files if k not in ("arr_0", "labels")}
  assert stored == dict(cfg_scale=2.0, cfg_interval=-1, temperature=0.9, top_k=20, top_p=0.9, greedy=False,
                        speculative_window=0, draft_init="previous", seed=7, batch_size=4, dtype="float32",
                        checkpoint="/ckpt/dir", vq="/vq.pt", label_mode="given", num_images=6)
  pngs = sorted((tmp_path / "images").iterdir())
  assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(6)]
  for i, p in enumerate(pngs):
    np.testing.assert_array_equal(image_io.load_png(p), expected[i])
  grid = image_io.load_png(tmp_path / "grid.png")  # 6 images: 2 rows of 3, 2 px apart
  assert grid.shape == (2 * 8 + 2, 3 * 8 + 4, 3)
  np.testing.assert_array_equal(grid[10:18, 10:18], expected[4])
  assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]


def test_a_second_run_replaces_the_first_whole(tiny_gpt, tmp_path):
  """Fewer images into the same --out: the first run's images 2..4 are gone, not mixed with the new ones; a file of
  the user's beside them stays."""
  out = tmp_path / "out"
  settings = sample_cli.RunSettings(sampling=decoding.SamplingSettings(cfg_scale=1.0), batch_size=4, dtype="float32")
  sample_cli.run(tiny_gpt, jax.jit(fake_decode), [0, 1, 2, 0, 1], settings, out, progress=False)
  (out / "notes.txt").write_text("mine")
  npz = sample_cli.run(tiny_gpt, jax.jit(fake_decode), [2, 2], settings, out, progress=False)
  assert sorted(p.name for p in (out / "images").iterdir()) == ["000000.png", "000001.png"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no partial directory left beside it
  assert (out / "notes.txt").read_text() == "mine"
  with np.load(npz) as data:
    np.testing.assert_array_equal(data["labels"], [2, 2])
    for i in range(2):
      np.testing.assert_array_equal(image_io.load_png(out / "images" / f"{i:06d}.png"), data["arr_0"][i])


@pytest.mark.parametrize("labels, sampling_kwargs, message", [
    ([0, 3], {}, r"not a class id in \[0, 3\)"),
    ([0], dict(top_k=VOCAB + 1), "vocabulary size 32"),
])
def test_run_refuses_invalid_requests(tiny_gpt, tmp_path, labels, sampling_kwargs, message):
  settings = sample_cli.RunSettings(sampling=decoding.SamplingSettings(cfg_scale=1.5, **sampling_kwargs))
  with pytest.raises(ValueError, match=message):
    sample_cli.run(tiny_gpt, fake_decode, labels, settings, tmp_path, progress=False)
  assert not (tmp_path / "samples.npz").exists()


# -- labels -----------------------------------------------------------------------------------------------------


def test_balanced_labels_are_in_class_order():
  np.testing.assert_array_equal(sample_cli.make_labels(7, 3, "balanced"), [0, 0, 0, 1, 1, 2, 2])
  np.testing.assert_array_equal(np.bincount(sample_cli.make_labels(50_000, 1000, "balanced")), np.full(1000, 50))


def test_uniform_labels_come_from_the_seed():
  labels = sample_cli.make_labels(2000, 10, "uniform", seed=3)
  assert labels.min() == 0 and labels.max() == 9 and np.bincount(labels).min() > 150
  np.testing.assert_array_equal(sample_cli.make_labels(50, 10, "uniform", seed=3), labels[:50])  # prefix-stable
  assert not np.array_equal(sample_cli.make_labels(50, 10, "uniform", seed=4), labels[:50])


# -- command line -----------------------------------------------------------------------------------------------


@pytest.fixture
def paths(tmp_path):
  (tmp_path / "ckpt").mkdir()
  (tmp_path / "vq.pt").write_bytes(b"")
  return ["--checkpoint", str(tmp_path / "ckpt"), "--vq", str(tmp_path / "vq.pt"), "--out", str(tmp_path / "out")]


@pytest.mark.parametrize("flags, message", [
    (["--cfg_scale", "2", "--temperature", "0"], "use greedy decoding"),
    (["--cfg_scale", "2", "--temperature", "-1"], "temperature must be"),
    (["--cfg_scale", "0.5"], "treats any value <= 1 as no guidance"),
    (["--cfg_scale", "-1"], "cfg_scale must be"),
    (["--cfg_scale", "2", "--top_p", "0"], "top_p must be in"),
    (["--cfg_scale", "2", "--top_k", "-5"], "top_k must be"),
    (["--cfg_scale", "2", "--batch_size", "0"], "--batch_size=0: 0 is not a positive integer"),
    (["--cfg_scale", "2", "--speculative_window", "-2"], "speculative_window must be"),
])
def test_cli_refuses_invalid_settings(paths, capsys, flags, message):
  assert sample_cli.main(["sample", *paths, "--labels", "1,2", *flags]) == 1
  err = capsys.readouterr().err
  assert message in err and err.count("\n") == 1


def test_cli_reports_a_missing_checkpoint(tmp_path, capsys):
  argv = ["--checkpoint", str(tmp_path / "nope"), "--vq", "vq.pt", "--out", str(tmp_path), "--num_images", "4",
          "--cfg_scale", "2"]
  assert sample_cli.main(["sample", *argv]) == 1
  assert f"checkpoint {tmp_path / 'nope'} does not exist" in capsys.readouterr().err


def test_tokenizer_must_fit_the_gpt(tiny_gpt):
  vq_cfg = vq_lib.default_config()
  vq_cfg.update(codebook_size=VOCAB, image_size=64)  # 16x downsampling: a 4x4 grid
  generation.check_tokenizer_fits(tiny_gpt.cfg, vq_cfg, vq_lib.grid_size(vq_cfg))
  with pytest.raises(ValueError, match=r"decodes a 8x8 grid"):
    vq_cfg.image_size = 128
    generation.check_tokenizer_fits(tiny_gpt.cfg, vq_cfg, vq_lib.grid_size(vq_cfg))
  with pytest.raises(ValueError, match=r"vocabulary \(32 tokens\) does not match the tokenizer's codebook \(64"):
    vq_cfg.update(codebook_size=64, image_size=64)
    generation.check_tokenizer_fits(tiny_gpt.cfg, vq_cfg, vq_lib.grid_size(vq_cfg))


def test_cli_exits_with_one_line_and_no_traceback(paths):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-m", "npp_jax.sample", *paths, "--num_images", "4", "--cfg_scale", "2",
                         "--top_p", "1.5"], capture_output=True, text=True, env=env, timeout=120)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == ["error: top_p must be in (0, 1] (1 keeps every token), got 1.5"]


# -- image helpers ----------------------------------------------------------------------------------------------


def test_to_uint8_uses_the_reference_formula():
  x = np.array([-2.0, -1.0, -0.999, 0.0, 0.001, 0.5, 0.99, 1.0, 3.0], np.float32)
  # 127.5 x + 128, clipped, truncated: -1 -> 0.5 -> 0; 0.5 -> 191.75 -> 191; 0.99 -> 254.225 -> 254.
  np.testing.assert_array_equal(image_io.to_uint8(x), [0, 0, 0, 128, 128, 191, 254, 255, 255])


def test_make_grid_fills_rows_and_leaves_empty_cells_black():
  imgs = np.arange(1, 6, dtype=np.uint8)[:, None, None, None] * np.ones((5, 2, 3, 3), np.uint8)
  grid = image_io.make_grid(imgs, rows=2, pad=1)  # 3 columns
  assert grid.shape == (5, 11, 3)
  np.testing.assert_array_equal(grid[0:2, 4:7], 2)
  np.testing.assert_array_equal(grid[3:5, 4:7], 5)
  np.testing.assert_array_equal(grid[3:5, 8:11], 0)
  np.testing.assert_array_equal(grid[2], 0)


def test_save_samples_npz_streams_chunks_atomically(tmp_path):
  imgs = np.random.default_rng(0).integers(0, 256, size=(5, 4, 4, 3), dtype=np.uint8)
  image_io.save_samples_npz(tmp_path / "a.npz", [imgs[:2], imgs[2:]], [1, 2, 3, 4, 5], seed=3, name="x", none=None)
  with np.load(tmp_path / "a.npz") as npz:
    np.testing.assert_array_equal(npz["arr_0"], imgs)
    assert (npz["labels"].tolist(), npz["seed"].item(), npz["name"].item(), npz["none"].item()) == (
        [1, 2, 3, 4, 5], 3, "x", "")
    assert npz["seed"].shape == ()
  with pytest.raises(ValueError, match="5 sample images for 6 labels"):
    image_io.save_samples_npz(tmp_path / "b.npz", imgs, np.arange(6))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz"]


def test_cli_reads_a_tokenizer_directory_and_the_checkpoint_sampling_defaults(tmp_path):
  """--vq DIR brings the saved tokenizer's own config (512 codes, 8x8 grid; not the default 16384); guidance,
  temperature, top-k and top-p come from the checkpoint's config.sample unless a flag is given."""
  config = config_lib.base_config()
  config.model.update(dim=32, n_layer=1, n_head=2, vocab_size=512, num_classes=10, block_size=64, multiple_of=32,
                      dtype="float32")
  config.sample.update(cfg_scale=1.7, temperature=0.8, top_k=5, top_p=0.9)
  store.save_gpt(GPT(config.model, rngs=nnx.Rngs(0)), config, tmp_path / "model")
  common = ["sample", "--checkpoint", str(tmp_path / "model"), "--vq", str(assets.FASHION_TOKENIZER),
            "--labels", "3,4", "--batch_size", "2", "--dtype", "float32", "--noprogress"]

  def recorded(*flags):
    assert sample_cli.main(common + ["--out", str(tmp_path / "out")] + list(flags)) == 0
    with np.load(tmp_path / "out" / "samples.npz") as npz:
      assert npz["arr_0"].shape == (2, 32, 32, 3)
      return {k: npz[k].item() for k in ("cfg_scale", "temperature", "top_k", "top_p")}

  assert recorded() == dict(cfg_scale=1.7, temperature=0.8, top_k=5, top_p=0.9)
  assert recorded("--cfg_scale", "3", "--top_k", "0") == dict(cfg_scale=3.0, temperature=0.8, top_k=0, top_p=0.9)


def test_sampling_settings_from_a_config_section_and_overrides():
  section = {"cfg_scale": 3.0, "temperature": 0.5, "top_k": 0, "top_p": 1.0, "unrelated": 1}
  settings = decoding.SamplingSettings.from_config(section, top_k=7, greedy=None, speculative_window=2)
  assert (settings.cfg_scale, settings.temperature, settings.top_k, settings.greedy) == (3.0, 0.5, 7, False)
  assert settings.speculative_window == 2
  assert decoding.SamplingSettings.from_config(None) == decoding.SamplingSettings()  # no section: the defaults
  with pytest.raises(errors.InvalidInput, match="top_p must be in"):
    decoding.SamplingSettings.from_config(section, top_p=0.0)

