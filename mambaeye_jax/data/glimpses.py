"""Glimpse examples from an image pasted on a zero canvas, fast and exact.

The official loader builds the whole canvas, gathers patches from it and
loops over the patches in Python for the coverage ratio. Here the canvas is
never built: the image gets a 16-pixel zero border, every corner is moved
onto the border where its patch misses the image (a patch that misses the
image along an axis is all zeros there, wherever it lies), and the patches
are one fancy-index of a strided window view. The patches equal
`glimpse.extract_patches` on the full canvas exactly
(tests/test_data_glimpses.py checks it); the ratio is
`glimpse.information_ratio`, which never needs the canvas either.

Example contract (numpy, per sequence of T glimpses):
  "patches" (T, 768) uint8, official (channel, row, col) order;
  "positions" (T, 2) int32 (row, col) canvas corners;
  "ratio" (T,) float32 information ratio;
  "label" () int32; "length" () int32 = T.
"""

from __future__ import annotations

import numpy as np

from mambaeye_jax import glimpse

P = glimpse.PATCH_SIZE

def _check(canvas_hw: tuple[int, int], box: glimpse.ImageBox,
           positions: np.ndarray) -> None:
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
                   box: glimpse.ImageBox, positions: np.ndarray) -> np.ndarray:
  """Patches of the zero canvas holding `pixels` at `box`, canvas unbuilt.

  Args:
    pixels: (h, w, 3) image, h = box.height, w = box.width (any dtype).
    canvas_hw: (H, W) canvas size.
    box: where the image lies on the canvas.
    positions: (T, 2) int canvas corners in [0, H-16] x [0, W-16].

  Returns:
    (T, 768) of pixels.dtype, equal to
    `glimpse.extract_patches(canvas, positions)`.
  """
  positions = np.asarray(positions)
  _check(canvas_hw, box, positions)
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


def make_example(pixels: np.ndarray, canvas_hw: tuple[int, int],
                 box: glimpse.ImageBox, positions: np.ndarray,
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
  return {
      "patches": gather_patches(pixels, canvas_hw, box, positions),
      "positions": positions,
      "ratio": glimpse.information_ratio(positions, box),
      "label": np.int32(label),
      "length": np.int32(len(positions)),
  }
