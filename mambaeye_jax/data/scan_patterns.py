"""Scan patterns: the orders in which glimpses visit a canvas.

A scan pattern is a function

    fn(rng: np.random.Generator, canvas_hw: (H, W), box: geometry.ImageBox,
       num_glimpses: T) -> (T, 2) int32 (row, col) top-left corners

with 0 <= row <= H - 16 and 0 <= col <= W - 16 for every corner. Patterns
live in a registry that users extend with `@register("name")`; `get(name)`
returns one and `generate(name, ...)` runs one and checks its output.

Two families of built-in patterns:

* The defaults (`random`, `random_fixed_grid` and the grid orders) see the
  whole image. `random` draws every corner uniformly from the image's corner
  range of the official *training and validation* sampler (`dataset.py`,
  `ImagenetDatasetSinusoidal`; `corner_bounds` below): rows in
  `[top, min(top + h, side - 15))`, likewise columns, so the top-left corner
  lies in the image and the patch may hang past its bottom/right edge onto
  the padding. That is the distribution the model is trained on (the
  "localized" half of `train`), and every image pixel is reachable. The grid
  orders place corners `start, start + 16, ...` with the last one moved back
  so that its patch ends on the image's last pixel (`grid_axes`).
* `<name>_official` (`random_official`, `hilbert_official`, ...) reproduce
  the official `eval.py` exactly (github usingcolor/MambaEye, `scan.py`
  `generate_scan_positions` with the bounds `eval.py` passes; commit
  d8cc1ff). `eval.py` clamps the end of the image's corner range to
  `side - 16 + 1`, and `scan.py` subtracts the patch size once more. Where
  the image ends inside the canvas this is harmless (the last patch ends on
  the image's last pixel); where the image reaches within 15 pixels of the
  canvas edge (always on the long axis with resize "fit", "full" or "none")
  corners stop at `side - 31`, so the last 15 pixel rows/columns are never
  looked at. At canvas 32 a fitted 32 x 32 image is seen only through
  corners 0..1 (its top-left 17 x 17 pixels); at 512 about 6% of the image
  is never seen. docs/evaluation.md tabulates the coverage of every pattern.

Facts of the official code that both families keep:

* Grid. Per axis, corners `start, start + 16, ...` below the end, with the
  last one moved back if it passes it. Official `x` is the row axis and `y`
  the column axis, so the official names read transposed: "column_major"
  walks row by row, "horizontal_raster" column by column (see each pattern).
* Length. A grid pattern shorter than T is repeated whole, in the same order
  (not reshuffled), and cut at T; a longer one is cut at T.

Degenerate canvases (side < 31 with an image much smaller than 16 pixels) can
put the official `start` past `side - 16`; those corners are clipped onto the
canvas here, where the official gather instead smears the edge pixels.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from mambaeye_jax.data import geometry


P = geometry.PATCH_SIZE

# Probability that a training sequence samples inside the image box rather
# than the whole canvas (official `localized_seq_prob`).
TRAIN_LOCALIZED_PROB = 0.5

ScanPattern = Callable[
    [np.random.Generator, tuple[int, int], geometry.ImageBox, int], np.ndarray]

_REGISTRY: dict[str, ScanPattern] = {}


# ----------------------------------------------------------------- registry


def register(name: str, *, replace: bool = False
             ) -> Callable[[ScanPattern], ScanPattern]:
  """Decorator adding a scan pattern under `name`; stack it for aliases.

  Args:
    name: the name `get` and the command line use.
    replace: allow overriding an existing pattern of that name.

  Returns:
    A decorator that registers the function and returns it unchanged.

  Raises:
    ValueError: if `name` is taken and `replace` is False.
  """
  def decorator(fn: ScanPattern) -> ScanPattern:
    if name in _REGISTRY and not replace:
      raise ValueError(f"scan pattern {name!r} is already registered; pass "
                       "replace=True to override it")
    _REGISTRY[name] = fn
    return fn
  return decorator


def get(name: str) -> ScanPattern:
  """The scan pattern registered as `name`.

  Raises:
    KeyError: for an unknown name; the message lists the known ones.
  """
  try:
    return _REGISTRY[name]
  except KeyError:
    raise KeyError(f"unknown scan pattern {name!r}; known patterns: "
                   f"{', '.join(names())}") from None


def names() -> list[str]:
  """Sorted names of all registered patterns, aliases included."""
  return sorted(_REGISTRY)


def generate(name: str, rng: np.random.Generator, canvas_hw: Sequence[int],
             box: geometry.ImageBox, num_glimpses: int) -> np.ndarray:
  """Runs a registered pattern and checks what it returns.

  User patterns are checked like the built-in ones, so a bad corner fails
  here, with the pattern's name, rather than deep in the pipeline.

  Args:
    name: a registered pattern.
    rng: the randomness source (deterministic patterns ignore it).
    canvas_hw: (H, W) canvas size in pixels, both >= 16.
    box: where the image lies on the canvas.
    num_glimpses: T >= 1.

  Returns:
    (T, 2) int32 (row, col) top-left corners on the canvas.

  Raises:
    ValueError: on bad arguments or a pattern returning bad corners.
  """
  canvas_hw = _check_args(canvas_hw, box, num_glimpses)
  positions = np.asarray(get(name)(rng, canvas_hw, box, num_glimpses))
  height, width = canvas_hw
  if positions.shape != (num_glimpses, 2):
    raise ValueError(f"scan pattern {name!r} returned shape {positions.shape}"
                     f", expected {(num_glimpses, 2)}")
  if not np.issubdtype(positions.dtype, np.integer):
    raise ValueError(f"scan pattern {name!r} returned {positions.dtype} "
                     "positions, expected integers")
  if (positions.min(axis=0) < 0).any() or positions[:, 0].max() > height - P \
      or positions[:, 1].max() > width - P:
    raise ValueError(
        f"scan pattern {name!r} returned corners outside [0, {height - P}] x "
        f"[0, {width - P}] for a {height}x{width} canvas")
  return positions.astype(np.int32)


# ----------------------------------------------------------------- helpers


def _check_args(canvas_hw: Sequence[int], box: geometry.ImageBox,
                num_glimpses: int) -> tuple[int, int]:
  height, width = (int(s) for s in canvas_hw)
  if height < P or width < P:
    raise ValueError(f"canvas {height}x{width} is smaller than one {P}x{P} "
                     "patch")
  if box.height < 1 or box.width < 1 or box.top < 0 or box.left < 0 \
      or box.top + box.height > height or box.left + box.width > width:
    raise ValueError(f"image box {box} does not lie on the {height}x{width} "
                     "canvas")
  if num_glimpses < 1:
    raise ValueError(f"{num_glimpses=} must be >= 1")
  return height, width


def corner_bounds(canvas_hw: Sequence[int], box: geometry.ImageBox
                  ) -> tuple[tuple[int, int], tuple[int, int]]:
  """The official per-axis corner range of the image.

  Args:
    canvas_hw: (H, W).
    box: the image on the canvas.

  Returns:
    ((row_start, row_stop), (col_start, col_stop)): `start` is the image
    offset, `stop = min(max(start + 1, start + extent), side - 15)` is an
    exclusive bound (official `x_end`/`y_end` of `eval.py`, `row_end`/
    `col_end` of `dataset.py`).
  """
  height, width = canvas_hw
  rows = (box.top, min(max(box.top + 1, box.top + box.height), height - P + 1))
  cols = (box.left, min(max(box.left + 1, box.left + box.width), width - P + 1))
  return rows, cols


def _grid_axis(start: int, stop: int) -> np.ndarray:
  """Grid corners along one axis: (n,) int64, stride 16, from `start`.

  Args:
    start: the first corner (the image's offset).
    stop: the exclusive end of the pixels to cover; the last corner is moved
      back to `max(start, stop - 16)` so its patch ends at `stop - 1`.
  """
  axis = np.arange(start, max(stop, start + 1), P)
  if axis[-1] > stop - P:
    axis[-1] = max(start, stop - P)
  return axis


def grid_axes(canvas_hw: Sequence[int], box: geometry.ImageBox, *,
              official: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Row and column corners of the evaluation grid.

  Args:
    canvas_hw: (H, W).
    box: the image on the canvas.
    official: the official `eval.py` grid, whose end is the doubly clamped
      `corner_bounds` stop (the last patch ends 15 pixels short of a canvas
      edge that the image touches); otherwise the grid ends on the image's
      last pixel and covers the whole image.

  Returns:
    (rows (ny,), cols (nx,)) int64, each strictly increasing.
  """
  if official:
    (r0, r1), (c0, c1) = corner_bounds(canvas_hw, box)
  else:
    r0, r1 = box.top, box.top + box.height
    c0, c1 = box.left, box.left + box.width
  return _grid_axis(r0, r1), _grid_axis(c0, c1)


def _finish(positions: np.ndarray, canvas_hw: Sequence[int],
            num_glimpses: int) -> np.ndarray:
  """Repeats or cuts (n, 2) corners to (T, 2) int32, clipped onto the canvas.

  The official code repeats a short list whole
  (`ensure_positions_cover_sequence`); clipping only acts on the degenerate
  canvases of the module docstring.
  """
  positions = positions[np.arange(num_glimpses) % len(positions)]
  upper = np.array([canvas_hw[0] - P, canvas_hw[1] - P])
  return np.clip(positions, 0, upper).astype(np.int32)


def _grid_pattern(order: Callable[[int, int], tuple[np.ndarray, np.ndarray]],
                  official: bool = False) -> ScanPattern:
  """Turns a grid order into a scan pattern.

  Args:
    order: maps the grid size (ny rows, nx cols) to the visiting order as
      (row_index (n,), col_index (n,)) int arrays.
    official: use the official `eval.py` grid (`grid_axes`).

  Returns:
    The scan pattern (deterministic: `rng` is unused).
  """
  def pattern(rng, canvas_hw, box, num_glimpses):
    del rng  # Deterministic.
    canvas_hw = _check_args(canvas_hw, box, num_glimpses)
    rows, cols = grid_axes(canvas_hw, box, official=official)
    ri, ci = order(len(rows), len(cols))
    positions = np.stack([rows[ri], cols[ci]], axis=-1)
    return _finish(positions, canvas_hw, num_glimpses)
  pattern.__doc__ = order.__doc__
  pattern.__name__ = (order.__name__.lstrip("_")
                      + ("_official" if official else "") + "_pattern")
  return pattern


def _row_by_row(ny: int, nx: int) -> tuple[np.ndarray, np.ndarray]:
  """Indices of a ny x nx grid row by row, left to right: (n,), (n,)."""
  ri, ci = np.divmod(np.arange(ny * nx), nx)
  return ri, ci


def _column_by_column(ny: int, nx: int) -> tuple[np.ndarray, np.ndarray]:
  """Indices of a ny x nx grid column by column, top to bottom: (n,), (n,)."""
  ci, ri = np.divmod(np.arange(ny * nx), ny)
  return ri, ci


# ----------------------------------------------------------------- random


@register("train")
def train_pattern(rng: np.random.Generator, canvas_hw: Sequence[int],
                  box: geometry.ImageBox, num_glimpses: int, *,
                  localized_prob: float = TRAIN_LOCALIZED_PROB) -> np.ndarray:
  """Official training sampler (`dataset.py`), pixel granularity.

  One coin per sequence (not per glimpse): with probability 0.5 every corner
  is uniform over the image's corner range `[start, stop)` of
  `corner_bounds` (the corner lies in the image, the patch on the canvas; it
  may hang past the image's bottom/right edge onto the padding), otherwise
  uniform over the whole canvas `[0, side - 16]`. Rows and columns are drawn
  independently, with replacement.

  Returns:
    (T, 2) int32 corners.
  """
  height, width = _check_args(canvas_hw, box, num_glimpses)
  if rng.random() < localized_prob:
    (r0, r1), (c0, c1) = corner_bounds((height, width), box)
    # Only degenerate canvases (module docstring) give an empty range, where
    # the official torch.randint would fail; take the offset, then clip.
    r1, c1 = max(r1, r0 + 1), max(c1, c0 + 1)
  else:
    (r0, r1), (c0, c1) = (0, height - P + 1), (0, width - P + 1)
  rows = rng.integers(r0, r1, num_glimpses)
  cols = rng.integers(c0, c1, num_glimpses)
  return _finish(np.stack([rows, cols], axis=-1), (height, width),
                 num_glimpses)


def _random_corners(rng: np.random.Generator, canvas_hw: Sequence[int],
                    box: geometry.ImageBox, num_glimpses: int,
                    official: bool) -> np.ndarray:
  """Uniform corners over the image's corner range: (T, 2) int32."""
  height, width = _check_args(canvas_hw, box, num_glimpses)
  (r0, r1), (c0, c1) = corner_bounds((height, width), box)
  if official:
    # scan.py's second subtraction: an inclusive end at stop - 16.
    r1, c1 = max(r0, r1 - P) + 1, max(c0, c1 - P) + 1
  else:
    # Only degenerate canvases (module docstring) give an empty range; take
    # the offset, which `_finish` clips onto the canvas.
    r1, c1 = max(r1, r0 + 1), max(c1, c0 + 1)
  # Row and column drawn in turn, corner after corner: the first k corners
  # are the same whatever num_glimpses is, so a score at k glimpses does not
  # depend on the longest glimpse count of the run (all rows first, then
  # all columns, gave other columns for every T).
  corners = rng.integers((r0, c0), (r1, c1), size=(num_glimpses, 2))
  return _finish(corners, (height, width), num_glimpses)


@register("random")
def random_pattern(rng: np.random.Generator, canvas_hw: Sequence[int],
                   box: geometry.ImageBox, num_glimpses: int) -> np.ndarray:
  """Evaluation default: the official validation sampler, pixel granularity.

  Every corner uniform over the image's corner range `[start, stop)` of
  `corner_bounds` per axis, with replacement: exactly the official
  `dataset.py` with `validate=True`, and the localized half of `train`. The
  corner lies in the image and the patch on the canvas; every image pixel is
  reachable.

  Returns:
    (T, 2) int32 corners.
  """
  return _random_corners(rng, canvas_hw, box, num_glimpses, official=False)


@register("random_official")
def random_official_pattern(rng: np.random.Generator,
                            canvas_hw: Sequence[int], box: geometry.ImageBox,
                            num_glimpses: int) -> np.ndarray:
  """Official `eval.py` default (`scan.py` "random"), pixel granularity.

  Every corner uniform over `[start, max(start, stop - 16)]` inclusive per
  axis, with replacement: the whole patch lies in the image (except along an
  axis where the image is narrower than 16 pixels), and, through the double
  subtraction of the module docstring, never within the canvas's last 15
  pixels: at canvas 32 a fitted image is seen only through corners 0..1.

  Returns:
    (T, 2) int32 corners.
  """
  return _random_corners(rng, canvas_hw, box, num_glimpses, official=True)


def _random_fixed_grid(official: bool) -> ScanPattern:
  """The grid in one random order (official "random_fixed_grid").

  The grid cells are shuffled once; a grid shorter than T repeats that same
  order (the official list is shuffled once, then repeated).
  """
  def pattern(rng, canvas_hw, box, num_glimpses):
    height, width = _check_args(canvas_hw, box, num_glimpses)
    rows, cols = grid_axes((height, width), box, official=official)
    ri, ci = _column_by_column(len(rows), len(cols))
    order = rng.permutation(len(ri))
    positions = np.stack([rows[ri[order]], cols[ci[order]]], axis=-1)
    return _finish(positions, (height, width), num_glimpses)
  pattern.__doc__ = _random_fixed_grid.__doc__
  return pattern


register("random_fixed_grid")(_random_fixed_grid(official=False))
register("random_fixed_grid_official")(_random_fixed_grid(official=True))


# ----------------------------------------------------------------- rasters


def _column_major(ny: int, nx: int) -> tuple[np.ndarray, np.ndarray]:
  """Official "column_major": row by row, left to right, rows top down.

  The official loop runs over `x` (rows) outside and `y` (columns) inside,
  so despite its name this is a row-major raster in image terms.
  """
  return _row_by_row(ny, nx)


def _horizontal_raster(ny: int, nx: int) -> tuple[np.ndarray, np.ndarray]:
  """Official "horizontal_raster": column by column, each top to bottom.

  The official loop runs over `y` (columns) outside, `x` (rows) inside.
  """
  return _column_by_column(ny, nx)


def _horizontal_zigzag(ny: int, nx: int) -> tuple[np.ndarray, np.ndarray]:
  """Official "horizontal_zigzag" / "horizontal_snake": column snake.

  Column by column from the left; even columns (0, 2, ...) top to bottom,
  odd ones bottom to top.
  """
  ri, ci = _column_by_column(ny, nx)
  ri = np.where(ci % 2 == 1, ny - 1 - ri, ri)
  return ri, ci


def _column_snake(ny: int, nx: int) -> tuple[np.ndarray, np.ndarray]:
  """Official "column_snake" / "vertical_raster": row snake.

  Row by row from the top; even rows left to right, odd rows right to left.
  """
  ri, ci = _row_by_row(ny, nx)
  ci = np.where(ri % 2 == 1, nx - 1 - ci, ci)
  return ri, ci


# ----------------------------------------------------------------- curves


def hilbert_d2xy(side: int, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Hilbert curve index -> cell, vectorised over indices.

  The classic iterative construction (as the official `d2xy`): for each
  level s = 1, 2, 4, ... take two bits of d, rotate/reflect the quadrant,
  then offset by s.

  Args:
    side: power of two, the curve's grid side.
    d: (n,) int indices in [0, side^2).

  Returns:
    (x (n,), y (n,)) int64; the official code uses x as the row index.
  """
  t = np.asarray(d, np.int64).copy()
  x = np.zeros_like(t)
  y = np.zeros_like(t)
  s = 1
  while s < side:
    rx = 1 & (t // 2)
    ry = 1 & (t ^ rx)
    flip = (ry == 0) & (rx == 1)
    x = np.where(flip, s - 1 - x, x)
    y = np.where(flip, s - 1 - y, y)
    swap = ry == 0
    x, y = np.where(swap, y, x), np.where(swap, x, y)
    x = x + s * rx
    y = y + s * ry
    t //= 4
    s *= 2
  return x, y


def _hilbert(ny: int, nx: int) -> tuple[np.ndarray, np.ndarray]:
  """Official "hilbert": Hilbert curve over the smallest 2^k square grid.

  Side 2^k >= max(ny, nx); the curve's `x` indexes rows, `y` columns; cells
  off the actual grid are skipped (so a non-square or non-power-of-two grid
  has jumps). It starts at the top-left cell; its first move is down when
  the side is 4, 16, 64, ... and right when it is 2, 8, 32, ... (each level
  of the construction transposes the ones below it).
  """
  side = 1 << max(max(ny, nx) - 1, 0).bit_length()
  ri, ci = hilbert_d2xy(side, np.arange(side * side))
  keep = (ri < ny) & (ci < nx)
  return ri[keep], ci[keep]


def _spiral(ny: int, nx: int) -> tuple[np.ndarray, np.ndarray]:
  """Official "spiral": inward spiral from the top-left cell, going down first.

  The official walker tries directions +x, +y, -x, -y in turn (x = rows):
  down the left column, right along the bottom row, up the right column,
  left along the top row, then the next ring inside; every cell once.
  Built here ring by ring (at most min(ny, nx) / 2 + 1 rings).
  """
  rows, cols = [], []
  for k in range((min(ny, nx) + 1) // 2):
    r0, r1, c0, c1 = k, ny - 1 - k, k, nx - 1 - k
    down = np.arange(r0, r1 + 1)
    right = np.arange(c0 + 1, c1 + 1)
    up = np.arange(r1 - 1, r0 - 1, -1) if c1 > c0 else np.arange(0)
    left = np.arange(c1 - 1, c0, -1) if r1 > r0 else np.arange(0)
    rows += [down, np.full_like(right, r1), up, np.full_like(left, r0)]
    cols += [np.full_like(down, c0), right, np.full_like(up, c1), left]
  return np.concatenate(rows), np.concatenate(cols)


def _diagonal(ny: int, nx: int) -> tuple[np.ndarray, np.ndarray]:
  """Official "diagonal": anti-diagonals row + col = s for s = 0, 1, ...

  Within one anti-diagonal, rows increase (columns decrease).
  """
  ri, ci = _row_by_row(ny, nx)
  order = np.lexsort((ri, ri + ci))  # Primary key last: s, then row.
  return ri[order], ci[order]


GOLDEN_FRACTION = 0.618033988749895  # phi - 1, the official constant.


def golden_stride(n: int) -> int:
  """Official golden stride for n cells: int(n (phi - 1)), at least 1, then
  increased until coprime with n (so the walk visits every cell)."""
  stride = max(int(n * GOLDEN_FRACTION), 1)
  while math.gcd(stride, n) != 1:
    stride += 1
  return stride


def _golden(ny: int, nx: int) -> tuple[np.ndarray, np.ndarray]:
  """Official "golden": a golden-ratio stride through the column-major list.

  The cells listed column by column (official `for y: for x:`), cell
  `(i * stride) % n` at step i with `golden_stride(n)`; a 1-cell grid is
  just that cell.
  """
  ri, ci = _column_by_column(ny, nx)
  n = len(ri)
  if n > 1:
    order = (np.arange(n) * golden_stride(n)) % n
    ri, ci = ri[order], ci[order]
  return ri, ci


for _names, _order in [
    (("column_major",), _column_major),
    (("horizontal_raster",), _horizontal_raster),
    (("horizontal_zigzag", "horizontal_snake"), _horizontal_zigzag),
    (("column_snake", "vertical_raster"), _column_snake),
    (("hilbert",), _hilbert),
    (("spiral",), _spiral),
    (("diagonal",), _diagonal),
    (("golden",), _golden),
]:
  for _official in (False, True):
    _pattern = _grid_pattern(_order, official=_official)
    for _name in _names:
      register(_name + ("_official" if _official else ""))(_pattern)
del _names, _order, _pattern, _name, _official


def official_name(name: str) -> str:
  """The `_official` twin of a built-in evaluation pattern, or `name` itself.

  Args:
    name: a registered pattern name.

  Returns:
    `name + "_official"` where that is registered, else `name` (already an
    official variant, "train", or a user pattern).
  """
  twin = name + "_official"
  return twin if twin in _REGISTRY else name


# ----------------------------------------------------------------- picture


def plot_glimpse_path(canvas: np.ndarray, positions: np.ndarray,
                      confidences: np.ndarray | None = None, *,
                      path: str, title: str | None = None,
                      patch_size: int = P) -> str:
  """Draws a glimpse path over its canvas and writes it to an image file.

  Seen pixels are shown as they are, unseen ones faded towards white (as the
  official single-image video does); the path joins patch centres, coloured
  from the first glimpse (dark) to the last (bright); the first patch is
  outlined in green, the last in red. With `confidences` a second panel
  plots them against the step.

  Args:
    canvas: (H, W, 3) uint8, or float in [0, 1].
    positions: (T, 2) int (row, col) top-left corners.
    confidences: optional (T,) float, e.g. the probability of the predicted
      or true class at every step.
    path: output file; the format follows its suffix (e.g. .png).
    title: optional figure title.
    patch_size: side of the drawn patches.

  Returns:
    `path`.
  """
  # Imported here so that importing the data package never loads matplotlib;
  # Figure + FigureCanvasAgg avoid pyplot and touch no global backend.
  from matplotlib import collections as mcollections
  from matplotlib import patches as mpatches
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  image = np.asarray(canvas)
  if image.dtype == np.uint8:
    image = image.astype(np.float32) / 255.0
  image = np.clip(image, 0.0, 1.0)
  positions = np.asarray(positions).reshape(-1, 2)
  seen = np.zeros(image.shape[:2], bool)
  for row, col in np.unique(positions, axis=0):  # Unique corners only.
    seen[row:row + patch_size, col:col + patch_size] = True
  faded = 0.92 + 0.08 * image
  shown = np.where(seen[..., None], image, faded)

  two_panels = confidences is not None
  fig = Figure(figsize=(11 if two_panels else 6, 5.5))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 2, 1) if two_panels else fig.add_subplot(1, 1, 1)
  ax.imshow(shown, interpolation="nearest")
  ax.set_axis_off()
  centres = positions[:, ::-1] + patch_size / 2.0  # (x, y) for matplotlib.
  if len(centres) > 1:
    segments = np.stack([centres[:-1], centres[1:]], axis=1)  # (T-1, 2, 2)
    lines = mcollections.LineCollection(
        segments, cmap="viridis", linewidths=1.0, alpha=0.8)
    lines.set_array(np.arange(len(segments), dtype=np.float32))
    ax.add_collection(lines)
  for index, colour in ((0, "tab:green"), (-1, "tab:red")):
    row, col = positions[index]
    ax.add_patch(mpatches.Rectangle((col - 0.5, row - 0.5), patch_size,
                                    patch_size, fill=False, edgecolor=colour,
                                    linewidth=2.0))
  ax.set_title(f"{len(positions)} glimpses")
  if two_panels:
    conf_ax = fig.add_subplot(1, 2, 2)
    steps = np.arange(1, len(positions) + 1)
    conf_ax.plot(steps, np.asarray(confidences, np.float32).reshape(-1))
    conf_ax.set_xlabel("glimpse")
    conf_ax.set_ylabel("confidence")
    conf_ax.set_ylim(0.0, 1.05)
    conf_ax.grid(alpha=0.3)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  return path
