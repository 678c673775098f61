"""Tests for mambaeye_jax.data.scan_patterns."""

import numpy as np
import pytest
from PIL import Image

from mambaeye_jax.data import scan_patterns as sp
from mambaeye_jax.data.geometry import ImageBox

GRID_PATTERNS = ("column_major", "horizontal_raster", "horizontal_zigzag",
                 "horizontal_snake", "column_snake", "vertical_raster",
                 "hilbert", "spiral", "diagonal", "golden")
RANDOM_PATTERNS = ("train", "random", "random_fixed_grid")
OFFICIAL_PATTERNS = tuple(name + "_official" for name in GRID_PATTERNS
                          + ("random", "random_fixed_grid"))
# The patterns eval.py offers by default: they must see the whole image.
DEFAULT_EVAL_PATTERNS = GRID_PATTERNS + ("random", "random_fixed_grid")

# (canvas (H, W), image box): full canvases, centred images, an image
# narrower than a patch, the smallest canvas, non-square canvases.
CASES = [
    ((16, 16), ImageBox(0, 0, 16, 16)),
    ((16, 16), ImageBox(5, 3, 4, 9)),
    ((17, 40), ImageBox(1, 0, 15, 40)),
    ((64, 64), ImageBox(0, 0, 64, 64)),
    ((64, 64), ImageBox(20, 29, 24, 5)),
    ((100, 37), ImageBox(10, 2, 80, 33)),
    ((512, 512), ImageBox(106, 0, 300, 512)),
]

# A 3 x 4 grid: rows 2, 18, 34 and cols 2, 18, 34, 50 exactly (the image
# ends 16 px after the last corner on both axes, so no clamping).
GRID_CANVAS = (100, 100)
GRID_BOX = ImageBox(2, 2, 48, 64)
GRID_ROWS = np.array([2, 18, 34])
GRID_COLS = np.array([2, 18, 34, 50])

# Expected visiting orders on that grid, as (row index, col index), worked out
# by hand from the official definitions (see the module docstring).
EXPECTED_ORDERS = {
    "column_major": [(r, c) for r in range(3) for c in range(4)],
    "horizontal_raster": [(r, c) for c in range(4) for r in range(3)],
    "horizontal_zigzag": [(0, 0), (1, 0), (2, 0), (2, 1), (1, 1), (0, 1),
                          (0, 2), (1, 2), (2, 2), (2, 3), (1, 3), (0, 3)],
    "column_snake": [(0, 0), (0, 1), (0, 2), (0, 3), (1, 3), (1, 2), (1, 1),
                     (1, 0), (2, 0), (2, 1), (2, 2), (2, 3)],
    "spiral": [(0, 0), (1, 0), (2, 0), (2, 1), (2, 2), (2, 3), (1, 3), (0, 3),
               (0, 2), (0, 1), (1, 1), (1, 2)],
    "diagonal": [(0, 0), (0, 1), (1, 0), (0, 2), (1, 1), (2, 0), (0, 3),
                 (1, 2), (2, 1), (1, 3), (2, 2), (2, 3)],
    # n = 12: stride int(12 * 0.618...) = 7, coprime; cells listed column by
    # column, k -> (k % 3, k // 3) for k = 0, 7, 2, 9, 4, 11, 6, 1, 8, 3, ...
    "golden": [(0, 0), (1, 2), (2, 0), (0, 3), (1, 1), (2, 3), (0, 2), (1, 0),
               (2, 2), (0, 1), (1, 3), (2, 1)],
    # The 4 x 4 Hilbert curve with its last row (row 3) skipped.
    "hilbert": [(0, 0), (1, 0), (1, 1), (0, 1), (0, 2), (0, 3), (1, 3),
                (1, 2), (2, 2), (2, 3), (2, 1), (2, 0)],
}
EXPECTED_ORDERS["horizontal_snake"] = EXPECTED_ORDERS["horizontal_zigzag"]
EXPECTED_ORDERS["vertical_raster"] = EXPECTED_ORDERS["column_snake"]


def _positions(name, canvas_hw, box, num_glimpses, seed=0):
  return sp.generate(name, np.random.default_rng(seed), canvas_hw, box,
                     num_glimpses)


def test_registry_has_every_official_pattern():
  assert set(GRID_PATTERNS + RANDOM_PATTERNS + OFFICIAL_PATTERNS) <= set(
      sp.names())
  assert sp.names() == sorted(sp.names())
  assert sp.get("horizontal_snake") is sp.get("horizontal_zigzag")
  assert sp.get("vertical_raster") is sp.get("column_snake")


@pytest.mark.parametrize("name",
                         GRID_PATTERNS + RANDOM_PATTERNS + OFFICIAL_PATTERNS)
@pytest.mark.parametrize("canvas_hw,box", CASES)
def test_shape_dtype_and_bounds(name, canvas_hw, box):
  for num_glimpses in (1, 7, 300):
    # Call the raw pattern, not `generate`, so its own output is checked here.
    pos = sp.get(name)(np.random.default_rng(3), canvas_hw, box, num_glimpses)
    assert pos.shape == (num_glimpses, 2) and pos.dtype == np.int32
    assert pos.min() >= 0
    assert pos[:, 0].max() <= canvas_hw[0] - 16
    assert pos[:, 1].max() <= canvas_hw[1] - 16


@pytest.mark.parametrize("name", sorted(EXPECTED_ORDERS))
def test_grid_orders_match_official_definitions(name):
  pos = _positions(name, GRID_CANVAS, GRID_BOX, 12)
  expected = np.array([(GRID_ROWS[r], GRID_COLS[c])
                       for r, c in EXPECTED_ORDERS[name]])
  np.testing.assert_array_equal(pos, expected)


@pytest.mark.parametrize("name", GRID_PATTERNS + ("random_fixed_grid",)
                         + tuple(n + "_official" for n in GRID_PATTERNS
                                 + ("random_fixed_grid",)))
@pytest.mark.parametrize("canvas_hw,box", CASES)
def test_grid_covers_every_cell_once_then_repeats(name, canvas_hw, box):
  rows, cols = sp.grid_axes(canvas_hw, box,
                            official=name.endswith("_official"))
  # Degenerate canvases (16 x 16 with a 4-pixel image) clip onto the canvas.
  rows = np.minimum(rows, canvas_hw[0] - 16)
  cols = np.minimum(cols, canvas_hw[1] - 16)
  cells = {(r, c) for r in rows for c in cols}
  n = len(cells)
  pos = _positions(name, canvas_hw, box, 2 * n + 3)
  first = pos[:n]
  assert {tuple(p) for p in first} == cells and len(set(map(tuple, first))) == n
  # A grid shorter than T repeats whole, in the same order, then is cut.
  np.testing.assert_array_equal(pos[n:2 * n], first)
  np.testing.assert_array_equal(pos[2 * n:], np.tile(first, (3, 1))[:3])
  # A T shorter than the grid keeps its beginning.
  np.testing.assert_array_equal(_positions(name, canvas_hw, box, 1), first[:1])


def test_grid_axes_official_start_stride_and_last_corner():
  # Image ending inside the canvas: the last corner makes the patch end on
  # the image's last row (106 + 300 - 16 = 390).
  rows, cols = sp.grid_axes((512, 512), ImageBox(106, 0, 300, 512),
                            official=True)
  np.testing.assert_array_equal(rows, list(range(106, 390, 16)) + [390])
  assert rows[0] == 106 and np.all(np.diff(rows)[:-1] == 16)
  # Image reaching the canvas edge: official stop is 512 - 15 = 497 and
  # scan.py subtracts 16 again, so the last corner is 481, not 496.
  np.testing.assert_array_equal(cols, list(range(0, 481, 16)) + [481])
  # Image narrower than a patch: one corner, at the image's offset.
  rows, cols = sp.grid_axes((64, 64), ImageBox(20, 29, 24, 5), official=True)
  np.testing.assert_array_equal(cols, [29])
  np.testing.assert_array_equal(rows, [20, 28])


def test_grid_axes_end_on_the_image_last_pixel():
  # The same boxes: inside the canvas nothing changes; at the canvas edge
  # the last patch now ends on pixel 511.
  rows, cols = sp.grid_axes((512, 512), ImageBox(106, 0, 300, 512))
  np.testing.assert_array_equal(rows, list(range(106, 390, 16)) + [390])
  np.testing.assert_array_equal(cols, list(range(0, 512, 16)))
  rows, cols = sp.grid_axes((32, 32), ImageBox(0, 0, 32, 32))
  np.testing.assert_array_equal(rows, [0, 16])
  rows, cols = sp.grid_axes((32, 32), ImageBox(0, 0, 32, 32), official=True)
  np.testing.assert_array_equal(rows, [0, 1])  # The official blind spot.


def _coverage(positions, box):
  """Fraction of the box's pixels inside the union of the patches."""
  seen = np.zeros((box.top + box.height + 16, box.left + box.width + 16), bool)
  for row, col in np.unique(positions, axis=0):
    seen[row:row + 16, col:col + 16] = True
  return seen[box.top:box.top + box.height,
              box.left:box.left + box.width].mean()


def _boxes(side):
  """Image boxes on a side x side canvas, as the evaluation resizes make.

  Fit of a square and of a 4:3 photo (touching the canvas edge on one or
  both axes), "none" of a small image (inside the canvas), an image
  narrower than a patch, and an odd offset.
  """
  short = side * 3 // 4
  boxes = [ImageBox(0, 0, side, side),
           ImageBox((side - short) // 2, 0, short, side),
           ImageBox(0, (side - short) // 2, side, short),
           ImageBox(side // 2 - 6, 3, 12, side - 3)]
  if side >= 48:
    boxes.append(ImageBox(5, 7, 32, 32))
  return boxes


@pytest.mark.parametrize("side", [32, 48, 64, 512])
@pytest.mark.parametrize("name", DEFAULT_EVAL_PATTERNS)
def test_default_patterns_reach_every_pixel_of_the_image(name, side):
  for box in _boxes(side):
    if name == "random":
      # Rows and columns are drawn independently, so the reachable corners
      # are the product of the values each axis takes; a long draw shows
      # every one (at most 497 values per axis, 12,000 draws).
      drawn = np.concatenate([
          _positions(name, (side, side), box, 4000, seed=s) for s in range(3)])
      rows, cols = np.unique(drawn[:, 0]), np.unique(drawn[:, 1])
      positions = np.stack(np.meshgrid(rows, cols), -1).reshape(-1, 2)
    else:  # Grids, also in random order: the whole grid once.
      rows, cols = sp.grid_axes((side, side), box)
      positions = _positions(name, (side, side), box, len(rows) * len(cols))
    assert _coverage(positions, box) == 1.0, (name, side, box)


@pytest.mark.parametrize("name", ["random_official", "column_major_official"])
def test_official_patterns_keep_the_blind_spot(name):
  # Canvas 32, a fitted 32 x 32 image: corners 0..1 only, 17 x 17 pixels.
  box = ImageBox(0, 0, 32, 32)
  positions = _positions(name, (32, 32), box, 4000)
  assert positions.max() == 1
  assert _coverage(positions, box) == pytest.approx(17 * 17 / 32 ** 2)


def test_hilbert_curve_is_a_continuous_walk_on_power_of_two_grids():
  for side, first_move in ((2, (0, 1)), (4, (1, 0)), (8, (0, 1)),
                           (16, (1, 0))):
    x, y = sp.hilbert_d2xy(side, np.arange(side * side))
    cells = np.stack([x, y], axis=-1)
    assert len({tuple(c) for c in cells}) == side * side
    assert cells.min() == 0 and cells.max() == side - 1
    steps = np.abs(np.diff(cells, axis=0)).sum(axis=-1)
    assert np.all(steps == 1)
    assert tuple(cells[0]) == (0, 0) and tuple(cells[1]) == first_move


def test_golden_stride_is_coprime():
  assert sp.golden_stride(12) == 7
  assert sp.golden_stride(10) == 7  # int(6.18) = 6 shares 2 with 10.
  assert sp.golden_stride(4) == 3
  assert sp.golden_stride(2) == 1
  # Truncated, not rounded: 16 * 0.618 = 9.89 -> 9, 3 * 0.618 = 1.85 -> 1.
  assert sp.golden_stride(16) == 9
  assert sp.golden_stride(3) == 1


@pytest.mark.parametrize("name", RANDOM_PATTERNS)
def test_random_patterns_are_deterministic_per_rng(name):
  canvas_hw, box = (128, 96), ImageBox(10, 20, 100, 60)
  a = _positions(name, canvas_hw, box, 64, seed=5)
  b = _positions(name, canvas_hw, box, 64, seed=5)
  c = _positions(name, canvas_hw, box, 64, seed=6)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


@pytest.mark.parametrize("name", [n for n in sp.names() if n != "train"])
def test_the_first_glimpses_do_not_depend_on_the_glimpse_count(name):
  # An evaluation scores every glimpse count of a run on one sequence of
  # the longest: the score at k must not change with that longest count.
  canvas_hw, box = (128, 96), ImageBox(10, 20, 100, 60)
  longest = _positions(name, canvas_hw, box, 1024, seed=5)
  for k in (1, 16, 100):
    np.testing.assert_array_equal(_positions(name, canvas_hw, box, k, seed=5), longest[:k])


@pytest.mark.parametrize("name", GRID_PATTERNS)
def test_grid_patterns_ignore_the_rng(name):
  canvas_hw, box = (128, 96), ImageBox(10, 20, 100, 60)
  np.testing.assert_array_equal(_positions(name, canvas_hw, box, 50, seed=1),
                                _positions(name, canvas_hw, box, 50, seed=2))


def test_random_official_pattern_range_is_the_official_one():
  # Image ending inside the canvas: the patch stays inside the image.
  box = ImageBox(10, 20, 40, 30)
  pos = _positions("random_official", (100, 100), box, 4000)
  assert pos[:, 0].min() == 10 and pos[:, 0].max() == 10 + 40 - 16
  assert pos[:, 1].min() == 20 and pos[:, 1].max() == 20 + 30 - 16
  # Image filling the canvas: corners stop at side - 31 (official quirk).
  pos = _positions("random_official", (64, 48), ImageBox(0, 0, 64, 48), 4000)
  assert pos[:, 0].max() == 64 - 31 and pos[:, 1].max() == 48 - 31
  # Uniform: every corner value of a small range appears, none dominates.
  counts = np.bincount(pos[:, 1])
  assert len(counts) == 18 and counts.min() > 0.5 * counts.mean()


def test_random_pattern_range_is_the_official_validation_one():
  # Corners in [start, min(start + extent, side - 15)): the top-left corner
  # in the image, the patch possibly hanging past its bottom/right edge.
  box = ImageBox(10, 20, 40, 30)
  pos = _positions("random", (100, 100), box, 4000)
  assert pos[:, 0].min() == 10 and pos[:, 0].max() == 10 + 40 - 1
  assert pos[:, 1].min() == 20 and pos[:, 1].max() == 20 + 30 - 1
  pos = _positions("random", (64, 48), ImageBox(0, 0, 64, 48), 4000)
  assert pos[:, 0].max() == 64 - 16 and pos[:, 1].max() == 48 - 16
  counts = np.bincount(pos[:, 1])
  assert len(counts) == 33 and counts.min() > 0.5 * counts.mean()


def test_random_pattern_is_the_localized_training_distribution():
  # The training sampler's localized sequences draw from the same range.
  canvas_hw, box = (64, 64), ImageBox(8, 0, 48, 64)
  train = np.concatenate([
      sp.train_pattern(np.random.default_rng(s), canvas_hw, box, 500,
                       localized_prob=1.0) for s in range(4)])
  random = _positions("random", canvas_hw, box, 2000)
  for axis in (0, 1):
    assert train[:, axis].min() == random[:, axis].min()
    assert train[:, axis].max() == random[:, axis].max()


def test_train_pattern_flips_one_coin_per_sequence():
  canvas_hw, box = (200, 200), ImageBox(80, 90, 30, 20)
  localized = 0
  for seed in range(400):
    pos = _positions("train", canvas_hw, box, 100, seed=seed)
    rows_in = (pos[:, 0] >= 80) & (pos[:, 0] < 110)
    cols_in = (pos[:, 1] >= 90) & (pos[:, 1] < 110)
    inside = rows_in & cols_in
    if inside.all():
      localized += 1
    else:
      # A whole-canvas sequence: corners spread over the canvas.
      assert inside.mean() < 0.2 and pos.max() > 150
  assert 150 < localized < 250  # p = 0.5; 400 draws, ~5 sigma.


def test_train_pattern_localized_range_reaches_image_edge():
  # Corner range [start, min(start + extent, side - 15)), pixel granularity.
  box = ImageBox(3, 5, 20, 12)
  pos = np.concatenate([_positions("train", (40, 40), box, 200, seed=s)
                        for s in range(40)])
  inside = ((pos[:, 0] >= 3) & (pos[:, 0] < 23) & (pos[:, 1] >= 5)
            & (pos[:, 1] < 17))
  local = pos[inside]
  assert local[:, 0].min() == 3 and local[:, 0].max() == 22
  assert local[:, 1].min() == 5 and local[:, 1].max() == 16
  # And the canvas-wide sequences reach the whole corner range [0, 24].
  assert pos.min() == 0 and pos.max() == 24


def test_random_fixed_grid_order_depends_on_rng():
  a = _positions("random_fixed_grid", (256, 256), ImageBox(0, 0, 256, 256), 50,
                 seed=0)
  b = _positions("random_fixed_grid", (256, 256), ImageBox(0, 0, 256, 256), 50,
                 seed=1)
  assert not np.array_equal(a, b)


def test_register_extends_the_registry(monkeypatch):
  monkeypatch.setattr(sp, "_REGISTRY", dict(sp._REGISTRY))

  @sp.register("top_left_only")
  def top_left(rng, canvas_hw, box, num_glimpses):
    del rng, canvas_hw
    return np.tile([[box.top, box.left]], (num_glimpses, 1))

  assert "top_left_only" in sp.names()
  assert sp.get("top_left_only") is top_left
  pos = sp.generate("top_left_only", np.random.default_rng(0), (32, 32),
                    ImageBox(4, 6, 20, 20), 5)
  assert pos.dtype == np.int32
  np.testing.assert_array_equal(pos, [[4, 6]] * 5)

  with pytest.raises(ValueError, match="already registered"):
    sp.register("top_left_only")(top_left)
  sp.register("top_left_only", replace=True)(sp.get("spiral"))
  assert sp.get("top_left_only") is sp.get("spiral")


def test_generate_rejects_bad_pattern_output(monkeypatch):
  monkeypatch.setattr(sp, "_REGISTRY", dict(sp._REGISTRY))
  sp.register("off_canvas")(lambda rng, hw, box, t: np.full((t, 2), hw[0]))
  sp.register("too_short")(lambda rng, hw, box, t: np.zeros((t - 1, 2), int))
  sp.register("floats")(lambda rng, hw, box, t: np.zeros((t, 2)))
  for name, message in (("off_canvas", "outside"), ("too_short", "shape"),
                        ("floats", "integers")):
    with pytest.raises(ValueError, match=message):
      _positions(name, (32, 32), ImageBox(0, 0, 32, 32), 4)


def test_unknown_name_lists_the_known_ones():
  with pytest.raises(KeyError, match="unknown scan pattern 'zigzag'") as info:
    sp.get("zigzag")
  assert "hilbert" in str(info.value) and "random" in str(info.value)


@pytest.mark.parametrize("canvas_hw,box,num_glimpses", [
    ((15, 64), ImageBox(0, 0, 15, 64), 4),
    ((64, 64), ImageBox(0, 0, 0, 10), 4),
    ((64, 64), ImageBox(60, 0, 10, 10), 4),
    ((64, 64), ImageBox(0, 0, 64, 64), 0),
])
def test_bad_arguments_raise(canvas_hw, box, num_glimpses):
  for name in ("random", "spiral", "train"):
    with pytest.raises(ValueError):
      sp.get(name)(np.random.default_rng(0), canvas_hw, box, num_glimpses)


def test_plot_glimpse_path_writes_an_image(tmp_path):
  canvas = np.zeros((64, 80, 3), np.uint8)
  canvas[8:56, 8:72] = 200
  pos = _positions("spiral", (64, 80), ImageBox(8, 8, 48, 64), 20)
  for conf in (None, np.linspace(0.1, 0.9, 20)):
    out = tmp_path / f"path_{conf is None}.png"
    assert sp.plot_glimpse_path(canvas, pos, conf, path=str(out)) == str(out)
    with Image.open(out) as image:
      assert image.format == "PNG" and min(image.size) > 100
  # The panel with confidences makes a wider figure.
  with Image.open(tmp_path / "path_False.png") as two, \
      Image.open(tmp_path / "path_True.png") as one:
    assert two.size[0] > one.size[0]
