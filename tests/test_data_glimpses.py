"""The canvas-free patch gather and the fast coverage ratio are exact."""

import numpy as np
import pytest

from mambaeye_jax.data import geometry
from mambaeye_jax.data import glimpses

P = geometry.PATCH_SIZE


def _case(rng, canvas_hw, box_hw, num_glimpses, localized):
  """A random image on a zero canvas, centred, and random corners."""
  height, width = canvas_hw
  h, w = box_hw
  box = geometry.ImageBox((height - h) // 2, (width - w) // 2, h, w)
  pixels = rng.integers(1, 256, (h, w, 3), dtype=np.uint8)  # No zeros.
  canvas = np.zeros((height, width, 3), np.uint8)
  canvas[box.top:box.top + h, box.left:box.left + w] = pixels
  if localized:
    rows = rng.integers(box.top, min(box.top + h, height - P + 1),
                        num_glimpses)
    cols = rng.integers(box.left, min(box.left + w, width - P + 1),
                        num_glimpses)
  else:
    rows = rng.integers(0, height - P + 1, num_glimpses)
    cols = rng.integers(0, width - P + 1, num_glimpses)
  return pixels, canvas, box, np.stack([rows, cols], axis=-1)


CASES = [
    ((160, 160), (97, 143)),   # The golden sample's geometry.
    ((64, 64), (64, 20)),      # Touches the canvas edge on one axis.
    ((48, 80), (5, 3)),        # Image far smaller than a patch.
    ((256, 256), (256, 256)),  # Image fills the canvas.
    ((1024, 1024), (1000, 900)),  # Above the min-filter area: painter path.
]


@pytest.mark.parametrize("canvas_hw,box_hw", CASES)
@pytest.mark.parametrize("localized", [True, False])
def test_gather_equals_canvas_gather(canvas_hw, box_hw, localized):
  rng = np.random.default_rng(hash((canvas_hw, box_hw, localized)) % 2**32)
  pixels, canvas, box, positions = _case(rng, canvas_hw, box_hw, 300,
                                         localized)
  got = geometry.gather_patches(pixels, canvas_hw, box, positions)
  want = geometry.extract_patches(canvas, positions)
  assert got.dtype == np.uint8 and got.shape == (300, geometry.PATCH_DIM)
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("canvas_hw,box_hw", CASES)
@pytest.mark.parametrize("localized", [True, False])
def test_ratio_equals_reference(canvas_hw, box_hw, localized):
  rng = np.random.default_rng(hash((box_hw, canvas_hw, localized)) % 2**32)
  _, _, box, positions = _case(rng, canvas_hw, box_hw, 1024, localized)
  got = geometry.information_ratio(positions, box, method="sliding_min")
  want = geometry.information_ratio(positions, box, method="paint")
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, want)
  assert (np.diff(got) >= 0).all() and got[-1] <= 1.0


def test_ratio_repeated_corners_count_once():
  box = geometry.ImageBox(0, 0, 32, 32)
  positions = np.array([[0, 0], [0, 0], [16, 16], [0, 0]])
  for method in ("sliding_min", "paint"):
    np.testing.assert_array_equal(geometry.information_ratio(positions, box, method),
                                  np.float32([0.25, 0.25, 0.5, 0.5]))


def test_ratio_methods_agree_on_a_large_image():
  rng = np.random.default_rng(3)
  _, _, box, positions = _case(rng, (1024, 1024), (1000, 900), 512, True)
  np.testing.assert_array_equal(
      geometry.information_ratio(positions, box, method="sliding_min"),
      geometry.information_ratio(positions, box, method="paint"))
  with pytest.raises(ValueError, match="method='fast'"):
    geometry.information_ratio(positions, box, method="fast")


def test_rejects_corners_off_canvas():
  pixels = np.ones((10, 10, 3), np.uint8)
  box = geometry.ImageBox(3, 3, 10, 10)
  with pytest.raises(ValueError, match="corners"):
    geometry.gather_patches(pixels, (20, 20), box, np.array([[5, 0]]))
  with pytest.raises(ValueError, match="inside"):
    geometry.gather_patches(pixels, (12, 20), box, np.array([[0, 0]]))


def test_make_example_contract():
  rng = np.random.default_rng(0)
  pixels, _, box, positions = _case(rng, (96, 96), (50, 70), 37, False)
  ex = glimpses.make_example(pixels, (96, 96), box, positions, 7)
  assert ex["patches"].shape == (37, 768) and ex["patches"].dtype == np.uint8
  assert ex["positions"].shape == (37, 2)
  assert ex["positions"].dtype == np.int32
  assert ex["ratio"].shape == (37,) and ex["ratio"].dtype == np.float32
  assert ex["label"].shape == () and ex["label"].dtype == np.int32
  assert ex["length"] == 37 and ex["length"].dtype == np.int32
