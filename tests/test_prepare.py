"""prepare: images -> views -> codes -> shards + manifest; resume, multi-process, refusals, the CLI."""

import gzip
import os
import pathlib
import struct
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from npp_jax.data import augment
from npp_jax.data import prepare
from npp_jax.data import records
from npp_jax.data import sources

REPO = pathlib.Path(__file__).resolve().parents[1]
GRID, VOCAB, SIZE = 2, 50, 16


def mean_codes(views: np.ndarray, grid: int = GRID, vocab: int = VOCAB) -> np.ndarray:
  """A cheap deterministic 'tokenizer': each code is the mean of a block of the view (so crops and flips show)."""
  b, h, w, _ = views.shape
  blocks = views.reshape(b, grid, h // grid, grid, w // grid, 3).astype(np.float64).mean(axis=(2, 4, 5))
  return (blocks.reshape(b, grid * grid).astype(np.int64) * 7) % vocab


class Encoder:
  """Host encoder that counts its calls and can 'die' (raise) at a given call, like a killed run."""

  def __init__(self, fail_at: int = 0):
    self.calls, self.fail_at = 0, fail_at

  def __call__(self, batch: np.ndarray) -> np.ndarray:
    self.calls += 1
    if self.calls == self.fail_at:
      raise RuntimeError("killed")
    return mean_codes(batch)


def make_folder(root: pathlib.Path, counts=(6, 5, 3), seed=0) -> pathlib.Path:
  rng = np.random.default_rng(seed)
  for c, n in enumerate(counts):
    (root / f"class{c}").mkdir(parents=True)
    for j in range(n):
      pixels = rng.integers(0, 256, (20 + j, 24, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(root / f"class{c}" / f"{j:03d}.png")
  return root


def run(source, out, encoder=None, **overrides):
  kwargs = dict(augmentation="flip", image_size=SIZE, shard_size=4, batch_size=5, vocab_size=VOCAB, grid=GRID,
                tokenizer_checksum="tok-a", num_threads=2, process_index=0, process_count=1, progress=False)
  kwargs.update(overrides)
  return prepare.prepare_codes(source, encoder or Encoder(), out, **kwargs)


def read_shards(out: pathlib.Path) -> dict[str, bytes]:
  return {p.name: p.read_bytes() for p in sorted(out.glob("codes-*.arrayrecord"))}


def read_records(out: pathlib.Path) -> list[tuple[np.ndarray, int]]:
  from array_record.python import array_record_module
  result = []
  for path in records.Manifest.read(out).shard_paths(out):
    reader = array_record_module.ArrayRecordReader(path)
    result += [records.decode_record(r) for r in reader.read_all()]
    reader.close()
  return result


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return make_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def reference_run(folder, tmp_path_factory):
  """An uninterrupted run: the bytes every other run must reproduce."""
  out = tmp_path_factory.mktemp("reference") / "codes"
  summary = run(sources.ImageFolderSource(folder), out)
  return out, summary


def test_records_hold_the_codes_of_every_view(folder, reference_run):
  out, summary = reference_run
  src = sources.ImageFolderSource(folder)
  manifest = records.Manifest.read(out)
  assert manifest.shards == [f"codes-{i:05d}-of-00004.arrayrecord" for i in range(4)]
  assert manifest.shard_sizes == [4, 4, 4, 2] and manifest.num_images == 14 == summary.images
  assert (manifest.views, manifest.grid, manifest.vocab_size, manifest.image_size) == (2, GRID, VOCAB, SIZE)
  assert manifest.class_names == ["class0", "class1", "class2"] and manifest.num_classes == 3
  assert manifest.tokenizer_checksum == "tok-a" and manifest.augmentation == "flip" and manifest.skipped == []
  assert manifest.source["kind"] == "folder" and manifest.source["num_files"] == 14
  got = read_records(out)
  for i, (codes, label) in enumerate(got):
    views = augment.make_views(src.load(i), "flip", SIZE)
    np.testing.assert_array_equal(codes, mean_codes(views))
    assert label == src.label(i)
  assert summary.shards_written == 4 and summary.shards_reused == 0


def test_killed_run_resumes_byte_identical(folder, reference_run, tmp_path):
  out = tmp_path / "codes"
  src = sources.ImageFolderSource(folder)
  # 4 images x 2 views = 8 views per shard = 2 calls of 5; the 3rd call (in shard 1) dies.
  with pytest.raises(RuntimeError, match="killed"):
    run(src, out, Encoder(fail_at=3))
  assert list(read_shards(out)) == ["codes-00000-of-00004.arrayrecord"]
  assert not (out / records.MANIFEST).exists()
  # A kill during a write leaves a temp file; a kill between rename and progress file leaves an unlisted shard.
  (out / "codes-00001-of-00004.arrayrecord.tmp").write_bytes(b"half a shard")
  (out / "codes-00002-of-00004.arrayrecord").write_bytes(b"not finished")
  encoder = Encoder()
  summary = run(src, out, encoder)
  assert encoder.calls == 2 + 2 + 1  # shards 1, 2, 3 only
  assert (summary.shards_written, summary.shards_reused, summary.images) == (3, 1, 10)
  assert read_shards(out) == read_shards(reference_run[0])
  assert records.Manifest.read(out) == records.Manifest.read(reference_run[0])
  again = Encoder()
  assert run(src, out, again).shards_reused == 4 and again.calls == 0


def test_two_processes_share_the_shards(folder, reference_run, tmp_path):
  out = tmp_path / "codes"
  src = sources.ImageFolderSource(folder)
  second = run(src, out, process_index=1, process_count=2)
  assert second.manifest is None and sorted(read_shards(out)) == [
      "codes-00001-of-00004.arrayrecord", "codes-00003-of-00004.arrayrecord"]
  first = run(src, out, process_index=0, process_count=2, batch_size=8)  # batch size does not change the codes
  assert first.shards_written == 2 and first.manifest is not None
  assert read_shards(out) == read_shards(reference_run[0])


def test_process_zero_times_out_with_a_clear_error(folder, tmp_path):
  with pytest.raises(TimeoutError, match="2 shards from other processes"):
    run(sources.ImageFolderSource(folder), tmp_path / "codes", process_index=0, process_count=2,
        wait_timeout_s=0.2, poll_interval_s=0.05)


@pytest.mark.parametrize("overrides, message", [
    (dict(augmentation="none"), "augmentation \"flip\" then, \"none\" now"),
    (dict(tokenizer_checksum="tok-b"), "tokenizer_checksum"),
    (dict(shard_size=5), "shard_size 4 then, 5 now"),
    (dict(vocab_size=64), "vocab_size"),
])
def test_a_different_config_is_refused_and_nothing_is_lost(folder, reference_run, tmp_path, overrides, message):
  out = tmp_path / "codes"
  src = sources.ImageFolderSource(folder)
  run(src, out)
  before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
  with pytest.raises(ValueError, match=message):
    run(src, out, **overrides)
  assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_changed_source_files_are_refused(tmp_path):
  root = make_folder(tmp_path / "images", counts=(2, 2))
  out = tmp_path / "codes"
  run(sources.ImageFolderSource(root), out)
  Image.new("RGB", (20, 20)).save(root / "class1" / "new.png")
  with pytest.raises(ValueError, match="different files or labels"):
    run(sources.ImageFolderSource(root), out)


def test_shards_without_state_are_refused(tmp_path):
  (tmp_path / "codes-00000-of-00001.arrayrecord").write_bytes(b"x")
  with pytest.raises(ValueError, match="no prepare_state.json"):
    run(sources.ImageFolderSource(make_folder(tmp_path / "images", counts=(1,))), tmp_path)


def test_corrupt_images_are_skipped_counted_and_resume_exactly(tmp_path):
  root = make_folder(tmp_path / "images", counts=(3, 3))
  (root / "class0" / "001.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
  (root / "class1" / "002.png").write_bytes(b"")
  src = sources.ImageFolderSource(root)
  summary = run(src, tmp_path / "a", shard_size=2)
  manifest = records.Manifest.read(tmp_path / "a")
  assert manifest.skipped == [1, 5] and manifest.shard_sizes == [1, 2, 1] and manifest.num_images == 4
  assert [e["index"] for e in summary.skipped] == [1, 5] and "001.png" in summary.skipped[0]["error"]
  assert [e["index"] for e in prepare.skipped_details(tmp_path / "a")] == [1, 5]
  assert [label for _, label in read_records(tmp_path / "a")] == [0, 0, 1, 1]
  with pytest.raises(RuntimeError):
    run(src, tmp_path / "b", Encoder(fail_at=2), shard_size=2)
  run(src, tmp_path / "b", shard_size=2)
  assert read_shards(tmp_path / "b") == read_shards(tmp_path / "a")
  assert records.Manifest.read(tmp_path / "b").skipped == [1, 5]


def test_tencrop_twenty_views(tmp_path):
  root = make_folder(tmp_path / "images", counts=(2,))
  src = sources.ImageFolderSource(root)
  run(src, tmp_path / "codes", augmentation="tencrop", extra_crop_range=1.05, batch_size=16)
  manifest = records.Manifest.read(tmp_path / "codes")
  assert manifest.views == 20 and manifest.augmentation_args == {"crop_range": 1.1, "extra_crop_range": 1.05}
  for i, (codes, _) in enumerate(read_records(tmp_path / "codes")):
    np.testing.assert_array_equal(codes, mean_codes(augment.make_views(src.load(i), "tencrop", SIZE, 1.05)))


def test_encoder_output_is_checked(folder, tmp_path):
  src = sources.ImageFolderSource(folder)
  with pytest.raises(ValueError, match="outside its vocabulary of 10"):
    run(src, tmp_path / "a", vocab_size=10)
  with pytest.raises(ValueError, match=r"expected \(5, 9\) for a 3x3 grid"):
    run(src, tmp_path / "b", grid=3)


def test_manifest_mismatches_are_each_named(reference_run):
  manifest = records.Manifest.read(reference_run[0])
  records.check_compatible(manifest, vocab_size=VOCAB, grid=GRID, num_classes=3, tokenizer_checksum="tok-a")
  for kwargs, message in [
      (dict(vocab_size=40), "vocabulary of 50 but the model has vocab_size=40"),
      (dict(grid=4), "2x2 grid"),
      (dict(num_classes=2), "3 classes but the model has num_classes=2"),
      (dict(tokenizer_checksum="tok-b"), "made by tokenizer tok-a"),
  ]:
    args = dict(vocab_size=VOCAB, grid=GRID, num_classes=3, tokenizer_checksum="tok-a") | kwargs
    with pytest.raises(ValueError, match=message):
      records.check_compatible(manifest, **args)


def write_fashion(directory: pathlib.Path, n: int = 6) -> np.ndarray:
  directory.mkdir(parents=True)
  images = np.random.default_rng(5).integers(0, 256, (n, 28, 28), dtype=np.uint8)
  labels = np.arange(n, dtype=np.uint8) % 10
  for name, array, magic in [("train-images-idx3-ubyte", images, 0x803), ("train-labels-idx1-ubyte", labels, 0x801)]:
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    (directory / (name + ".gz")).write_bytes(gzip.compress(header + array.tobytes()))
  return images


def test_device_encoder_shards_the_batch_over_8_devices(tmp_path):
  import jax
  import jax.numpy as jnp

  images = write_fashion(tmp_path / "fmnist")
  src = sources.FashionMnistSource(tmp_path / "fmnist", "train")

  def jax_mean_codes(x):  # the same tokenizer in jnp, on [-1, 1] input
    u8 = jnp.round((x + 1) * 127.5)
    b = x.shape[0]
    blocks = u8.reshape(b, GRID, 32 // GRID, GRID, 32 // GRID, 3).mean(axis=(2, 4, 5))
    return (blocks.reshape(b, GRID * GRID).astype(jnp.int32) * 7) % VOCAB

  encoder = prepare.device_encoder(jax.jit(jax_mean_codes))
  assert encoder.num_devices == len(jax.local_devices()) == 8
  run(src, tmp_path / "codes", encoder, augmentation="pad_flip", image_size=32, batch_size=8)
  got = read_records(tmp_path / "codes")
  for i, (codes, label) in enumerate(got):
    np.testing.assert_array_equal(codes, mean_codes(augment.make_views(images[i], "pad_flip", 32)))
    assert label == i % 10
  # A batch the devices do not divide is padded and cut back: the same codes as one by one.
  odd = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), np.uint8)
  np.testing.assert_array_equal(np.asarray(encoder(odd)), mean_codes(odd))


def test_to_model_input_is_the_reference_normalisation():
  pixels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
  expected = (pixels.astype(np.float32) / np.float32(255.0) - np.float32(0.5)) / np.float32(0.5)
  np.testing.assert_array_equal(np.asarray(prepare.to_model_input(pixels)), expected)


# --- with the real tokenizer -----------------------------------------------------------------------------------------

TINY_VQ = dict(codebook_size=64, codebook_embed_dim=8, encoder_ch_mult=(1, 2), decoder_ch_mult=(1, 2),
               z_channels=32, ch=32, image_size=16)


@pytest.fixture(scope="module")
def tiny_vq(fixtures_dir):
  """The reference's tiny random-init VQ (fixtures: ch=32, ch_mult (1, 2), z 32, codebook 64x8), at 16x16 input.

  Loaded rather than initialised: an eager VQModel init takes ~20 s on 8 forced CPU devices.
  """
  from npp_jax.model_files import param_mapping
  from npp_jax.models import vq
  cfg = vq.default_config()
  cfg.update(TINY_VQ)
  return cfg, param_mapping.vq_from_torch(fixtures_dir / "llamagen_tiny" / "vq.pt", cfg)


def test_real_tiny_vq_codes(tmp_path, tiny_vq):
  import jax.numpy as jnp
  from npp_jax.models import vq

  cfg, model = tiny_vq
  root = make_folder(tmp_path / "images", counts=(2, 1))
  src = sources.ImageFolderSource(root)
  run(src, tmp_path / "codes", prepare.device_encoder(vq.make_encode_fn(model)), batch_size=8, shard_size=2,
      vocab_size=cfg.codebook_size, grid=vq.grid_size(cfg), tokenizer_checksum=vq.params_checksum(model))
  manifest = records.Manifest.read(tmp_path / "codes")
  assert manifest.grid == 8 and manifest.tokenizer_checksum == vq.params_checksum(model)
  got = np.stack([codes for codes, _ in read_records(tmp_path / "codes")])
  views = np.concatenate([augment.make_views(src.load(i), "flip", 16) for i in range(len(src))])
  # One device, unsharded, the normalisation written out here.
  direct = vq.make_encode_fn(model)(jnp.asarray(views, jnp.float32) / 127.5 - 1.0)
  np.testing.assert_array_equal(got, np.asarray(direct).reshape(got.shape))
  assert len(np.unique(got)) > 3  # real codes, not a constant


def run_cli(tmp_path, config_text, *extra):
  config = tmp_path / "prepare_config.py"
  config.write_text(config_text)
  env = dict(os.environ, PYTHONPATH=str(REPO))
  return subprocess.run([sys.executable, "-m", "npp_jax.prepare", f"--config={config}",
                         f"--out={tmp_path / 'codes'}", *extra], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=300)


CLI_CONFIG = """
import ml_collections
from npp_jax.data import sources
from npp_jax.models import vq

def get_config():
  c = ml_collections.ConfigDict()
  c.data = sources.default_data_config()
  c.data.update(dict(dir={dir!r}, augmentation="flip", image_size=16, shard_size=2, encode_batch_size=6))
  c.vq = vq.default_config()
  c.vq.update({vq_cfg!r})
  c.vq.checkpoint = {checkpoint!r}
  return c
"""


def test_cli_end_to_end_and_errors(tmp_path, tiny_vq):
  import runpy
  from npp_jax.model_files import store
  from npp_jax.data import prepare as prepare_lib

  cfg, model = tiny_vq
  vq_dir = tmp_path / "vq"
  store.save_vq(model, cfg, vq_dir)
  root = make_folder(tmp_path / "images", counts=(2, 1))
  (root / "class0" / "readme.txt").write_text("ignored")
  text = CLI_CONFIG.format(dir=str(root), vq_cfg=TINY_VQ, checkpoint=str(vq_dir))
  done = run_cli(tmp_path, text)
  assert done.returncode == 0, done.stderr
  assert "encoded 3 images x 2 views" in done.stdout and "ignored 1 non-image files" in done.stderr  # result, log
  manifest = records.Manifest.read(tmp_path / "codes")
  assert manifest.num_images == 3 and manifest.shard_sizes == [2, 1] and manifest.grid == 8
  assert manifest.tokenizer_checksum == vq_checksum(model)
  before = read_shards(tmp_path / "codes")

  missing = run_cli(tmp_path, text, f"--config.data.dir={tmp_path / 'nowhere'}")
  assert missing.returncode == 1 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr
  # The other refusals in-process (each subprocess costs seconds of jax import).
  config = runpy.run_path(str(tmp_path / "prepare_config.py"))["get_config"]()
  order = tmp_path / "classes.txt"
  order.write_text("class1\nclass0\n")
  reordered = config.copy_and_resolve_references()
  reordered.data.class_order = str(order)
  with pytest.raises(ValueError, match="different order"):
    prepare_lib.prepare_from_config(reordered, str(tmp_path / "codes"))
  other_size = config.copy_and_resolve_references()
  other_size.data.image_size = 32
  with pytest.raises(ValueError, match="vq.image_size=16"):
    prepare_lib.prepare_from_config(other_size, str(tmp_path / "codes"))
  with pytest.raises(ValueError, match="must be given together"):
    prepare_lib.prepare_from_config(config, str(tmp_path / "codes"), process_index=1)
  other = config.copy_and_resolve_references()
  other.data.augmentation = "none"
  with pytest.raises(ValueError, match="other settings"):
    prepare_lib.prepare_from_config(other, str(tmp_path / "codes"))
  assert read_shards(tmp_path / "codes") == before and (tmp_path / "codes" / "manifest.json").is_file()


def vq_checksum(model):
  from npp_jax.models import vq
  return vq.params_checksum(model)
