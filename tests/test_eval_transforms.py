"""Tests for mambaeye_jax.data.eval_transforms."""

import numpy as np
import pytest
from PIL import Image

from mambaeye_jax.data import eval_transforms as et
from mambaeye_jax.data.geometry import ImageBox


# The tests comparing pixels with PIL LANCZOS check the reference resampler,
# the official pixels; test_eval_resamplers compares the fast one with it.
REF = "reference"


def _image(height, width, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (height, width, 3),
                                              dtype=np.uint8)


def _lanczos(image, width, height):
  return np.asarray(Image.fromarray(image).resize((width, height),
                                                  Image.Resampling.LANCZOS))


def _check_paste(canvas, box, content):
  """Canvas holds `content` exactly at `box` and zeros elsewhere."""
  top, left, height, width = box
  np.testing.assert_array_equal(canvas[top:top + height, left:left + width],
                                content)
  outside = canvas.copy()
  outside[top:top + height, left:left + width] = 0
  assert not outside.any()


def test_none_without_size_uses_the_longer_side_unresampled():
  image = _image(30, 50)
  canvas, box = et.eval_canvas(image, "none")
  assert canvas.shape == (50, 50, 3) and canvas.dtype == np.uint8
  assert box == ImageBox(10, 0, 30, 50)
  _check_paste(canvas, box, image)


def test_none_keeps_small_images_and_centres_them_with_floor():
  image = _image(31, 50)
  canvas, box = et.eval_canvas(image, "none", 64)
  assert canvas.shape == (64, 64, 3)
  assert box == ImageBox((64 - 31) // 2, (64 - 50) // 2, 31, 50) == \
      ImageBox(16, 7, 31, 50)
  _check_paste(canvas, box, image)


def test_none_shrinks_images_larger_than_the_canvas():
  image = _image(100, 200)
  canvas, box = et.eval_canvas(image, "none", 64, resampler=REF)
  # ratio = min(64/200, 64/100) = 0.32 -> 64 x 32, LANCZOS.
  assert box == ImageBox(16, 0, 32, 64)
  _check_paste(canvas, box, _lanczos(image, 64, 32))


def test_fit_enlarges_with_lanczos_and_truncates_like_the_official_code():
  image = _image(30, 50)
  canvas, box = et.eval_canvas(image, "fit", 64, resampler=REF)
  # ratio = 1.28 -> width 64, height int(38.4) = 38.
  assert box == ImageBox(13, 0, 38, 64)
  _check_paste(canvas, box, _lanczos(image, 64, 38))
  # Float truncation: 49 * (64 / 49) = 63.99999... -> 63, not 64.
  _, box = et.eval_canvas(_image(40, 49), "fit", 64)
  assert (box.height, box.width) == (52, 63)


@pytest.mark.parametrize("resampler", et.RESAMPLERS)
def test_fit_on_a_large_image_matches_with_or_without_the_shrink(resampler):
  image = _image(90, 150)
  a, box_a = et.eval_canvas(image, "fit", 64, resampler=resampler)
  b, box_b = et.eval_canvas(image, "fit", 64, shrink_first=False, resampler=resampler)
  assert box_a == box_b == ImageBox(13, 0, 38, 64)
  np.testing.assert_array_equal(a, b)


def test_full_stretches_and_the_dataset_path_shrinks_first():
  image = _image(30, 50)
  canvas, box = et.eval_canvas(image, "full", 64, resampler=REF)
  assert box == ImageBox(0, 0, 64, 64)
  np.testing.assert_array_equal(canvas, _lanczos(image, 64, 64))
  # A large non-square image: the dataset path stretches its 64 x 32 shrunk
  # copy, the single-image path the original.
  big = _image(100, 200)
  dataset, _ = et.eval_canvas(big, "full", 64, resampler=REF)
  single, _ = et.eval_canvas(big, "full", 64, shrink_first=False, resampler=REF)
  np.testing.assert_array_equal(dataset, _lanczos(_lanczos(big, 64, 32), 64,
                                                  64))
  np.testing.assert_array_equal(single, _lanczos(big, 64, 64))
  assert not np.array_equal(dataset, single)


@pytest.mark.parametrize("resampler", et.RESAMPLERS)
def test_out_receives_the_canvas_and_loses_what_it_held(resampler):
  image = _image(30, 50)
  want, box = et.eval_canvas(image, "fit", 64, resampler=resampler)
  out = np.full((64, 64, 3), 7, np.uint8)  # A batch row's previous image.
  canvas, out_box = et.eval_canvas(image, "fit", 64, resampler=resampler, out=out)
  assert canvas is out and out_box == box
  np.testing.assert_array_equal(out, want)
  with pytest.raises(ValueError, match="not uint8"):
    et.eval_canvas(image, "fit", 64, out=np.zeros((48, 48, 3), np.uint8))


def test_canvas_of_exactly_one_patch():
  canvas, box = et.eval_canvas(_image(10, 16), "none", 16)
  assert canvas.shape == (16, 16, 3) and box == ImageBox(3, 0, 10, 16)


@pytest.mark.parametrize("convert", [
    lambda a: Image.fromarray(a[..., 0]),                    # PIL "L"
    lambda a: a[..., 0],                                      # (h, w)
    lambda a: a[..., :1],                                     # (h, w, 1)
    lambda a: Image.fromarray(a[..., 0]).convert("P"),       # palette
])
def test_grayscale_inputs_become_rgb(convert):
  gray = np.repeat(_image(20, 24)[..., :1], 3, axis=-1)
  canvas, box = et.eval_canvas(convert(gray), "none", 32)
  _check_paste(canvas, box, gray)


def test_rgba_drops_alpha_like_pil_convert():
  rgba = np.random.default_rng(1).integers(0, 256, (20, 24, 4), np.uint8)
  for source in (rgba, Image.fromarray(rgba, "RGBA")):
    canvas, box = et.eval_canvas(source, "none", 32)
    _check_paste(canvas, box, rgba[..., :3])


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(mode="none", canvas_size=15), ValueError, "smaller than one"),
    (dict(mode="fit", canvas_size=8), ValueError, "smaller than one"),
    (dict(mode="stretch", canvas_size=64), ValueError, "unknown resize mode"),
    (dict(mode="fit"), ValueError, "needs a canvas_size"),
    (dict(mode="none", canvas_size=20, shrink_first=False), ValueError,
     "exceeds"),
    (dict(mode="fit", canvas_size=64, resampler="lanczos"), ValueError,
     "unknown resampler 'lanczos'; known resamplers: fast, reference"),
])
def test_bad_arguments(kwargs, error, match):
  with pytest.raises(error, match=match):
    et.eval_canvas(_image(30, 50), **kwargs)


def test_tiny_image_without_canvas_size_is_rejected():
  with pytest.raises(ValueError, match="smaller than one"):
    et.eval_canvas(_image(10, 12), "none")


def test_bad_arrays_are_rejected():
  with pytest.raises(TypeError, match="uint8"):
    et.to_rgb(np.zeros((8, 8, 3), np.float32))
  with pytest.raises(ValueError, match="shape"):
    et.to_rgb(np.zeros((8, 8, 2), np.uint8))
