"""Where images come from: an image folder, ImageNet's extracted train/val layout, Fashion-MNIST IDX files.

A source has a fixed, deterministic order of examples (its indices), a label per index known without decoding,
class names (label -> name) and a `describe()` dict that goes into the code manifest. `load(i)` decodes one
example and raises `UnreadableImageError` for a file that cannot be decoded, so the caller can skip it without
shifting any other index.

ImageNet. tensorflow_datasets' `imagenet2012` builder cannot be used here: it reads the manual-download tars
through `tf.io.gfile` and stores images with `tfds.features.Image(encoding_format='jpeg')`, and both need
TensorFlow, which this project does not install (1.5 GB). `ImageNetSource` reads the extracted files instead:

- `train`: `root/train/<wnid>/*.JPEG` (the layout of the per-class tars once extracted, and of Kaggle's
  `ILSVRC/Data/CLS-LOC`).
- `val`: either `root/val/<wnid>/*.JPEG` (already sorted into class folders), or flat `root/val/*.JPEG` with
  labels from Kaggle's `LOC_val_solution.csv` (searched in root and up to three folders above it) or, when the
  50,000 files carry their original names `ILSVRC2012_val_%08d.JPEG`, from the label list that
  tensorflow_datasets ships (`datasets/imagenet2012/validation_labels.txt`: the wnid of each file in sorted
  name order).
- The class order is the sorted wnids, which is the standard ImageNet label order (tensorflow_datasets'
  `labels.txt`, torchvision's ImageFolder, the released LlamaGen/NPP checkpoints); a train folder whose classes
  are not exactly the 1,000 standard wnids is refused, because label indices would not match checkpoints.

Ordering within a folder source follows torchvision's ImageFolder (the reference's dataset): classes are the
sorted sub-folder names; inside a class, `os.walk` (following links) in sorted order and sorted file names, so
index i here is index i of the reference's extraction. Hidden sub-folders (names starting with '.') are not
classes (ImageFolder would count e.g. `.ipynb_checkpoints`).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import importlib.util
import os
import pathlib
import re
import struct
from typing import Any, Iterator, NamedTuple, Sequence

import ml_collections
import numpy as np
from PIL import Image

from npp_jax import errors

# torchvision's IMG_EXTENSIONS, so a folder lists the same files (and indices) as the reference's ImageFolder.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
_SPLIT_FOLDER_NAMES = {"train", "val", "valid", "validation", "test"}
_WNID = re.compile(r"n\d{8}")


class UnreadableImageError(OSError):
  """An image file that exists but cannot be decoded; the example is skipped, never fatal."""


class Example(NamedTuple):
  index: int
  image: Image.Image | np.ndarray
  label: int


class Source:
  """Base class: `__len__`, `label(i)`, `load(i)`, `class_names`, `describe()`; iteration skips unreadable files."""

  class_names: list[str]

  def __len__(self) -> int:
    raise NotImplementedError

  def label(self, index: int) -> int:
    raise NotImplementedError

  def load(self, index: int) -> Image.Image | np.ndarray:
    """Decodes example `index`; raises UnreadableImageError if its file is corrupt."""
    raise NotImplementedError

  def describe(self) -> dict[str, Any]:
    raise NotImplementedError

  def fingerprint(self) -> str:
    """A hash of what the source lists (files and labels), so a resumed run can tell the data changed."""
    raise NotImplementedError

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def __iter__(self) -> Iterator[Example]:
    """(index, image, label) in index order; unreadable files are left out (their indices are not reused)."""
    for index in range(len(self)):
      try:
        yield Example(index, self.load(index), self.label(index))
      except UnreadableImageError:
        continue


def _open_image(path: str) -> Image.Image:
  """Decodes a whole file to RGB (as torchvision's pil_loader), so truncated files fail here, not later."""
  try:
    with open(path, "rb") as f:
      image = Image.open(f)
      return image.convert("RGB")
  except FileNotFoundError:
    raise
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise UnreadableImageError(f"cannot decode {path}: {e}") from None


def _is_image_file(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS)


def _require_dir(path: str | os.PathLike, what: str) -> pathlib.Path:
  if not str(path).strip():
    raise errors.InvalidInput(f"no {what} directory given (set --config.data.dir)")
  path = pathlib.Path(os.path.expanduser(str(path)))
  if not path.is_dir():
    raise FileNotFoundError(f"{what} directory {path} does not exist")
  return path


def read_class_order(path: str | os.PathLike) -> list[str]:
  """Class names, one per line (blank lines and surrounding spaces ignored)."""
  path = pathlib.Path(os.path.expanduser(str(path)))
  if not path.is_file():
    raise FileNotFoundError(f"class order file {path} does not exist")
  names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
  if len(set(names)) != len(names):
    dup = sorted({n for n in names if names.count(n) > 1})
    raise errors.InvalidInput(f"class order file {path} lists {', '.join(dup[:5])} more than once")
  return names


def check_class_order(found: Sequence[str], expected: Sequence[str], *, where: str, expected_from: str) -> None:
  """Raises ValueError unless `found` (sorted folder names) equals `expected` exactly, naming the difference."""
  found, expected = list(found), list(expected)
  if found == expected:
    return
  found_set, expected_set = set(found), set(expected)
  missing = [c for c in expected if c not in found_set]
  extra = [c for c in found if c not in expected_set]
  if missing or extra:
    parts = []
    if missing:
      parts.append(f"{len(missing)} missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    if extra:
      parts.append(f"{len(extra)} not in the list ({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''})")
    raise errors.InvalidInput(f"the classes in {where} do not match {expected_from}: " + " and ".join(parts))
  first = next(i for i, (a, b) in enumerate(zip(found, expected)) if a != b)
  raise errors.InvalidInput(f"the classes in {where} sorted by name are in a different order from {expected_from} "
                            f"(label {first} would be {found[first]!r}, the list says {expected[first]!r}); labels "
                            "follow sorted folder names as in torchvision's ImageFolder, so these images would be "
                            "mislabelled")


class ImageFolderSource(Source):
  """Images in `root/<class>/...` (torchvision ImageFolder order); class = sub-folder.

  Args:
    root: the folder holding one sub-folder per class.
    class_order: optional path to a file with one class name per line; the folder's classes sorted by name must
      equal it exactly (same names, same order), otherwise a ValueError names the difference.
    allow_empty_classes: keep a class folder without images (its label exists but has no examples) instead of
      raising. Off by default, as in ImageFolder: an empty class usually means a broken copy.
  """

  def __init__(self, root: str | os.PathLike, class_order: str | os.PathLike | None = None, *,
               allow_empty_classes: bool = False, _kind: str = "folder", _what: str = "image folder"):
    self.root = _require_dir(root, _what)
    self._kind = _kind
    self.class_order_file = str(class_order) if class_order else ""
    classes = sorted(e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
      raise errors.InvalidInput(f"{self.root} has no class sub-folders; an image folder needs one folder per class")
    if set(classes) <= _SPLIT_FOLDER_NAMES:
      raise errors.InvalidInput(f"{self.root} holds split folders ({', '.join(classes)}), not class folders; point "
                                "data.dir at one split (e.g. .../train) or use data.source='imagenet' with data.split")
    if class_order:
      check_class_order(classes, read_class_order(class_order), where=str(self.root),
                        expected_from=f"class order file {class_order}")
    self.class_names = classes
    self.paths: list[str] = []
    labels: list[int] = []
    self.ignored_files: list[str] = []
    for label, name in enumerate(classes):
      files, ignored = _scan_class_folder(self.root / name)
      self.ignored_files += ignored
      if not files and not allow_empty_classes:
        raise errors.InvalidInput(f"class folder {self.root / name} has no image files "
                                  f"({', '.join(IMAGE_EXTENSIONS)}); remove it or set data.allow_empty_classes=True")
      self.paths += files
      labels += [label] * len(files)
    self.labels = np.asarray(labels, dtype=np.int32)

  def __len__(self) -> int:
    return len(self.paths)

  def label(self, index: int) -> int:
    return int(self.labels[index])

  def load(self, index: int) -> Image.Image:
    return _open_image(self.paths[index])

  def path(self, index: int) -> str:
    return self.paths[index]

  def fingerprint(self) -> str:
    h = hashlib.sha256()
    for path, label in zip(self.paths, self.labels.tolist()):
      h.update(f"{label}\t{os.path.relpath(path, self.root)}\n".encode())
    return h.hexdigest()

  def describe(self) -> dict[str, Any]:
    return {"kind": self._kind, "dir": str(self.root), "num_files": len(self), "num_classes": self.num_classes,
            "class_order": self.class_order_file, "ignored_files": len(self.ignored_files),
            "fingerprint": self.fingerprint()}


def _scan_class_folder(folder: pathlib.Path) -> tuple[list[str], list[str]]:
  """(image files, other files) under `folder`, recursively, in ImageFolder's order."""
  files, ignored = [], []
  for dirpath, _, names in sorted(os.walk(folder, followlinks=True)):
    for name in sorted(names):
      (files if _is_image_file(name) else ignored).append(os.path.join(dirpath, name))
  return files, ignored


def _tfds_imagenet_file(name: str) -> pathlib.Path | None:
  """A label file shipped inside tensorflow_datasets (found without importing it, which is slow)."""
  spec = importlib.util.find_spec("tensorflow_datasets")
  if spec is None or not spec.submodule_search_locations:
    return None
  path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "datasets" / "imagenet2012" / name
  return path if path.is_file() else None


def standard_imagenet_classes() -> list[str] | None:
  """The 1,000 ImageNet-1k wnids in the standard label order (sorted), or None if the list is not installed."""
  path = _tfds_imagenet_file("labels.txt")
  return path.read_text().split() if path else None


class ImageNetSource(ImageFolderSource):
  """ImageNet-1k from its extracted files (see the module docstring for the layouts and why not tfds)."""

  def __init__(self, root: str | os.PathLike, split: str = "train"):
    root = _require_dir(root, "ImageNet")
    split = {"validation": "val"}.get(split, split)
    if split not in ("train", "val"):
      raise errors.InvalidInput(f"ImageNet split must be 'train' or 'val', got {split!r}")
    split_dir = root / split
    if not split_dir.is_dir():
      hint = ""
      if (root / f"ILSVRC2012_img_{split}.tar").is_file():
        hint = f"; extract ILSVRC2012_img_{split}.tar into {split_dir} first (train: one folder per class tar)"
      elif any(_WNID.fullmatch(e.name) for e in os.scandir(root) if e.is_dir()):
        hint = f"; {root} holds class folders itself: point data.dir at the folder above it"
      raise FileNotFoundError(f"ImageNet {split} folder {split_dir} does not exist{hint}")
    self.split = split
    self._flat_val_labels: list[int] | None = None
    class_dirs = [e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith(".")]
    standard = standard_imagenet_classes()
    if class_dirs:
      expected = standard or sorted(class_dirs)
      if standard is None and (len(class_dirs) != 1000 or not all(_WNID.fullmatch(c) for c in class_dirs)):
        raise errors.InvalidInput(f"the class folders in {split_dir} are not the 1,000 ImageNet wnids (e.g. "
                                  "n01440764); use data.source='folder' for other data")
      check_class_order(sorted(class_dirs), expected, where=str(split_dir),
                        expected_from="the 1,000 standard ImageNet-1k classes")
      super().__init__(split_dir, _kind="imagenet", _what="ImageNet")
    else:
      self._init_flat_val(root, split_dir, standard)

  def _init_flat_val(self, root: pathlib.Path, split_dir: pathlib.Path, standard: list[str] | None) -> None:
    if self.split != "val":
      raise errors.InvalidInput(f"ImageNet train folder {split_dir} has no class folders")
    self.root, self._kind, self.class_order_file = split_dir, "imagenet", ""
    names = sorted(e.name for e in os.scandir(split_dir) if e.is_file())
    files = [n for n in names if _is_image_file(n)]
    self.ignored_files = [str(split_dir / n) for n in names if not _is_image_file(n)]
    if not files:
      raise errors.InvalidInput(f"ImageNet val folder {split_dir} has neither class folders nor images")
    wnids = _flat_val_wnids(root, files)
    classes = standard or sorted(set(wnids))
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(wnids) - set(index))
    if unknown:
      raise errors.InvalidInput(f"the ImageNet val labels name classes outside ImageNet-1k: {', '.join(unknown[:3])}")
    self.class_names = classes
    self.paths = [str(split_dir / f) for f in files]
    self.labels = np.asarray([index[w] for w in wnids], dtype=np.int32)

  def describe(self) -> dict[str, Any]:
    return {**super().describe(), "split": self.split}


def _flat_val_wnids(root: pathlib.Path, files: list[str]) -> list[str]:
  """The wnid of every flat val file, from LOC_val_solution.csv or tfds' validation label list."""
  for folder in [root, *list(root.parents)[:3]]:
    csv_path = folder / "LOC_val_solution.csv"
    if csv_path.is_file():
      with open(csv_path, newline="") as f:
        table = {row["ImageId"]: row["PredictionString"].split()[0] for row in csv.DictReader(f)}
      missing = [f for f in files if os.path.splitext(f)[0] not in table]
      if missing:
        raise errors.InvalidInput(f"{csv_path} has no label for {len(missing)} val images (e.g. {missing[0]})")
      return [table[os.path.splitext(f)[0]] for f in files]
  original = [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, 50001)]
  tfds_labels = _tfds_imagenet_file("validation_labels.txt")
  if files == original and tfds_labels is not None:
    return tfds_labels.read_text().split()
  raise FileNotFoundError(f"no labels for the flat ImageNet val folder {root / 'val'}: put Kaggle's "
                          "LOC_val_solution.csv beside it, sort the images into class folders, or keep the 50,000 "
                          "original ILSVRC2012_val_*.JPEG names (labelled by tensorflow_datasets' list)")


# --- Fashion-MNIST -------------------------------------------------------------------------------------------

_IDX_MAGIC = {"images": 0x00000803, "labels": 0x00000801}  # unsigned bytes, 3 or 1 dimensions
_IDX_PREFIX = {"train": "train", "test": "t10k"}


def _read_idx(path: pathlib.Path, kind: str) -> np.ndarray:
  """One IDX file (raw or gzip) as a uint8 array, checking its magic number and size."""
  opener = gzip.open if path.suffix == ".gz" else open
  try:
    with opener(path, "rb") as f:
      data = f.read()
  except (OSError, EOFError) as e:
    raise errors.InvalidInput(f"cannot read {path}: {e}") from None
  ndim = 3 if kind == "images" else 1
  header = 4 + 4 * ndim
  if len(data) < header:
    raise errors.InvalidInput(f"{path} is too short to be an IDX {kind} file ({len(data)} bytes)")
  (magic,) = struct.unpack(">I", data[:4])
  if magic != _IDX_MAGIC[kind]:
    raise errors.InvalidInput(f"{path} has magic number {magic:#010x}, expected {_IDX_MAGIC[kind]:#010x} for "
                              f"IDX {kind}")
  dims = struct.unpack(f">{ndim}I", data[4:header])
  size = int(np.prod(dims))
  if len(data) - header != size:
    raise errors.InvalidInput(f"{path} holds {len(data) - header} bytes of data, its header {dims} promises {size}")
  return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _idx_path(directory: pathlib.Path, stem: str) -> pathlib.Path:
  for name in (stem + ".gz", stem):
    if (directory / name).is_file():
      return directory / name
  raise FileNotFoundError(f"Fashion-MNIST file {stem}(.gz) not found in {directory}")


def load_fashion_mnist(directory: str | os.PathLike = FASHION_MNIST_DIR, split: str = "train"
                       ) -> tuple[np.ndarray, np.ndarray]:
  """Fashion-MNIST from its IDX files: (uint8 images (N, 28, 28), int64 labels (N,))."""
  if split not in _IDX_PREFIX:
    raise errors.InvalidInput(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
  directory = pathlib.Path(os.path.expanduser(str(directory)))
  if not directory.is_dir():
    raise FileNotFoundError(f"Fashion-MNIST directory {directory} does not exist; install it with "
                            "`apt-get install dataset-fashion-mnist` or set --config.data.dir")
  prefix = _IDX_PREFIX[split]
  images = _read_idx(_idx_path(directory, f"{prefix}-images-idx3-ubyte"), "images")
  labels = _read_idx(_idx_path(directory, f"{prefix}-labels-idx1-ubyte"), "labels")
  if len(images) != len(labels):
    raise errors.InvalidInput(f"Fashion-MNIST {split} in {directory} has {len(images)} images but {len(labels)} labels")
  if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
    raise errors.InvalidInput(f"Fashion-MNIST {split} labels go up to {labels.max()}, expected 0..9")
  return images, labels.astype(np.int64)


class FashionMnistSource(Source):
  """Fashion-MNIST (28x28 grayscale, 10 classes) from the standard IDX files; yields uint8 (28, 28) arrays."""

  def __init__(self, directory: str | os.PathLike = FASHION_MNIST_DIR, split: str = "train"):
    self.dir, self.split = str(directory), split
    self.images, self.labels = load_fashion_mnist(directory, split)
    self.class_names = list(FASHION_MNIST_CLASSES)

  def __len__(self) -> int:
    return len(self.images)

  def label(self, index: int) -> int:
    return int(self.labels[index])

  def load(self, index: int) -> np.ndarray:
    return self.images[index]

  def fingerprint(self) -> str:
    return hashlib.sha256(self.images.tobytes() + self.labels.tobytes()).hexdigest()

  def describe(self) -> dict[str, Any]:
    return {"kind": "fashion_mnist", "dir": self.dir, "split": self.split, "num_files": len(self),
            "num_classes": self.num_classes, "fingerprint": self.fingerprint()}


# --- config ----------------------------------------------------------------------------------------------------

SOURCES = ("imagenet", "folder", "fashion_mnist")


def default_data_config():
  """The `data` section `python -m npp_jax.prepare` reads (override what differs in a config file)."""
  d = ml_collections.ConfigDict()
  d.source = "folder"  # imagenet | folder | fashion_mnist
  d.dir = ""
  d.split = "train"  # imagenet: train | val; fashion_mnist: train | test
  d.class_order = ""  # folder: a file of class names, one per line, the folder must match exactly
  d.allow_empty_classes = False
  # tencrop | flip | none | pad | pad_flip. Fashion-MNIST: 'pad', not 'pad_flip': its shoes all face left.
  d.augmentation = "tencrop"
  d.image_size = 0  # 0: the tokenizer's vq.image_size (prepare refuses a different non-zero value)
  d.crop_range = 1.1
  d.extra_crop_range = 0.0  # e.g. 1.05: 10 more views (20 in all) with tencrop
  d.pad_value = 0  # pad / pad_flip background (0 = black, Fashion-MNIST's)
  d.shard_size = 10000  # images per shard
  d.encode_batch_size = 256  # views per encoder call (rounded up to a multiple of the local device count)
  d.num_threads = 0  # image decoding threads; 0 = os.cpu_count()
  return d


def make_source(data_cfg) -> Source:
  """The source named by the config's `data` section (fields as in `default_data_config`)."""
  kind = data_cfg.get("source", "folder")
  directory = data_cfg.get("dir", "")
  split = data_cfg.get("split", "train")
  if kind == "imagenet":
    return ImageNetSource(directory, split)
  if kind == "folder":
    return ImageFolderSource(directory, data_cfg.get("class_order", "") or None,
                             allow_empty_classes=bool(data_cfg.get("allow_empty_classes", False)))
  if kind == "fashion_mnist":
    return FashionMnistSource(directory or FASHION_MNIST_DIR, split)
  raise errors.InvalidInput(f"unknown data.source {kind!r}; choose one of {', '.join(SOURCES)}")
