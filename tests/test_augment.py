"""The reference's crops: ADM center_crop_arr, torchvision TenCrop geometry and order, and the view sets."""

import numpy as np
import pytest
from PIL import Image

from npp_jax.data import augment


def coordinate_image(height: int, width: int) -> np.ndarray:
  """uint8 (H, W, 3) whose red channel is the row and green channel the column of each pixel."""
  rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  return np.stack([rows, cols, np.full_like(rows, 7)], axis=-1).astype(np.uint8)


def origin(view: np.ndarray) -> tuple[int, int]:
  return int(view[0, 0, 0]), int(view[0, 0, 1])


def test_ten_crop_origins_order_and_flips():
  height, width, size = 37, 43, 32
  views = augment.ten_crop(coordinate_image(height, width), size)
  assert views.shape == (10, size, size, 3)
  # torchvision's centre: int(round((37-32)/2)) = round(2.5) = 2 (ties to even), int(round(5.5)) = 6.
  expected = [(0, 0), (0, 11), (5, 0), (5, 11), (2, 6)]
  assert [origin(v) for v in views[:5]] == expected
  for view, (top, left) in zip(views[:5], expected):  # every pixel, not just the corner
    np.testing.assert_array_equal(view[..., 0], np.arange(top, top + size)[:, None].repeat(size, 1))
    np.testing.assert_array_equal(view[..., 1], np.arange(left, left + size)[None, :].repeat(size, 0))
  # The last five are the same five crops of the mirrored image: its column c is the original's column W-1-c.
  for view, (top, left) in zip(views[5:], expected):
    assert int(view[0, 0, 0]) == top
    np.testing.assert_array_equal(view[0, :, 1], width - 1 - np.arange(left, left + size))


def test_center_offset_of_the_281_crop_rounds_half_to_even():
  views = augment.ten_crop(coordinate_image(281, 281), 256)
  assert origin(views[4]) == (12, 12)  # round(12.5) == 12 in Python and in torchvision


def test_ten_crop_rejects_a_crop_larger_than_the_image():
  with pytest.raises(ValueError, match="larger than the image"):
    augment.ten_crop(coordinate_image(20, 40), 32)


def test_center_crop_arr_box_halving_then_bicubic():
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (700, 1100, 3), dtype=np.uint8)
  got = augment.center_crop_arr(Image.fromarray(pixels), 64)
  # By hand: min side 700 >= 128 -> halve to 550x350 -> 275x175 -> 137x87 (87 < 128 stops);
  # bicubic to round(137 * 64 / 87) = 101 by 64; crop columns from (101 - 64) // 2 = 18.
  expected = Image.fromarray(pixels)
  for size in [(550, 350), (275, 175), (137, 87)]:
    expected = expected.resize(size, resample=Image.BOX)
  expected = np.asarray(expected.resize((101, 64), resample=Image.BICUBIC))[:, 18:82]
  assert got.dtype == np.uint8 and got.shape == (64, 64, 3)
  np.testing.assert_array_equal(got, expected)


def test_center_crop_arr_upscales_small_images_and_crops_floor():
  pixels = np.random.default_rng(1).integers(0, 256, (20, 31, 3), dtype=np.uint8)
  got = augment.center_crop_arr(pixels, 32)
  # short side 20 -> 32: (round(31 * 1.6) = 50, 32); left offset (50 - 32) // 2 = 9.
  expected = np.asarray(Image.fromarray(pixels).resize((50, 32), resample=Image.BICUBIC))[:, 9:41]
  np.testing.assert_array_equal(got, expected)


def test_tencrop_views_use_int_of_scaled_size_and_the_second_crop_range():
  image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (50, 70, 3), dtype=np.uint8))
  views = augment.make_views(image, "tencrop", 32, extra_crop_range=1.05)
  assert views.shape == (20, 32, 32, 3) and augment.num_views("tencrop", 1.05) == 20
  # int(32 * 1.1) = 35, int(32 * 1.05) = 33, as the reference's int(image_size * crop_range).
  np.testing.assert_array_equal(views[:10], augment.ten_crop(augment.center_crop_arr(image, 35), 32))
  np.testing.assert_array_equal(views[10:], augment.ten_crop(augment.center_crop_arr(image, 33), 32))
  assert not np.array_equal(views[:10], views[10:])
  only = augment.make_views(image, "tencrop", 32)
  assert only.shape[0] == 10 and augment.num_views("tencrop") == 10
  np.testing.assert_array_equal(only, views[:10])


def test_flip_none_and_grayscale():
  gray = np.random.default_rng(3).integers(0, 256, (40, 48), dtype=np.uint8)
  flip = augment.make_views(gray, "flip", 32)
  crop = augment.center_crop_arr(Image.fromarray(gray).convert("RGB"), 32)
  assert flip.shape == (2, 32, 32, 3)
  np.testing.assert_array_equal(flip[0], crop)
  np.testing.assert_array_equal(flip[1], crop[:, ::-1])
  assert np.array_equal(flip[0][..., 0], flip[0][..., 2])  # grey replicated over RGB
  none = augment.make_views(Image.fromarray(gray, mode="L"), "none", 32)
  np.testing.assert_array_equal(none, crop[None])


def test_pad_and_pad_flip_center_the_image_on_black():
  image = np.random.default_rng(4).integers(1, 256, (28, 28), dtype=np.uint8)
  views = augment.make_views(image, "pad_flip", 32)
  assert views.shape == (2, 32, 32, 3)
  np.testing.assert_array_equal(views[0, 2:30, 2:30, 1], image)
  assert views[0, :2].max() == 0 and views[0, 30:].max() == 0 and views[0, :, :2].max() == 0
  np.testing.assert_array_equal(views[1], views[0][:, ::-1])
  np.testing.assert_array_equal(augment.make_views(image, "pad", 32), views[:1])
  grey_bg = augment.make_views(image, "pad", 32, pad_value=255)
  assert grey_bg[0, 0, 0, 0] == 255
  with pytest.raises(ValueError, match="no larger than image_size"):
    augment.make_views(np.zeros((40, 40), np.uint8), "pad", 32)


@pytest.mark.parametrize("augmentation, extra, crop, message", [
    ("random", 0.0, 1.1, "unknown augmentation"),
    ("flip", 1.05, 1.1, "only to augmentation 'tencrop'"),
    ("tencrop", 0.0, 0.9, "crop_range=0.9 must be at least 1.0"),
])
def test_bad_augmentation_settings(augmentation, extra, crop, message):
  with pytest.raises(ValueError, match=message):
    augment.make_views(np.zeros((40, 40), np.uint8), augmentation, 32, extra, crop_range=crop)
