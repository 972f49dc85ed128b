"""The VQ tokenizer trainer (npp_jax.train_tokenizer) and the Fashion-MNIST tokenizer shipped with the package."""

import gzip
import importlib.util
import json
import pathlib
import shutil
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from npp_jax import assets
from npp_jax import train_tokenizer
from npp_jax.data import sources
from npp_jax.model_files import store
from npp_jax.models import vq
from npp_jax.trainers import tokenizer_trainer as tt
import system_packages

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "vq_fashion.py")
# The shipped tokenizer (npp_jax/assets/vq_fashion/README.md): its checksum, and a PSNR floor a little under the
# 25.8 dB it measured on the whole test split.
SHIPPED_CHECKSUM = "86c906cfe1760a74cc106ca48fde60fcefef44e0e50dddfed2d7bafe9150d4f2"
SHIPPED_MIN_PSNR = 24.5


def load_config():
  spec = importlib.util.spec_from_file_location("vq_fashion_config", CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def real_fashion_mnist() -> pathlib.Path:
  """The installed dataset (a missing copy fails, with the line that installs it)."""
  path = pathlib.Path(sources.FASHION_MNIST_DIR)
  system_packages.require("dataset-fashion-mnist", path.is_dir())
  return path


def write_idx(path: pathlib.Path, array: np.ndarray, magic: int) -> None:
  header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
  path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


@pytest.fixture(scope="module")
def tiny_fashion(tmp_path_factory) -> pathlib.Path:
  """A Fashion-MNIST look-alike of 6x6 bright rectangles on black: 80 training and 16 test images."""
  directory = tmp_path_factory.mktemp("tiny_fashion")
  rng = np.random.default_rng(0)
  for prefix, n in (("train", 80), ("t10k", 16)):
    images = np.zeros((n, 6, 6), np.uint8)
    for img in images:
      top, left = rng.integers(0, 3, 2)
      img[top:top + rng.integers(2, 4), left:left + rng.integers(2, 4)] = rng.integers(150, 256)
    write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", images, 0x803)
    write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n), 0x801)
  return directory


def tiny_overrides(data_dir: pathlib.Path) -> list[str]:
  """8x8 inputs -> 4x4 codes from 16 entries; 12 steps of 16 with restarts, logs and checkpoints every few."""
  return [f"--config.data.dir={data_dir}", "--config.data.image_size=8", "--config.data.val_images=16",
          "--config.vq.image_size=8", "--config.vq.encoder_ch_mult=(1,2)", "--config.vq.decoder_ch_mult=(1,2)",
          "--config.vq.codebook_size=16", "--config.train.batch_size=16", "--config.train.steps=12",
          "--config.train.log_every=3", "--config.train.eval_every=6", "--config.train.checkpoint_every=6",
          "--config.train.restart_every=4", "--config.train.eval_batch_size=16", "--config.optim.warmup_steps=2",
          "--config.optim.lr=3e-3"]


def cli(workdir: pathlib.Path, *args: str) -> int:
  return train_tokenizer.main(["train_tokenizer", "--config", CONFIG, "--workdir", str(workdir), *args])


@pytest.fixture(scope="module")
def tiny_run(tiny_fashion, tmp_path_factory) -> pathlib.Path:
  workdir = tmp_path_factory.mktemp("tiny_run")
  assert cli(workdir, *tiny_overrides(tiny_fashion)) == 0
  return workdir


def read_metrics(workdir: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_psnr_and_code_statistics():
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (3, 4, 4, 3)).astype(np.float32)
  recon = images + rng.normal(0, 0.3, images.shape).astype(np.float32)
  clipped = np.clip(recon, -1, 1)
  expected = [10 * np.log10(1 / np.mean(((c + 1) / 2 - (x + 1) / 2) ** 2)) for c, x in zip(clipped, images)]
  np.testing.assert_allclose(tt.per_image_psnr(jnp.asarray(recon), jnp.asarray(images)), expected, rtol=1e-5)
  stats = tt.code_statistics(np.array([5, 5, 0, 0]))
  assert stats["usage"] == 0.5 and stats["perplexity"] == pytest.approx(2.0)
  assert tt.code_statistics(np.array([1, 1, 1, 1]))["perplexity"] == pytest.approx(4.0)


def test_batches_are_a_function_of_the_step():
  first_epoch = np.concatenate([tt.batch_indices(s, 10, 3, seed=0) for s in range(3)])
  assert len(set(first_epoch.tolist())) == 9  # 3 full batches of distinct images, the 10th image dropped
  np.testing.assert_array_equal(tt.batch_indices(4, 10, 3, seed=0), tt.batch_indices(4, 10, 3, seed=0))
  assert not np.array_equal(tt.batch_indices(0, 10, 3, seed=0), tt.batch_indices(3, 10, 3, seed=0))


def test_restart_replaces_only_unused_codes():
  config = load_config()
  config.vq.update(dict(image_size=8, encoder_ch_mult=(1, 2), decoder_ch_mult=(1, 2), codebook_size=16))
  config.train.steps = 10
  trainer = tt.Trainer(config)
  state = jax.jit(trainer.init_state)()
  used = np.arange(16) % 3 != 0
  state["usage"] = jnp.asarray(used.astype(np.int32))
  old = np.asarray(state["params"]["quantize"]["codebook"])
  images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
  new_state, dead = trainer.restart(state, images, jax.random.key(1))
  assert int(dead) == int(np.sum(~used))
  new = np.asarray(new_state["params"]["quantize"]["codebook"])
  np.testing.assert_array_equal(new[used], old[used])
  # Every replaced code is one of the batch's unit-normalised encoder outputs (4 images x 16 positions).
  model = nnx.merge(trainer.graphdef, state["params"])
  latents = np.array(model.encode_latent(images.astype(np.float32) / 127.5 - 1.0)).reshape(-1, 8)
  latents /= np.linalg.norm(latents, axis=1, keepdims=True)
  distance = np.abs(new[~used][:, None, :] - latents[None]).max(-1).min(-1)
  assert distance.max() < 1e-5
  assert not np.any(np.asarray(new_state["usage"]))


def test_training_lowers_the_loss_and_writes_the_tokenizer(tiny_run):
  logged = [m for m in read_metrics(tiny_run) if "loss" in m]
  assert [m["step"] for m in logged] == [3, 6, 9, 12]
  assert logged[-1]["mse"] < 0.5 * logged[0]["mse"]
  # Dead-code restarts every 4 steps, until 0.75 of the 12 steps.
  assert [m["step"] for m in read_metrics(tiny_run) if "restarted_codes" in m] == [4, 8]
  result = json.loads((tiny_run / "eval.json").read_text())
  assert result["images"] == 16 and 0 < result["usage"] <= 1
  vq_cfg, checksum = store.read_saved_vq(tiny_run / "tokenizer")
  assert checksum == result["checksum"]
  model = store.load_vq(vq_cfg)  # Checks the parameters against the stored checksum.
  assert vq.params_checksum(model) == checksum and vq_cfg.codebook_size == 16


def test_resume_continues_from_the_checkpoint(tiny_run, tiny_fashion, tmp_path, capsys, caplog):
  # An interrupted copy: the step-6 checkpoint survives, the end of the run does not.
  workdir = tmp_path / "resumed"
  shutil.copytree(tiny_run, workdir)
  shutil.rmtree(workdir / "checkpoints" / "12")
  shutil.rmtree(workdir / "tokenizer")
  (workdir / "eval.json").unlink()
  capsys.readouterr()
  assert cli(workdir, *tiny_overrides(tiny_fashion)) == 0
  assert "resumed from step 6" in caplog.text  # absl logging
  # Batches, restarts and keys follow the step, so the resumed run ends with the same weights.
  assert (json.loads((workdir / "eval.json").read_text())["checksum"]
          == json.loads((tiny_run / "eval.json").read_text())["checksum"])
  # Another tokenizer in the same workdir is refused.
  assert cli(workdir, *tiny_overrides(tiny_fashion), "--config.vq.codebook_size=32") == 1
  assert "vq.codebook_size" in capsys.readouterr().err


def test_missing_dataset_is_one_clear_error(tmp_path, capsys):
  assert cli(tmp_path / "run", f"--config.data.dir={tmp_path / 'nowhere'}") == 1
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and "apt-get install dataset-fashion-mnist" in err and "--config.data.dir" in err
  assert cli(tmp_path / "run", "--config.train.no_such_field=1") == 1
  assert "no_such_field" in capsys.readouterr().err


def test_shipped_tokenizer_loads_and_reconstructs():
  config = load_config()
  assert pathlib.Path(config.vq.checkpoint) == assets.FASHION_TOKENIZER
  saved_cfg, checksum = store.read_saved_vq(config.vq.checkpoint)
  assert checksum == SHIPPED_CHECKSUM
  model = store.load_vq(config.vq)
  assert vq.params_checksum(model) == SHIPPED_CHECKSUM
  assert {k: saved_cfg[k] for k in config.vq if k != "checkpoint"} == {
      k: config.vq[k] for k in config.vq if k != "checkpoint"}
  images, _ = sources.load_fashion_mnist(real_fashion_mnist(), "test")
  data = tt.ImageSet(images[:200], config.data).views(np.arange(200))
  x = data.astype(np.float32) / 127.5 - 1.0
  codes = vq.make_encode_fn(model)(x)
  assert codes.shape == (200, 64) and int(codes.min()) >= 0 and int(codes.max()) < 512
  recon = np.clip(np.asarray(vq.make_decode_fn(model)(codes)), -1, 1)
  psnr = 10 * np.log10(4.0 / np.mean((recon - x) ** 2, axis=(1, 2, 3)))
  assert psnr.mean() > SHIPPED_MIN_PSNR


def test_image_folder_source_holds_out_a_fixed_draw(tmp_path):
  from PIL import Image  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  for c in ("a", "b"):
    (tmp_path / c).mkdir()
    for i in range(6):
      Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(tmp_path / c / f"{i}.png")
  (tmp_path / "b" / "5.png").write_bytes(b"not a png")
  config = load_config()
  config.data.update(dict(source="folder", dir=str(tmp_path), augmentation="flip", image_size=8, val_images=4))
  train, val, test, fingerprint = tt.load_data(config.data)
  assert (len(train), len(val)) == (8, 4) and test is val
  paths = lambda s: {s.raw.source.path(i) for i in s.raw.indices}
  assert not paths(train) & paths(val) and len(paths(train) | paths(val)) == 12  # held out
  assert tt.load_data(config.data)[3] == fingerprint and np.array_equal(tt.load_data(config.data)[1].raw.indices,
                                                                        val.raw.indices)
  good = [i for i in range(len(train)) if not train.raw.source.path(train.raw.indices[i]).endswith("b/5.png")]
  views = train.views(np.array(good[:3]), np.random.default_rng(1))
  assert views.shape == (3, 8, 8, 3) and views.dtype == np.uint8
  broken = [s for s in (train, val) if any(s.raw.source.path(j).endswith("b/5.png") for j in s.raw.indices)][0]
  i = [k for k, j in enumerate(broken.raw.indices) if broken.raw.source.path(j).endswith("b/5.png")][0]
  with pytest.raises(ValueError, match="5.png.*remove or replace the file"):
    broken.views(np.array([i]))
