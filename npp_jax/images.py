"""Generated images on disk: float -> uint8, PNG files, grids, and ADM-style `samples.npz` files."""

from __future__ import annotations

import io
import math
import os
import zipfile
from typing import Any, Iterable

import numpy as np
from PIL import Image

from npp_jax import errors
from npp_jax import fileio

PathLike = str | os.PathLike


def to_uint8(images: Any) -> np.ndarray:
  """NHWC float images in [-1, 1] -> uint8 by the reference's `clamp(127.5 * x + 128, 0, 255)`, truncated."""
  x = np.asarray(images, dtype=np.float32)
  return np.clip(np.float32(127.5) * x + np.float32(128.0), 0, 255).astype(np.uint8)


def save_png(path: PathLike | io.BytesIO, image: np.ndarray) -> None:
  """Writes one uint8 (H, W, 3) image (to a path, or as PNG to a buffer)."""
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3:
    raise errors.InvalidInput(f"save_png needs a uint8 (H, W, C) image, got {image.dtype} {image.shape}")
  Image.fromarray(image).save(path, format="PNG")


def png_bytes(image: np.ndarray) -> bytes:
  """One uint8 (H, W, 3) image as the bytes of a PNG file."""
  buffer = io.BytesIO()
  save_png(buffer, image)
  return buffer.getvalue()


def load_png(path: PathLike) -> np.ndarray:
  with Image.open(path) as img:
    return np.asarray(img.convert("RGB"))


def make_grid(images: np.ndarray, rows: int, *, pad: int = 0) -> np.ndarray:
  """uint8 (N, H, W, C) -> one uint8 image of `rows` rows and ceil(N / rows) columns, filled row by row.

  Empty cells and the `pad` pixels between cells are black.
  """
  images = np.asarray(images)
  n, h, w, c = images.shape
  if not 1 <= rows <= n:
    raise errors.InvalidInput(f"a grid of {n} images needs between 1 and {n} rows, got {rows}")
  cols = math.ceil(n / rows)
  grid = np.zeros((rows * (h + pad) - pad, cols * (w + pad) - pad, c), images.dtype)
  for i, img in enumerate(images):
    r, col = divmod(i, cols)
    grid[r * (h + pad): r * (h + pad) + h, col * (w + pad): col * (w + pad) + w] = img
  return grid


def square_grid(images: np.ndarray, *, pad: int = 2) -> np.ndarray:
  """uint8 (N, H, W, C) -> the most nearly square grid, ceil(sqrt(N)) columns, cells `pad` black pixels apart."""
  cols = math.ceil(math.sqrt(len(images)))
  return make_grid(images, math.ceil(len(images) / cols), pad=pad)


def save_samples_npz(path: PathLike, images: np.ndarray | Iterable[np.ndarray], labels: Any, **settings: Any) -> None:
  """Writes an ADM-style sample file: `arr_0` (N, H, W, 3) uint8, `labels` (N,), and each setting as a 0-d array.

  `images` is the full uint8 array or an iterable of uint8 (n_i, H, W, 3) chunks that add up to N = len(labels);
  chunks are streamed into the file, so 50k images need not sit in memory at once. None settings are stored as ''.
  The file appears only once complete.
  """
  labels = np.asarray(labels)
  clash = {"arr_0", "labels"} & set(settings)
  if clash:
    raise errors.InvalidInput(f"setting names {sorted(clash)} clash with the arrays of the sample file")
  chunks = [images] if isinstance(images, np.ndarray) else images

  def write(tmp: str) -> None:
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
      with archive.open("arr_0.npy", "w", force_zip64=True) as f:
        count, header = 0, None
        for chunk in chunks:
          chunk = np.ascontiguousarray(chunk)
          if chunk.dtype != np.uint8 or chunk.ndim != 4:
            raise errors.InvalidInput(f"sample images must be uint8 (N, H, W, C), got {chunk.dtype} {chunk.shape}")
          if header is None:
            header = chunk.shape[1:]
            np.lib.format.write_array_header_1_0(
                f, {"descr": "|u1", "fortran_order": False, "shape": (len(labels), *header)})
          elif chunk.shape[1:] != header:
            raise errors.InvalidInput(f"sample images change shape from {header} to {chunk.shape[1:]}")
          count += chunk.shape[0]
          if count > len(labels):
            break
          f.write(chunk.tobytes())
        if count != len(labels):
          raise errors.InvalidInput(f"{count} sample images for {len(labels)} labels")
      arrays = {"labels": labels, **{k: np.asarray("" if v is None else v) for k, v in settings.items()}}
      for name, array in arrays.items():
        with archive.open(f"{name}.npy", "w", force_zip64=True) as f:
          np.lib.format.write_array(f, array, allow_pickle=False)

  fileio.write_atomically(path, write)
