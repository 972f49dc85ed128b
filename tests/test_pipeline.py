"""The training input: determinism, process slices, resuming at a batch, one view per image per epoch, the code
record format, and the refusal of codes that do not fit the model."""

import itertools
import json
import pathlib

import numpy as np
import pytest

from npp_jax import config as config_lib
from npp_jax.data import pipeline
from npp_jax.data import records

GRID, VOCAB, CLASSES, VIEWS = 4, 64, 3, 2


def data_config(kind: str = "synthetic", codes_dir: str = "", num_images: int = 256):
  data = config_lib.base_config().data
  data.update(kind=kind, codes_dir=codes_dir, num_images=num_images, read_threads=2)
  return data


def write_codes(directory: pathlib.Path, views: np.ndarray, labels: list[int], *, vocab: int = VOCAB,
                grid: int = GRID, num_classes: int = CLASSES, shards: int = 2, **manifest) -> pathlib.Path:
  """Writes prepared codes: `views` (N, V, grid*grid) split over `shards` ArrayRecord files, then the manifest."""
  directory.mkdir(parents=True, exist_ok=True)
  encoded = [records.encode_record(v, label) for v, label in zip(views, labels)]
  names, sizes = [], []
  for i, part in enumerate(np.array_split(np.arange(len(encoded)), shards)):
    name = f"codes-{i:05d}.arrayrecord"
    records.write_shard(directory / name, [encoded[j] for j in part])
    names.append(name)
    sizes.append(len(part))
  records.Manifest(num_images=len(encoded), num_classes=num_classes, views=views.shape[1], grid=grid,
                   vocab_size=vocab, shards=names, shard_sizes=sizes, **manifest).write(directory)
  return directory


def labelled_views(num_images: int) -> np.ndarray:
  """View v of image i is the constant code 2*i + v, so a batch row says which image and view it holds."""
  ids = 2 * np.arange(num_images)[:, None] + np.arange(VIEWS)[None, :]
  return np.broadcast_to(ids[:, :, None], (num_images, VIEWS, GRID * GRID)).astype(np.uint16)


def spec(vocab: int = VOCAB, grid: int = GRID, num_classes: int = CLASSES, checksum: str = ""):
  return pipeline.InputSpec(vocab, grid, num_classes, checksum)


def take(iterator, n: int) -> list[dict[str, np.ndarray]]:
  return list(itertools.islice(iterator, n))


def assert_same_batches(a: list[dict], b: list[dict]):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert set(x) == set(y) == {"tokens", "labels"}
    np.testing.assert_array_equal(x["tokens"], y["tokens"])
    np.testing.assert_array_equal(x["labels"], y["labels"])


@pytest.fixture(scope="module")
def codes_dir(tmp_path_factory) -> pathlib.Path:
  n = 32
  return write_codes(tmp_path_factory.mktemp("codes"), labelled_views(n), [i % CLASSES for i in range(n)],
                     tokenizer_checksum="abc123")


# -- determinism, processes, resuming ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["synthetic", "codes"])
def test_batches_are_a_function_of_the_seed(kind, codes_dir):
  make = lambda seed: pipeline.TrainInput(data_config(kind, str(codes_dir)), spec(), global_batch=8, seed=seed)
  first, again, other = (take(make(s).iterator(), 6) for s in (0, 0, 1))
  assert_same_batches(first, again)
  assert any(not np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(first, other))
  assert first[0]["tokens"].shape == (8, GRID * GRID) and first[0]["tokens"].dtype == np.int32
  assert first[0]["labels"].shape == (8,) and first[0]["labels"].dtype == np.int32


@pytest.mark.parametrize("kind", ["synthetic", "codes"])
def test_process_slices_concatenate_to_the_global_batch(kind, codes_dir):
  make = lambda index, count: pipeline.TrainInput(data_config(kind, str(codes_dir)), spec(), global_batch=8, seed=3,
                                                  process_index=index, process_count=count)
  whole = take(make(0, 1).iterator(), 9)  # beyond one epoch of the 32 prepared images
  halves = [take(make(i, 2).iterator(), 9) for i in range(2)]
  joined = [{k: np.concatenate([halves[0][t][k], halves[1][t][k]]) for k in ("tokens", "labels")}
            for t in range(9)]
  assert halves[0][0]["tokens"].shape == (4, GRID * GRID)
  assert_same_batches(joined, whole)


@pytest.mark.parametrize("start", [1, 5, 11])
def test_starting_at_a_batch_equals_skipping_batches(start, codes_dir):
  data = pipeline.TrainInput(data_config("codes", str(codes_dir)), spec(), global_batch=8, seed=0)
  assert_same_batches(take(data.iterator(start_batch=start), 3), take(data.iterator(), start + 3)[start:])


def test_one_view_per_image_per_epoch_and_it_varies(codes_dir):
  n, batch = 32, 8
  data = pipeline.TrainInput(data_config("codes", str(codes_dir)), spec(), global_batch=batch, seed=0)
  assert data.num_images == n
  per_epoch = n // batch
  epochs = []
  for e, chunk in enumerate(np.array_split(take(data.iterator(), 4 * per_epoch), 4)):
    codes = np.concatenate([b["tokens"] for b in chunk])
    labels = np.concatenate([b["labels"] for b in chunk])
    assert (codes == codes[:, :1]).all()  # a row is one whole view
    image, view = codes[:, 0] // 2, codes[:, 0] % 2
    assert sorted(image) == list(range(n)), f"epoch {e} does not hold each image once"
    np.testing.assert_array_equal(labels, image % CLASSES)
    epochs.append((image, dict(zip(image, view))))
  # Epochs are reshuffled and draw new views; both views occur.
  assert not np.array_equal(epochs[0][0], epochs[1][0])
  views = np.array([[views_of[i] for i in range(n)] for _, views_of in epochs])  # (epoch, image)
  assert (views != views[0]).any(axis=0).sum() > n // 4
  assert 0 < views.mean() < 1


def test_synthetic_data_is_learnable_and_in_range():
  data = pipeline.TrainInput(data_config("synthetic", num_images=64), spec(vocab=16), global_batch=16, seed=0)
  (batch,) = take(data.iterator(), 1)
  assert batch["tokens"].min() >= 0 and batch["tokens"].max() < 16
  assert batch["labels"].min() >= 0 and batch["labels"].max() < CLASSES
  # Same label, same pattern up to 10% noise (or its flip): rows of a class agree on most positions.
  rows = batch["tokens"][batch["labels"] == batch["labels"][0]]
  grids = rows.reshape(-1, GRID, GRID)
  agree = [max((g == grids[0]).mean(), (g[:, ::-1] == grids[0]).mean()) for g in grids[1:]]
  assert min(agree) > 0.6


# -- the record format ----------------------------------------------------------------------------------------


def test_records_round_trip():
  codes = np.random.default_rng(0).integers(0, records.MAX_VOCAB, size=(3, 256))
  decoded, label = records.decode_record(records.encode_record(codes, 917))
  assert label == 917 and decoded.dtype == np.uint16
  np.testing.assert_array_equal(decoded, codes)


def test_bad_records_are_refused():
  good = records.encode_record(np.zeros((2, 4), np.int64), 1)
  with pytest.raises(ValueError, match="not an npp-jax code record"):
    records.decode_record(b"XXXX" + good[4:])
  with pytest.raises(ValueError, match="header promises"):
    records.decode_record(good[:-2])
  with pytest.raises(ValueError, match="code ids must lie in"):
    records.encode_record(np.full((1, 4), records.MAX_VOCAB), 0)
  with pytest.raises(ValueError, match="views, seq_len"):
    records.encode_record(np.zeros(4), 0)


def test_manifest_round_trip_and_errors(tmp_path):
  manifest = records.Manifest(num_images=3, num_classes=2, views=1, grid=4, vocab_size=64, shards=["a"],
                              shard_sizes=[3], class_names=["cat", "dog"], tokenizer_checksum="abc")
  manifest.write(tmp_path)
  assert records.Manifest.read(tmp_path) == manifest
  assert json.loads((tmp_path / records.MANIFEST).read_text())["grid"] == 4
  with pytest.raises(FileNotFoundError, match="not a prepared code directory"):
    records.Manifest.read(tmp_path / "missing")
  (tmp_path / records.MANIFEST).write_text("{not json")
  with pytest.raises(ValueError, match="not a valid manifest"):
    records.Manifest.read(tmp_path)


# -- codes that do not fit ------------------------------------------------------------------------------------


def _input(directory, model_spec=None, **kwargs):
  return pipeline.TrainInput(data_config("codes", str(directory)), model_spec or spec(), global_batch=4, seed=0,
                             **kwargs)


def test_missing_codes_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match="no manifest.json in .*nowhere"):
    _input(tmp_path / "nowhere")
  with pytest.raises(ValueError, match="data.codes_dir is empty"):
    _input("")


@pytest.mark.parametrize("model_spec, message", [
    (spec(grid=8), "the codes are a 4x4 grid but the model's block_size is 64"),
    (spec(vocab=32), "vocabulary of 64 but the model has vocab_size=32"),
    (spec(num_classes=2), "3 classes but the model has num_classes=2"),
    (spec(checksum="fffffff"), "made by tokenizer abc123 but the config names tokenizer fffffff"),
])
def test_codes_that_do_not_fit_the_model_are_refused(codes_dir, model_spec, message):
  with pytest.raises(ValueError, match=message):
    _input(codes_dir, model_spec)


def test_code_ids_outside_the_vocabulary_are_refused(tmp_path):
  views = labelled_views(8)
  views[5, 1, 3] = 200  # the manifest claims vocabulary 64
  directory = write_codes(tmp_path / "codes", views, [0] * 8, tokenizer_checksum="abc")
  data = _input(directory)
  with pytest.raises(ValueError, match="holds code id 200, outside the model's vocabulary of 64"):
    take(data.iterator(), 8)


@pytest.mark.parametrize("label", [CLASSES, -1])
def test_labels_outside_the_classes_are_refused(tmp_path, label):
  labels = [i % CLASSES for i in range(8)]
  labels[6] = label  # the manifest and the model have CLASSES classes
  directory = write_codes(tmp_path / "codes", labelled_views(8), labels, tokenizer_checksum="abc")
  data = _input(directory)
  with pytest.raises(ValueError, match=rf"record 6 in .* has label {label}, outside the {CLASSES} classes"):
    take(data.iterator(), 8)


def test_incomplete_code_directories_are_refused(tmp_path):
  directory = write_codes(tmp_path / "codes", labelled_views(8), [0] * 8)
  manifest = records.Manifest.read(directory)
  manifest.num_images = 9
  manifest.write(directory)
  with pytest.raises(ValueError, match="holds 8 records but its manifest says 9"):
    _input(directory)
  (directory / manifest.shards[1]).unlink()
  with pytest.raises(FileNotFoundError, match="missing"):
    _input(directory)


def test_too_few_images_or_bad_batch_split(codes_dir):
  with pytest.raises(ValueError, match="fewer than one global batch"):
    pipeline.TrainInput(data_config("codes", str(codes_dir)), spec(), global_batch=64, seed=0)
  with pytest.raises(ValueError, match="does not split over 3 processes"):
    pipeline.TrainInput(data_config("codes", str(codes_dir)), spec(), global_batch=8, seed=0, process_count=3)
  with pytest.raises(ValueError, match="data.kind"):
    pipeline.TrainInput(data_config("images"), spec(), global_batch=8, seed=0)


def test_class_balanced_subset_is_seeded_nested_and_balanced():
  labels = np.random.default_rng(0).integers(0, 4, 400)
  subset = pipeline.class_balanced_subset(labels, 20, seed=3)
  assert (np.diff(subset) > 0).all()
  assert np.bincount(labels[subset]).tolist() == [20] * 4
  np.testing.assert_array_equal(subset, pipeline.class_balanced_subset(labels, 20, seed=3))
  assert set(subset) != set(pipeline.class_balanced_subset(labels, 20, seed=4))
  assert set(subset) <= set(pipeline.class_balanced_subset(labels, 30, seed=3))  # more images keep the fewer
  with pytest.raises(ValueError, match=r"fewer than the 500 per class that data.subset_per_class asks for"):
    pipeline.class_balanced_subset(labels, 500, seed=3)


def test_a_subset_trains_on_its_images_only_each_once_per_epoch(codes_dir):
  data_cfg = data_config("codes", str(codes_dir))
  data_cfg.update(subset_per_class=4, subset_seed=7)
  data = pipeline.TrainInput(data_cfg, spec(), global_batch=4, seed=0)
  labels = np.arange(32) % CLASSES  # what the fixture wrote
  chosen = pipeline.class_balanced_subset(labels, 4, seed=7)
  assert data.num_images == 12
  full = pipeline.TrainInput(data_config("codes", str(codes_dir)), spec(), global_batch=4, seed=0)
  assert data.fingerprint != full.fingerprint  # a resume on other data is refused
  for epoch in np.array_split(take(data.iterator(), 3 * 3), 3):
    images = np.concatenate([b["tokens"][:, 0] // 2 for b in epoch])
    assert sorted(images) == chosen.tolist()
    np.testing.assert_array_equal(np.concatenate([b["labels"] for b in epoch]), images % CLASSES)


def test_heldout_codes_are_the_first_views_of_a_balanced_selection(codes_dir):
  everything = pipeline.heldout_codes(str(codes_dir), spec())
  np.testing.assert_array_equal(everything["tokens"][:, 0], 2 * np.arange(32))  # view 0 of every image, in order
  np.testing.assert_array_equal(everything["labels"], np.arange(32) % CLASSES)
  some = pipeline.heldout_codes(str(codes_dir), spec(), num_images=7)  # 2 per class: whole classes only
  assert np.bincount(some["labels"]).tolist() == [2] * CLASSES
  np.testing.assert_array_equal(some["labels"], (some["tokens"][:, 0] // 2) % CLASSES)
