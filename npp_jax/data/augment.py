"""The reference's image preprocessing and the augmentation views stored with each image's codes.

LlamaGen/NPP extract codes with `autoregressive/train/extract_codes_c2i.py`:

- `--ten-crop`: ADM `center_crop_arr` to int(image_size * crop_range) pixels (crop_range 1.1 => 281 for 256), then
  torchvision `TenCrop(image_size)`: the four corners and the centre, then the same five of the horizontally
  flipped image (10 views). A second set at crop_range 1.05 doubles this to 20 views.
- otherwise: `center_crop_arr` to image_size and its horizontal flip (2 views).

Everything here works on uint8 HWC RGB numpy arrays; the [-1, 1] normalisation happens next to the encoder.
Extra augmentations for small images that should not be resampled (Fashion-MNIST 28x28 into a 32x32 tokenizer):
`pad` (centred padding, 1 view) and `pad_flip` (2 views).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from npp_jax import errors

# name -> views per crop range (tencrop doubles with an extra crop range)
AUGMENTATIONS = {"tencrop": 10, "flip": 2, "none": 1, "pad": 1, "pad_flip": 2}


def to_rgb_image(image: Image.Image | np.ndarray) -> Image.Image:
  """A PIL RGB image from a PIL image of any mode or a uint8 array (H, W), (H, W, 1) or (H, W, 3).

  Grayscale is replicated over the three channels, as PIL's convert('RGB') (what torchvision's ImageFolder
  loader calls) does.
  """
  if isinstance(image, Image.Image):
    return image if image.mode == "RGB" else image.convert("RGB")
  return Image.fromarray(to_rgb_array(image))


def to_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
  """A uint8 (H, W, 3) array from a PIL image or a uint8 array (H, W), (H, W, 1) or (H, W, 3)."""
  if isinstance(image, Image.Image):
    return np.asarray(to_rgb_image(image))
  arr = np.asarray(image)
  if arr.dtype != np.uint8:
    raise errors.InvalidInput(f"image arrays must be uint8, got {arr.dtype}")
  if arr.ndim == 3 and arr.shape[-1] == 1:
    arr = arr[..., 0]
  if arr.ndim == 2:
    arr = np.repeat(arr[..., None], 3, axis=-1)
  if arr.ndim != 3 or arr.shape[-1] != 3:
    raise errors.InvalidInput(f"image arrays must be (H, W), (H, W, 1) or (H, W, 3), got shape {arr.shape}")
  return arr


def center_crop_arr(pil_image: Image.Image | np.ndarray, image_size: int) -> np.ndarray:
  """ADM's centre crop (as LlamaGen's dataset/augmentation.py): uint8 (image_size, image_size, 3).

  Halves the image with a BOX filter while its short side is at least 2 * image_size (cheap anti-aliasing),
  resizes with BICUBIC so the short side is image_size (other side rounded), then crops the centre with floor
  offsets.
  """
  image = to_rgb_image(pil_image)
  while min(image.size) >= 2 * image_size:
    image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
  scale = image_size / min(image.size)
  image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
  arr = np.asarray(image)
  top = (arr.shape[0] - image_size) // 2
  left = (arr.shape[1] - image_size) // 2
  return np.ascontiguousarray(arr[top:top + image_size, left:left + image_size])


def _center_offset(length: int, size: int) -> int:
  # torchvision's center_crop: int(round(...)) with Python's round (ties to even: 12.5 -> 12 for 281 -> 256).
  return int(round((length - size) / 2.0))


def five_crop(arr: np.ndarray, size: int) -> np.ndarray:
  """torchvision's five_crop order: top-left, top-right, bottom-left, bottom-right, centre. (5, size, size, C)."""
  height, width = arr.shape[:2]
  if size > height or size > width:
    raise errors.InvalidInput(f"crop size {size} is larger than the image ({height}x{width})")
  origins = [(0, 0), (0, width - size), (height - size, 0), (height - size, width - size),
             (_center_offset(height, size), _center_offset(width, size))]
  return np.stack([arr[top:top + size, left:left + size] for top, left in origins])


def ten_crop(arr: np.ndarray, size: int) -> np.ndarray:
  """torchvision's TenCrop: the five crops, then the five crops of the horizontally flipped image."""
  return np.concatenate([five_crop(arr, size), five_crop(arr[:, ::-1], size)])


def pad_to(arr: np.ndarray, size: int, value: int = 0) -> np.ndarray:
  """Centres `arr` (H, W, C) on a size x size canvas filled with `value` (the extra pixel goes right/bottom)."""
  height, width = arr.shape[:2]
  if height > size or width > size:
    raise errors.InvalidInput(f"augmentation 'pad' needs images no larger than image_size={size}, got "
                              f"{height}x{width}; use 'none' or 'flip' to crop instead")
  top, left = (size - height) // 2, (size - width) // 2
  out = np.full((size, size, arr.shape[2]), value, dtype=arr.dtype)
  out[top:top + height, left:left + width] = arr
  return out


def num_views(augmentation: str, extra_crop_range: float = 0.0) -> int:
  """How many views `make_views` returns per image."""
  check_augmentation(augmentation, extra_crop_range)
  views = AUGMENTATIONS[augmentation]
  return 2 * views if augmentation == "tencrop" and extra_crop_range else views


def check_augmentation(augmentation: str, extra_crop_range: float = 0.0, crop_range: float = 1.1) -> None:
  """Raises ValueError with one sentence when the augmentation settings are not usable."""
  if augmentation not in AUGMENTATIONS:
    raise errors.InvalidInput(f"unknown augmentation {augmentation!r}; choose one of {sorted(AUGMENTATIONS)}")
  if augmentation == "tencrop":
    for name, value in (("crop_range", crop_range), ("extra_crop_range", extra_crop_range)):
      if value and value < 1.0:
        raise errors.InvalidInput(f"{name}={value} must be at least 1.0 (the ten crops are cut from a larger centre "
                                  "crop)")
  elif extra_crop_range:
    raise errors.InvalidInput(f"extra_crop_range applies only to augmentation 'tencrop', not {augmentation!r}")


def make_views(image: Image.Image | np.ndarray, augmentation: str, image_size: int, extra_crop_range: float = 0.0,
               *, crop_range: float = 1.1, pad_value: int = 0) -> np.ndarray:
  """All stored views of one image: uint8 (V, image_size, image_size, 3).

  tencrop: 10 views of a centre crop at int(image_size * crop_range); with extra_crop_range, 10 more at
  int(image_size * extra_crop_range) (20 in all, first the crop_range set). flip: centre crop and its mirror.
  none: the centre crop. pad / pad_flip: the image centred on an image_size canvas of `pad_value` (+ mirror).
  """
  check_augmentation(augmentation, extra_crop_range, crop_range)
  if augmentation == "tencrop":
    ranges = [crop_range] + ([extra_crop_range] if extra_crop_range else [])
    rgb = to_rgb_image(image)
    return np.concatenate([ten_crop(center_crop_arr(rgb, int(image_size * r)), image_size) for r in ranges])
  if augmentation in ("pad", "pad_flip"):
    view = pad_to(to_rgb_array(image), image_size, pad_value)
  else:
    view = center_crop_arr(image, image_size)
  if augmentation in ("flip", "pad_flip"):
    return np.stack([view, view[:, ::-1]])
  return view[None]
