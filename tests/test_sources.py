"""Image sources: folder order and checks, ImageNet layouts, Fashion-MNIST IDX files."""

import gzip
import pathlib
import struct

import ml_collections
import numpy as np
import pytest
from PIL import Image

from npp_jax.data import sources
import system_packages


def write_image(path: pathlib.Path, value: int, size=(12, 10)) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)


def make_folder(root: pathlib.Path, layout: dict[str, list[str]]) -> pathlib.Path:
  """Writes solid-colour images; the colour of file j of class c is 10 * c + j (readable back after decoding)."""
  for c, (name, files) in enumerate(layout.items()):
    (root / name).mkdir(parents=True, exist_ok=True)
    for j, file in enumerate(files):
      write_image(root / name / file, 10 * c + j)
  return root


def test_image_folder_order_labels_and_ignored_files(tmp_path):
  root = make_folder(tmp_path / "data", {"b_cat": ["z.png", "A.JPG", "sub/a.bmp"], "a_dog": ["x.jpeg"]})
  (root / "b_cat" / "notes.txt").write_text("not an image")
  (root / ".ipynb_checkpoints").mkdir()
  src = sources.ImageFolderSource(root)
  assert src.class_names == ["a_dog", "b_cat"]
  # ImageFolder order: classes sorted; inside a class os.walk sorted (root before sub/), names sorted.
  rel = [str(pathlib.Path(p).relative_to(root)) for p in src.paths]
  assert rel == ["a_dog/x.jpeg", "b_cat/A.JPG", "b_cat/z.png", "b_cat/sub/a.bmp"]
  assert [src.label(i) for i in range(len(src))] == [0, 1, 1, 1]
  assert [int(np.asarray(src.load(i))[0, 0, 0]) for i in range(len(src))] == [10, 1, 0, 2]
  assert len(src.ignored_files) == 1 and src.ignored_files[0].endswith("notes.txt")
  assert src.describe()["ignored_files"] == 1 and src.describe()["num_classes"] == 2


def test_corrupt_image_is_skipped_without_shifting_indices(tmp_path):
  root = make_folder(tmp_path, {"a": ["0.png", "1.png", "2.png"]})
  (root / "a" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
  src = sources.ImageFolderSource(root)
  with pytest.raises(sources.UnreadableImageError, match="1.png"):
    src.load(1)
  assert [e.index for e in src] == [0, 2]


def test_missing_dir_empty_class_and_split_root(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    sources.ImageFolderSource(tmp_path / "nope")
  root = make_folder(tmp_path / "d", {"a": ["0.png"], "b": []})
  (root / "b" / "readme.md").write_text("x")
  with pytest.raises(ValueError, match=r"class folder .*/b has no image files"):
    sources.ImageFolderSource(root)
  assert len(sources.ImageFolderSource(root, allow_empty_classes=True).class_names) == 2
  split_root = make_folder(tmp_path / "imagenet", {"train": ["0.png"], "val": ["0.png"]})
  with pytest.raises(ValueError, match="split folders"):
    sources.ImageFolderSource(split_root)


@pytest.mark.parametrize("lines, message", [
    (["a", "b", "c"], r"1 missing \(c\)"),
    (["a"], r"1 not in the list \(b\)"),
    (["b", "a"], "different order"),
    (["a", "a", "b"], "more than once"),
])
def test_class_order_file_must_match_exactly(tmp_path, lines, message):
  root = make_folder(tmp_path / "d", {"a": ["0.png"], "b": ["0.png"]})
  order = tmp_path / "classes.txt"
  order.write_text("\n".join(lines) + "\n")
  with pytest.raises(ValueError, match=message):
    sources.ImageFolderSource(root, order)


def test_class_order_file_that_matches(tmp_path):
  root = make_folder(tmp_path / "d", {"a": ["0.png"], "b": ["0.png"]})
  order = tmp_path / "classes.txt"
  order.write_text("a\n\n b \n")
  assert sources.ImageFolderSource(root, order).class_names == ["a", "b"]


def test_fingerprint_follows_the_listing(tmp_path):
  root = make_folder(tmp_path, {"a": ["0.png"], "b": ["0.png"]})
  before = sources.ImageFolderSource(root).fingerprint()
  write_image(root / "b" / "1.png", 5)
  assert sources.ImageFolderSource(root).fingerprint() != before


# --- ImageNet ------------------------------------------------------------------------------------------------------

STANDARD = sources.standard_imagenet_classes()
needs_tfds_list = pytest.mark.skipif(STANDARD is None, reason="tensorflow_datasets' ImageNet label list not installed")


@needs_tfds_list
def test_standard_imagenet_classes_are_the_sorted_wnids():
  assert len(STANDARD) == 1000 and STANDARD == sorted(STANDARD) and STANDARD[0] == "n01440764"


def make_imagenet_train(root: pathlib.Path, classes: list[str]) -> None:
  for c in classes:
    (root / "train" / c).mkdir(parents=True)
  for c in classes[:2]:
    write_image(root / "train" / c / f"{c}_1.JPEG", 3)


@needs_tfds_list
def test_imagenet_train_layout(tmp_path):
  make_imagenet_train(tmp_path, STANDARD)
  for c in STANDARD[2:]:  # every class needs an image
    (tmp_path / "train" / c / "x.JPEG").symlink_to(tmp_path / "train" / STANDARD[0] / f"{STANDARD[0]}_1.JPEG")
  src = sources.ImageNetSource(tmp_path, "train")
  assert src.class_names == STANDARD and len(src) == 1000
  assert src.label(999) == 999 and src.describe()["split"] == "train"


@needs_tfds_list
def test_imagenet_refuses_a_subset_or_renamed_classes(tmp_path):
  make_imagenet_train(tmp_path, STANDARD[:10])
  with pytest.raises(ValueError, match="990 missing"):
    sources.ImageNetSource(tmp_path, "train")
  with pytest.raises(FileNotFoundError, match="val folder .* does not exist"):
    sources.ImageNetSource(tmp_path, "val")


@needs_tfds_list
def test_imagenet_flat_val_with_kaggle_csv(tmp_path):
  val = tmp_path / "ILSVRC" / "Data" / "CLS-LOC" / "val"
  write_image(val / "ILSVRC2012_val_00000002.JPEG", 1)
  write_image(val / "ILSVRC2012_val_00000001.JPEG", 2)
  (tmp_path / "LOC_val_solution.csv").write_text(
      "ImageId,PredictionString\n"
      f"ILSVRC2012_val_00000002,{STANDARD[7]} 1 2 3 4 {STANDARD[7]} 5 6 7 8\n"
      f"ILSVRC2012_val_00000001,{STANDARD[3]} 1 2 3 4\n")
  src = sources.ImageNetSource(val.parent, "val")
  assert [pathlib.Path(p).name for p in src.paths] == ["ILSVRC2012_val_00000001.JPEG",
                                                       "ILSVRC2012_val_00000002.JPEG"]
  assert [src.label(0), src.label(1)] == [3, 7] and src.num_classes == 1000


def test_imagenet_flat_val_without_labels_is_an_error(tmp_path):
  write_image(tmp_path / "val" / "img.JPEG", 1)
  with pytest.raises(FileNotFoundError, match="no labels for the flat ImageNet val folder"):
    sources.ImageNetSource(tmp_path, "val")


# --- Fashion-MNIST -------------------------------------------------------------------------------------------------


def write_idx(path: pathlib.Path, array: np.ndarray, magic: int, compress: bool) -> None:
  data = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()
  path.write_bytes(gzip.compress(data) if compress else data)


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_idx_reader(tmp_path, compress):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
  labels = np.array([3, 0, 9, 1, 1], np.uint8)
  suffix = ".gz" if compress else ""
  write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", images, 0x803, compress)
  write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", labels, 0x801, compress)
  got_images, got_labels = sources.load_fashion_mnist(tmp_path, "test")
  np.testing.assert_array_equal(got_images, images)
  np.testing.assert_array_equal(got_labels, labels)
  src = sources.FashionMnistSource(tmp_path, "test")
  assert len(src) == 5 and src.label(2) == 9 and src.class_names[9] == "Ankle boot"
  np.testing.assert_array_equal(src.load(4), images[4])


def test_fashion_mnist_bad_files(tmp_path):
  images = np.zeros((2, 28, 28), np.uint8)
  write_idx(tmp_path / "train-images-idx3-ubyte", images, 0x801, False)  # the labels' magic number
  write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(2, np.uint8), 0x801, False)
  with pytest.raises(ValueError, match="magic number 0x00000801, expected 0x00000803"):
    sources.load_fashion_mnist(tmp_path, "train")
  data = struct.pack(">4I", 0x803, 3, 28, 28) + images.tobytes()  # header says 3 images, data has 2
  (tmp_path / "train-images-idx3-ubyte").write_bytes(data)
  with pytest.raises(ValueError, match="promises"):
    sources.load_fashion_mnist(tmp_path, "train")
  write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((3, 28, 28), np.uint8), 0x803, False)
  with pytest.raises(ValueError, match="3 images but 2 labels"):
    sources.load_fashion_mnist(tmp_path, "train")
  with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
    sources.load_fashion_mnist(tmp_path / "missing", "train")
  with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
    sources.load_fashion_mnist(tmp_path, "test")


def test_installed_fashion_mnist():
  system_packages.require("dataset-fashion-mnist", pathlib.Path(sources.FASHION_MNIST_DIR).is_dir())
  images, labels = sources.load_fashion_mnist(split="test")
  assert images.shape == (10000, 28, 28) and np.bincount(labels).tolist() == [1000] * 10


def test_make_source_from_config(tmp_path):
  root = make_folder(tmp_path, {"a": ["0.png"]})
  cfg = sources.default_data_config()
  cfg.dir = str(root)
  assert isinstance(sources.make_source(cfg), sources.ImageFolderSource)
  cfg.source = "tfds"
  with pytest.raises(ValueError, match="unknown data.source 'tfds'"):
    sources.make_source(cfg)
  with pytest.raises(ValueError, match="no image folder directory given"):
    sources.make_source(ml_collections.ConfigDict({"source": "folder", "dir": ""}))
