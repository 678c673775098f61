"""Glimpse examples from an image pasted on a zero canvas, fast and exact.

The official loader builds the whole canvas, gathers patches from it and
loops over the patches in Python for the coverage ratio. Here the canvas is
never built: the image gets a 16-pixel zero border, every corner is moved
onto the border where its patch misses the image (a patch that misses the
image along an axis is all zeros there, wherever it lies), and the patches
are one fancy-index of a strided window view. The patches equal
`geometry.extract_patches` on the full canvas exactly
(tests/test_data_glimpses.py checks it); the ratio is
`geometry.information_ratio`, which never needs the canvas either.

`glimpses_from_image` is the evaluation side: an image -> the glimpses
eval.py feeds the model (also `mambaeye_jax.glimpses_from_image`).

Example contract (numpy, per sequence of T glimpses):
  "patches" (T, 768) uint8, official (channel, row, col) order;
  "positions" (T, 2) int32 (row, col) canvas corners;
  "ratio" (T,) float32 information ratio;
  "label" () int32; "length" () int32 = T.
With `make_canvas_example` (DataConfig.ship "canvas"), "patches" is
replaced by "canvas" (S_max, S_max, 3) uint8: the zero canvas with the
image at its box, padded with zeros to a fixed side, from which the
training step gathers the same patches on the device. With
`make_source_example` (ship "source"), "source" (s, s, 3) uint8 and "plan"
(P,) float32 replace it: the step renders the canvas, then gathers.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np

from mambaeye_jax.data import eval_transforms
from mambaeye_jax.data import geometry
from mambaeye_jax.data import scan_patterns
from mambaeye_jax.data import sources


def make_example(pixels: np.ndarray, canvas_hw: tuple[int, int],
                 box: geometry.ImageBox, positions: np.ndarray,
                 label: int) -> dict[str, np.ndarray]:
  """One example of the contract from an image and its glimpse corners.

  Args:
    pixels: (h, w, 3) uint8 image (already transformed), h x w = box size.
    canvas_hw: (H, W) canvas size.
    box: where the image lies on the (zero) canvas.
    positions: (T, 2) int canvas corners.
    label: class index.

  Returns:
    {"patches" (T, 768) uint8, "positions" (T, 2) int32, "ratio" (T,)
    float32, "label" () int32, "length" () int32}.
  """
  positions = np.asarray(positions, np.int32)
  return {"patches": geometry.gather_patches(pixels, canvas_hw, box, positions),
          **_sequence_fields(positions, box, label)}


def _sequence_fields(positions: np.ndarray, box: geometry.ImageBox,
                     label: int) -> dict[str, np.ndarray]:
  """What every ship mode's example carries beside its pixels.

  Args:
    positions: (T, 2) int32 canvas corners.
    box: where the image lies on the canvas.
    label: class index.

  Returns:
    {"positions" (T, 2) int32, "ratio" (T,) float32, "label" () int32,
    "length" () int32}.
  """
  return {
      "positions": positions,
      "ratio": geometry.information_ratio(positions, box),
      "label": np.int32(label),
      "length": np.int32(len(positions)),
  }


def padded_canvas(pixels: np.ndarray, box: geometry.ImageBox, side: int) -> np.ndarray:
  """(h, w, 3) uint8 pixels at `box` on a zero (side, side, 3) uint8 canvas."""
  canvas = np.zeros((side, side, 3), np.uint8)
  canvas[box.top:box.top + box.height, box.left:box.left + box.width] = pixels
  return canvas


def make_canvas_example(pixels: np.ndarray, canvas_hw: tuple[int, int],
                        box: geometry.ImageBox, positions: np.ndarray, label: int,
                        padded_side: int) -> dict[str, np.ndarray]:
  """`make_example` shipping the canvas instead of its patches.

  The canvas sits at the top-left of a zero (padded_side, padded_side, 3)
  array, so the corners index it unchanged and every patch they name lies
  inside the real canvas: a gather there gives `make_example`'s patches
  exactly (zero outside the image), 12 KB per example at a 64-pixel side
  against T x 768 bytes of patches.

  Args:
    pixels, canvas_hw, box, positions, label: as `make_example`.
    padded_side: the fixed canvas side of a batch, >= both canvas sides
      (the training canvas_max).

  Returns:
    {"canvas" (padded_side, padded_side, 3) uint8, "positions" (T, 2)
    int32, "ratio" (T,) float32, "label" () int32, "length" () int32}.

  Raises:
    ValueError: a canvas larger than padded_side, or pixels that do not
      match the box.
  """
  height, width = canvas_hw
  if height > padded_side or width > padded_side:
    raise ValueError(f"canvas {height}x{width} does not fit the padded side "
                     f"{padded_side} (the batch's canvas_max)")
  positions = np.asarray(positions, np.int32)
  geometry.check_glimpses(canvas_hw, box, positions)
  if pixels.shape[:2] != (box.height, box.width):
    raise ValueError(f"pixels {pixels.shape} do not match box {box}")
  return {"canvas": padded_canvas(pixels, box, padded_side),
          **_sequence_fields(positions, box, label)}


def make_source_example(pixels: np.ndarray, plan: np.ndarray, canvas_hw: tuple[int, int],
                        box: geometry.ImageBox, positions: np.ndarray, label: int,
                        source_side: int) -> dict[str, np.ndarray]:
  """`make_example` shipping the decoded image and its plan, not pixels.

  The training step renders the canvas from them on the device
  (`mambaeye_jax.device_augment`), then gathers as for `make_canvas_example`.

  Args:
    pixels: (h, w, 3) uint8, the decoded image, h, w <= source_side.
    plan: (P,) float32 from `source_plan.encode_plan`.
    canvas_hw, box, positions, label: as `make_example` (box: where the
      rendered image will lie).
    source_side: the padded image side s.

  Returns:
    {"source" (s, s, 3) uint8 (the image at the top-left, zeros around),
    "plan" (P,) float32, "positions" (T, 2) int32, "ratio" (T,) float32,
    "label" () int32, "length" () int32}.
  """
  height, width = pixels.shape[:2]
  if height > source_side or width > source_side:
    raise ValueError(f"image {width}x{height} does not fit source_side={source_side}")
  positions = np.asarray(positions, np.int32)
  geometry.check_glimpses(canvas_hw, box, positions)
  return {"source": padded_canvas(pixels, geometry.ImageBox(0, 0, height, width), source_side),
          "plan": np.asarray(plan, np.float32),
          **_sequence_fields(positions, box, label)}


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
  box: geometry.ImageBox


def example_rng(seed: int, index: int) -> np.random.Generator:
  """The scan pattern's randomness for one evaluation example: a function of
  (seed, example index) alone, so independent of the batch size, the worker
  and the order in which examples are prepared."""
  return np.random.default_rng([seed, index])


def eval_canvas_and_positions(image, *, canvas_size: int | None, resize: str,
                              scan: str, num_glimpses: int, seed: int, index: int,
                              shrink_first: bool = True, resampler: str = "fast",
                              out: np.ndarray | None = None
                              ) -> tuple[np.ndarray, geometry.ImageBox, np.ndarray]:
  """A decoded image -> its evaluation canvas and glimpse corners.

  The one implementation behind `glimpses_from_image`, eval.py's dataset
  mode (`eval_workers.prepare_example`) and its single-image mode; the patches
  are left to the caller (the evaluator gathers them on the device).

  Args:
    image: a PIL image or a uint8 array (see `glimpses_from_image`).
    canvas_size, resize, shrink_first, resampler, out: as
      `data.eval_transforms.eval_canvas`.
    scan: a registered scan pattern.
    num_glimpses: T.
    seed, index: the scan's randomness (`example_rng`).

  Returns:
    (canvas (S, S, 3) uint8, box, positions (T, 2) int32).
  """
  canvas, box = eval_transforms.eval_canvas(image, resize, canvas_size,
                                            shrink_first=shrink_first, resampler=resampler,
                                            out=out)
  positions = scan_patterns.generate(scan, example_rng(seed, index), canvas.shape[:2],
                                     box, num_glimpses)
  return canvas, box, positions


def glimpses_from_image(image, *, canvas_size: int | None = 512,
                        resize: str = "fit", scan: str = "random",
                        num_glimpses: int = 4096, seed: int = 0,
                        index: int = 0, shrink_first: bool = True,
                        resampler: str = "fast") -> Glimpses:
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
    resampler: "fast" (OpenCV) or "reference" (PIL LANCZOS, the official
      pixels); see `data.eval_transforms`.

  Returns:
    `Glimpses(patches (T, 768) uint8, positions (T, 2) int32, canvas, box)`.

  Raises:
    FileNotFoundError: a path that does not exist.
    ValueError: an unreadable image, an unknown resize mode or scan pattern
      (the message lists the known ones), or num_glimpses < 1.
  """
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
      num_glimpses=num_glimpses, seed=seed, index=index, shrink_first=shrink_first,
      resampler=resampler)
  return Glimpses(geometry.extract_patches(canvas, positions), positions, canvas, box)
