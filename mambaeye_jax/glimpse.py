"""Glimpses: patches, relative moves and the information ratio.

A glimpse sequence of length T over a canvas is a list of top-left corners
`positions` (T, 2) int (row, col) in canvas pixels. From them:

* patches: the 16 x 16 x 3 canvas pixels under each corner, flattened in the
  official (channel, row, col) order -> (T, 768).
* moves: position differences, move_0 = (0, 0), in canvas pixels.
* move embedding: per axis (row first) 128 sines then 128 cosines of
  m / 10000^(2i / 256) -> (T, 512).
* information ratio: the fraction of the image's pixels (canvas padding
  excluded) covered by the union of all patches up to and including step t.

Numpy versions serve the data pipeline (per example, on the host); the
`*_jax` versions run inside jitted code on batches.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PATCH_SIZE = 16
PATCH_DIM = 3 * PATCH_SIZE * PATCH_SIZE  # 768
MOVE_FEATURES_PER_AXIS = 256
MOVE_DIM = 2 * MOVE_FEATURES_PER_AXIS  # 512


class ImageBox(NamedTuple):
  """Where the image lies on its canvas, in canvas pixels."""
  top: int
  left: int
  height: int
  width: int


def _inverse_frequencies() -> np.ndarray:
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
  angles = np.asarray(moves, np.float64)[..., None] * _inverse_frequencies()
  feats = np.concatenate([np.sin(angles), np.cos(angles)], axis=-1)  # (..., 2, 256)
  return feats.reshape(*feats.shape[:-2], MOVE_DIM).astype(np.float32)


def moves_from_positions_jax(positions: jax.Array,
                             segment_ids: jax.Array | None = None) -> jax.Array:
  """Relative moves inside jitted code.

  Args:
    positions: (b, T, 2) int (row, col) top-left corners.
    segment_ids: (b, T) int or None; a token that starts a new segment gets
      move (0, 0), as the first token of a sequence does.

  Returns:
    (b, T, 2) int32 moves.
  """
  positions = positions.astype(jnp.int32)
  prev = jnp.concatenate([positions[:, :1], positions[:, :-1]], axis=1)
  moves = positions - prev
  if segment_ids is not None:
    prev_seg = jnp.concatenate([segment_ids[:, :1], segment_ids[:, :-1]], axis=1)
    moves = jnp.where((segment_ids != prev_seg)[..., None], 0, moves)
  return moves


def move_embedding_jax(moves: jax.Array) -> jax.Array:
  """`move_embedding` inside jitted code.

  Args:
    moves: (..., 2) int (row, col) moves.

  Returns:
    (..., 512) float32.
  """
  # Moves are exact integers; only the product and the sines round (to ~1e-5
  # for moves of a thousand pixels, as float32 sines of large angles do).
  angles = moves.astype(jnp.float32)[..., None] * jnp.asarray(
      _inverse_frequencies(), jnp.float32)
  feats = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
  return feats.reshape(*feats.shape[:-2], MOVE_DIM)


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
  offsets = np.arange(PATCH_SIZE)
  r = rows[:, None, None] + offsets[None, :, None]  # (T, 16, 1)
  c = cols[:, None, None] + offsets[None, None, :]  # (T, 1, 16)
  patches = canvas[r, c]  # (T, 16, 16, 3)
  return patches.transpose(0, 3, 1, 2).reshape(len(positions), PATCH_DIM)


def extract_patches_jax(canvas: jax.Array, positions: jax.Array) -> jax.Array:
  """Device-side patch gather for a batch of canvases.

  Args:
    canvas: (b, H, W, 3) any dtype.
    positions: (b, T, 2) int corners inside the canvas (clamped if not).

  Returns:
    (b, T, 768) of canvas.dtype, flattened as (channel, row, col).
  """
  def one(image, pos):
    def take(p):
      return jax.lax.dynamic_slice(image, (p[0], p[1], 0),
                                   (PATCH_SIZE, PATCH_SIZE, image.shape[-1]))
    patches = jax.vmap(take)(pos)  # (T, 16, 16, 3)
    return patches.transpose(0, 3, 1, 2).reshape(pos.shape[0], -1)
  return jax.vmap(one)(canvas, positions.astype(jnp.int32))


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


# ------------------------------------------------------------------ public API


class Glimpses(NamedTuple):
  """One image's glimpse sequence, ready for `MambaEye` (add a batch axis).

  Attributes:
    patches: (T, 768) uint8, each patch flattened as (channel, row, col).
    positions: (T, 2) int32 (row, col) top-left corners on the canvas.
    canvas: (S, S, 3) uint8, zero outside the image.
    box: where the image lies on the canvas.
  """
  patches: np.ndarray
  positions: np.ndarray
  canvas: np.ndarray
  box: ImageBox


def example_rng(seed: int, index: int) -> np.random.Generator:
  """The scan pattern's randomness for one evaluation example: a function of
  (seed, example index) alone, so independent of the batch size, the worker
  and the order in which examples are prepared."""
  return np.random.default_rng([seed, index])


def eval_canvas_and_positions(image, *, canvas_size: int | None, resize: str,
                              scan: str, num_glimpses: int, seed: int, index: int,
                              shrink_first: bool = True
                              ) -> tuple[np.ndarray, ImageBox, np.ndarray]:
  """A decoded image -> its evaluation canvas and glimpse corners.

  The one implementation behind `glimpses_from_image`, eval.py's dataset
  mode (`eval_lib.prepare_example`) and its single-image mode; the patches
  are left to the caller (the evaluator gathers them on the device).

  Args:
    image: a PIL image or a uint8 array (see `glimpses_from_image`).
    canvas_size, resize, shrink_first: as `data.eval_transforms.eval_canvas`.
    scan: a registered scan pattern.
    num_glimpses: T.
    seed, index: the scan's randomness (`example_rng`).

  Returns:
    (canvas (S, S, 3) uint8, box, positions (T, 2) int32).
  """
  from mambaeye_jax.data import eval_transforms  # pylint: disable=g-import-not-at-top
  from mambaeye_jax.data import scan_patterns  # pylint: disable=g-import-not-at-top
  canvas, box = eval_transforms.eval_canvas(image, resize, canvas_size,
                                            shrink_first=shrink_first)
  positions = scan_patterns.generate(scan, example_rng(seed, index), canvas.shape[:2],
                                     box, num_glimpses)
  return canvas, box, positions


def glimpses_from_image(image, *, canvas_size: int | None = 512,
                        resize: str = "fit", scan: str = "random",
                        num_glimpses: int = 4096, seed: int = 0,
                        index: int = 0, shrink_first: bool = True) -> Glimpses:
  """An image -> the glimpses eval.py feeds the model.

  The canvas follows the official evaluation (`data.eval_transforms`), the
  corners a registered scan pattern (`data.scan_patterns`; "random" draws
  them over the whole image, as the training and validation sampler does).
  For batches, stack the results of several images of one `canvas_size`:
  `model(np.stack(patches), np.stack(positions))`.

  Args:
    image: a file path, a PIL image (any mode) or a uint8 array (h, w),
      (h, w, 1), (h, w, 3) or (h, w, 4).
    canvas_size: canvas side S (>= 16); None with resize "none" makes it the
      image's longer side.
    resize: "fit" (longer side -> S, keeping the aspect ratio), "full"
      (stretch to S x S) or "none".
    scan: a scan pattern name (`data.scan_patterns.names()`).
    num_glimpses: T.
    seed: seeds random scan orders; with `index`, the same seed gives the
      same corners as eval.py's dataset mode gives the image at `index`.
    index: the example index mixed into the seed (see `seed`).
    shrink_first: shrink an image larger than the canvas before the resize,
      as eval.py's dataset mode does; False resizes the original directly,
      as its single-image mode does.

  Returns:
    `Glimpses(patches (T, 768) uint8, positions (T, 2) int32, canvas, box)`.

  Raises:
    FileNotFoundError: a path that does not exist.
    ValueError: an unreadable image, an unknown resize mode or scan pattern
      (the message lists the known ones), or num_glimpses < 1.
  """
  # Imported here: both modules import this one, and `import mambaeye_jax`
  # should not pull in PIL for users who only need the model.
  import os  # pylint: disable=g-import-not-at-top
  from mambaeye_jax.data import scan_patterns  # pylint: disable=g-import-not-at-top
  from mambaeye_jax.data import sources  # pylint: disable=g-import-not-at-top
  if num_glimpses < 1:
    raise ValueError(f"num_glimpses={num_glimpses} must be >= 1")
  if scan not in scan_patterns.names():
    raise ValueError(f"unknown scan pattern {scan!r}; known patterns: "
                     f"{', '.join(scan_patterns.names())}")
  if isinstance(image, (str, os.PathLike)):
    path = os.fspath(image)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"image {path} does not exist")
    with open(path, "rb") as f:
      image = sources.decode_image(f.read(), path)  # BadImageError: a ValueError.
  canvas, box, positions = eval_canvas_and_positions(
      image, canvas_size=canvas_size, resize=resize, scan=scan,
      num_glimpses=num_glimpses, seed=seed, index=index, shrink_first=shrink_first)
  return Glimpses(extract_patches(canvas, positions), positions, canvas, box)
