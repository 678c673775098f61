"""Glimpse geometry on the host (numpy): patches, moves, the information ratio.

A glimpse sequence of length T over a canvas is a list of top-left corners
`positions` (T, 2) int (row, col) in canvas pixels. From them:

* patches: the 16 x 16 x 3 canvas pixels under each corner, flattened in the
  official (channel, row, col) order -> (T, 768). `gather_patches` is the one
  gather: it takes the image and where it lies on a zero canvas, never
  building the canvas (a corner whose patch misses the image reads the zero
  border); `extract_patches` is the same gather over a built canvas.
* moves: position differences, move_0 = (0, 0), in canvas pixels.
* move embedding: per axis (row first) 128 sines then 128 cosines of
  m / 10000^(2i / 256) -> (T, 512).
* information ratio: the fraction of the image's pixels (canvas padding
  excluded) covered by the union of all patches up to and including step t.

The data workers run these (numpy only: no JAX in a worker); the model's
device-side versions are in `mambaeye_jax.glimpse`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

PATCH_SIZE = 16
PATCH_DIM = 3 * PATCH_SIZE * PATCH_SIZE  # 768
MOVE_FEATURES_PER_AXIS = 256
MOVE_DIM = 2 * MOVE_FEATURES_PER_AXIS  # 512


P = PATCH_SIZE


class ImageBox(NamedTuple):
  """Where the image lies on its canvas, in canvas pixels."""
  top: int
  left: int
  height: int
  width: int


def inverse_frequencies() -> np.ndarray:
  """(128,) float64: 1 / 10000^(2i / 256)."""
  i = np.arange(MOVE_FEATURES_PER_AXIS // 2, dtype=np.float64)
  return 1.0 / (10000.0 ** (2.0 * i / MOVE_FEATURES_PER_AXIS))


def moves_from_positions(positions: np.ndarray) -> np.ndarray:
  """(T, 2) int positions -> (T, 2) moves, the first (0, 0)."""
  positions = np.asarray(positions)
  moves = np.zeros_like(positions)
  moves[1:] = positions[1:] - positions[:-1]
  return moves


def move_embedding(moves: np.ndarray) -> np.ndarray:
  """Sinusoidal embedding of moves (computed in float64, returned float32).

  Args:
    moves: (..., 2) (row, col) moves in canvas pixels.

  Returns:
    (..., 512) float32: [sin(row), cos(row), sin(col), cos(col)] blocks of 128.
  """
  angles = np.asarray(moves, np.float64)[..., None] * inverse_frequencies()
  feats = np.concatenate([np.sin(angles), np.cos(angles)], axis=-1)  # (..., 2, 256)
  return feats.reshape(*feats.shape[:-2], MOVE_DIM).astype(np.float32)


def check_glimpses(canvas_hw: tuple[int, int], box: ImageBox,
                   positions: np.ndarray) -> None:
  """Raises ValueError unless the box lies inside the (H, W) canvas and the
  (T, 2) corners keep every patch inside it."""
  height, width = canvas_hw
  if box.height < 1 or box.width < 1 or box.top < 0 or box.left < 0 \
      or box.top + box.height > height or box.left + box.width > width:
    raise ValueError(f"image box {box} must lie inside the {height}x{width} "
                     "canvas")
  if positions.ndim != 2 or positions.shape[1] != 2:
    raise ValueError(f"positions must be (T, 2), got {positions.shape}")
  if positions.size and (positions.min() < 0
                         or positions[:, 0].max() > height - P
                         or positions[:, 1].max() > width - P):
    raise ValueError(f"glimpse corners must lie in [0, {height - P}] x "
                     f"[0, {width - P}] for a {height}x{width} canvas")


def gather_patches(pixels: np.ndarray, canvas_hw: tuple[int, int],
                   box: ImageBox, positions: np.ndarray) -> np.ndarray:
  """Patches of the zero canvas holding `pixels` at `box`, canvas unbuilt.

  Args:
    pixels: (h, w, 3) image, h = box.height, w = box.width (any dtype).
    canvas_hw: (H, W) canvas size.
    box: where the image lies on the canvas.
    positions: (T, 2) int canvas corners in [0, H-16] x [0, W-16].

  Returns:
    (T, 768) of pixels.dtype, equal to
    `extract_patches(canvas, positions)`.
  """
  positions = np.asarray(positions)
  check_glimpses(canvas_hw, box, positions)
  h, w = box.height, box.width
  if pixels.shape[:2] != (h, w):
    raise ValueError(f"pixels {pixels.shape} do not match box {box}")
  padded = np.zeros((h + 2 * P, w + 2 * P, pixels.shape[2]), pixels.dtype)
  padded[P:P + h, P:P + w] = pixels
  # (h + 17, w + 17, C, 16, 16): every window's pixels in the official
  # (channel, row, col) order, without copying.
  windows = np.lib.stride_tricks.sliding_window_view(padded, (P, P), (0, 1))
  # Corner in padded coordinates, moved onto the zero border when its patch
  # misses the image along that axis (rows < 0 or > h + 16).
  rows = np.clip(positions[:, 0] - box.top + P, 0, h + P)
  cols = np.clip(positions[:, 1] - box.left + P, 0, w + P)
  return windows[rows, cols].reshape(len(positions), pixels.shape[2] * P * P)


def extract_patches(canvas: np.ndarray, positions: np.ndarray) -> np.ndarray:
  """Gathers the patches under each corner, in the official flatten order.

  Args:
    canvas: (H, W, 3) image, any dtype (uint8 for the pipeline).
    positions: (T, 2) int top-left corners, 0 <= row <= H - 16,
      0 <= col <= W - 16.

  Returns:
    (T, 768) of canvas.dtype, each row flattened as (channel, row, col).

  Raises:
    ValueError: if a patch would leave the canvas.
  """
  canvas = np.asarray(canvas)
  positions = np.asarray(positions)
  height, width = canvas.shape[:2]
  rows, cols = positions[:, 0], positions[:, 1]
  if positions.size and (rows.min() < 0 or cols.min() < 0
                         or rows.max() > height - PATCH_SIZE
                         or cols.max() > width - PATCH_SIZE):
    raise ValueError(
        f"glimpse positions must lie in [0, {height - PATCH_SIZE}] x "
        f"[0, {width - PATCH_SIZE}] for a canvas of {height}x{width}; got rows "
        f"{rows.min()}..{rows.max()}, cols {cols.min()}..{cols.max()}")
  # The whole canvas is the "image": the one gather, with nothing to pad.
  return gather_patches(canvas, (height, width), ImageBox(0, 0, height, width), positions)


# Above this many image pixels, painting patches (~T slice writes plus one
# pass over the area) beats the sliding minimum (~10 passes over the area).
# Measured crossover on one core at T = 1024: ~0.8 to 1 megapixel.
_SLIDING_MIN_MAX_AREA = 800_000


def information_ratio(positions: np.ndarray, box: ImageBox,
                      method: str = "auto") -> np.ndarray:
  """Fraction of the image covered by the union of patches up to each step.

  Both methods find each image pixel's first-visit step exactly; a histogram
  of those steps, accumulated, counts the covered pixels per step.

  * "sliding_min": each corner-grid cell holds the first step that put a
    corner there (`np.minimum.at`); a 16 x 16 sliding minimum (four doubling
    passes per axis) turns that into each pixel's first visit.
  * "paint": patches painted from the last step to the first, so that
    earlier steps win (a loop of T slice writes).
  * "auto": the sliding minimum up to ~0.8 megapixels, painting above.

  Args:
    positions: (T, 2) int canvas corners.
    box: where the image lies on the canvas.
    method: "auto", "sliding_min" or "paint"; the results are equal.

  Returns:
    (T,) float32 in [0, 1], non-decreasing.
  """
  positions = np.asarray(positions, np.int64)
  num_steps = len(positions)
  area = box.height * box.width
  if area <= 0:
    raise ValueError(f"image box {box} has no pixels")
  if method == "auto":
    method = "sliding_min" if area <= _SLIDING_MIN_MAX_AREA else "paint"
  if method == "sliding_min":
    first_visit = _first_visit_sliding_min(positions, box)
  elif method == "paint":
    first_visit = _first_visit_paint(positions, box)
  else:
    raise ValueError(f"information_ratio method={method!r}; choose auto, "
                     "sliding_min or paint")
  # first_visit holds num_steps for pixels no patch covers. Its rows are long
  # runs of equal values: counting runs weighted by their length gives the
  # same histogram as counting pixels, at ~half the cost on real samples.
  flat = first_visit.ravel()
  starts = np.flatnonzero(np.concatenate(([True], flat[1:] != flat[:-1])))
  newly_covered = np.bincount(flat[starts], weights=np.diff(starts, append=flat.size),
                              minlength=num_steps + 1)
  return (np.cumsum(newly_covered[:num_steps]) / area).astype(np.float32)


def _first_visit_sliding_min(positions: np.ndarray, box: ImageBox) -> np.ndarray:
  """(height, width) first step covering each image pixel (T if none)."""
  num_steps = len(positions)
  h, w = box.height, box.width
  p = PATCH_SIZE
  dtype = np.int16 if num_steps < np.iinfo(np.int16).max else np.int32
  # Corner grid index g = image row + 15: pixel i is covered by g in
  # [i, i + 15]. Corners whose patch misses the image are dropped.
  g_rows = positions[:, 0] - box.top + (p - 1)
  g_cols = positions[:, 1] - box.left + (p - 1)
  keep = ((g_rows >= 0) & (g_rows < h + p - 1)
          & (g_cols >= 0) & (g_cols < w + p - 1))
  first = np.full((h + p - 1, w + p - 1), num_steps, dtype)
  steps = np.arange(num_steps, dtype=dtype)
  np.minimum.at(first, (g_rows[keep], g_cols[keep]), steps[keep])
  for shift in (1, 2, 4, 8):  # Window 2, 4, 8, 16 along rows.
    first = np.minimum(first[:-shift], first[shift:])
  for shift in (1, 2, 4, 8):  # ... then along columns: (h, w).
    first = np.minimum(first[:, :-shift], first[:, shift:])
  return first


def _first_visit_paint(positions: np.ndarray, box: ImageBox) -> np.ndarray:
  """(height, width) first step covering each image pixel (T if none)."""
  num_steps = len(positions)
  first_visit = np.full((box.height, box.width), num_steps, np.int32)
  # Corners relative to the image; patches are clipped to the image box.
  rows = positions[:, 0] - box.top
  cols = positions[:, 1] - box.left
  for t in range(num_steps - 1, -1, -1):
    r0, c0 = max(rows[t], 0), max(cols[t], 0)
    r1 = min(rows[t] + PATCH_SIZE, box.height)
    c1 = min(cols[t] + PATCH_SIZE, box.width)
    if r1 > r0 and c1 > c0:
      first_visit[r0:r1, c0:c1] = t
  return first_visit
