"""SyntheticShapes: a generated image-classification dataset, no download.

Ten texture classes, each filling the whole image, so that every 16 x 16
glimpse carries evidence of the class (a glimpse-based model sees patches,
not the whole picture). A class is a kind of structure, never a size: the
periods are drawn in pixels independently of the image size, and an image
enlarged or shrunk keeps its kind (stripes stay stripes of one orientation).
Colours are random per image, with a guaranteed luma contrast between the two
main colours, so colour alone says nothing about the class.

Images have random heights and widths in [min_side, max_side] (independent,
so aspect ratios vary), and are a pure function of (seed, index). Labels are
`index % 10`, so any 10 consecutive indices hold one image of each class.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

CLASS_NAMES = (
    "horizontal_stripes",    # Bands along the width, period 4..12 px.
    "vertical_stripes",      # Bands along the height.
    "diagonal_stripes",      # Bands along "/" (row + col constant).
    "antidiagonal_stripes",  # Bands along "\" (row - col constant).
    "checkerboard",          # Square cells 3..8 px, two colours.
    "dots",                  # Discs on a square lattice.
    "crosshatch",            # Thin lines along both axes.
    "noise",                 # Two-colour random pixels (1 or 2 px).
    "mosaic",                # Square blocks of four random colours.
    "gradient",              # Smooth linear blend, no edges.
)
NUM_CLASSES = len(CLASS_NAMES)

_LUMA = np.array([0.299, 0.587, 0.114])


def _two_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Two random colours (3,) float with luma differing by >= 127.5.

  The darker one is halved and the lighter one moved half way to white; as
  luma is linear in RGB its gap becomes 127.5 + half the old gap.
  """
  a, b = rng.uniform(0, 255, (2, 3))
  dark, light = (a, b) if a @ _LUMA <= b @ _LUMA else (b, a)
  dark, light = 0.5 * dark, 255.0 - 0.5 * (255.0 - light)
  return (dark, light) if rng.random() < 0.5 else (light, dark)


def _stripes(u: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Binary bands along the level sets of u (h, w) -> (h, w) float mask."""
  period = rng.uniform(4.0, 12.0)
  duty = rng.uniform(0.35, 0.65)
  return ((u / period + rng.random()) % 1.0 < duty).astype(np.float32)


def _mask_horizontal(rows, cols, rng):
  del cols
  return _stripes(rows, rng)


def _mask_vertical(rows, cols, rng):
  del rows
  return _stripes(cols, rng)


def _mask_diagonal(rows, cols, rng):
  return _stripes((rows + cols) / np.sqrt(2.0), rng)


def _mask_antidiagonal(rows, cols, rng):
  return _stripes((rows - cols) / np.sqrt(2.0), rng)


def _mask_checkerboard(rows, cols, rng):
  cell = rng.uniform(3.0, 8.0)
  r0, c0 = rng.uniform(0, cell, 2)
  parity = np.floor((rows + r0) / cell) + np.floor((cols + c0) / cell)
  return (parity % 2).astype(np.float32)


def _mask_dots(rows, cols, rng):
  spacing = rng.uniform(6.0, 12.0)
  radius = rng.uniform(0.25, 0.4) * spacing
  r0, c0 = rng.uniform(0, spacing, 2)
  dr = (rows + r0) % spacing - spacing / 2
  dc = (cols + c0) % spacing - spacing / 2
  return (dr * dr + dc * dc < radius * radius).astype(np.float32)


def _mask_crosshatch(rows, cols, rng):
  spacing = rng.uniform(5.0, 10.0)
  width = rng.uniform(1.0, 2.0)
  r0, c0 = rng.uniform(0, spacing, 2)
  lines = ((rows + r0) % spacing < width) | ((cols + c0) % spacing < width)
  return lines.astype(np.float32)


def _mask_noise(rows, cols, rng):
  block = int(rng.integers(1, 3))
  height, width = rows.shape
  cells = rng.random(((height + block - 1) // block,
                      (width + block - 1) // block)) < 0.5
  cells = np.repeat(np.repeat(cells, block, 0), block, 1)
  return cells[:height, :width].astype(np.float32)


def _mask_gradient(rows, cols, rng):
  angle = rng.uniform(0, 2 * np.pi)
  u = rows * np.cos(angle) + cols * np.sin(angle)
  return ((u - u.min()) / max(np.ptp(u), 1.0)).astype(np.float32)


_MASKS: dict[str, Callable[..., np.ndarray]] = {
    "horizontal_stripes": _mask_horizontal,
    "vertical_stripes": _mask_vertical,
    "diagonal_stripes": _mask_diagonal,
    "antidiagonal_stripes": _mask_antidiagonal,
    "checkerboard": _mask_checkerboard,
    "dots": _mask_dots,
    "crosshatch": _mask_crosshatch,
    "noise": _mask_noise,
    "gradient": _mask_gradient,
}


def _mosaic(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
  """(h, w, 3) float: square blocks of 5..10 px in four random colours."""
  block = int(rng.integers(5, 11))
  palette = rng.uniform(0, 255, (4, 3))
  # Two of the four are a contrasting pair so that block edges are visible.
  palette[:2] = np.stack(_two_colours(rng))
  r0, c0 = rng.integers(0, block, 2)
  index = rng.integers(0, 4, ((height + r0) // block + 1,
                              (width + c0) // block + 1))
  rows = (np.arange(height) + r0) // block
  cols = (np.arange(width) + c0) // block
  return palette[index[rows[:, None], cols[None, :]]]


def render(label: int, height: int, width: int,
           rng: np.random.Generator) -> np.ndarray:
  """One image of class `label`.

  Args:
    label: class index in [0, 10).
    height: h >= 1 pixels.
    width: w >= 1 pixels.
    rng: the source of every random choice (periods, phases, colours).

  Returns:
    (h, w, 3) uint8.
  """
  name = CLASS_NAMES[label]
  if name == "mosaic":
    image = _mosaic(height, width, rng)
  else:
    rows, cols = np.meshgrid(np.arange(height, dtype=np.float64),
                             np.arange(width, dtype=np.float64), indexing="ij")
    mask = _MASKS[name](rows, cols, rng)[..., None]  # (h, w, 1) in [0, 1]
    background, foreground = _two_colours(rng)
    image = background * (1.0 - mask) + foreground * mask
  # A little pixel noise keeps flat areas from being exactly flat, so that
  # "flat" is no shortcut to any class.
  image = image + rng.normal(0.0, 4.0, image.shape)
  return np.clip(np.rint(image), 0, 255).astype(np.uint8)


class SyntheticShapes:
  """Random-access source of generated texture images (grain-compatible).

  `len(ds)` examples; `ds[i]` is {"image": (h, w, 3) uint8, "label": int}
  with h, w in [min_side, max_side], deterministic in (seed, i). Works as a
  `grain.MapDataset.source(...)` and pickles (for worker processes).

  Args:
    num_examples: dataset length (>= 0).
    seed: selects the dataset; same seed, same images.
    min_side: smallest height/width in pixels (>= 1).
    max_side: largest height/width in pixels (>= min_side).
  """

  def __init__(self, num_examples: int, seed: int = 0, min_side: int = 24,
               max_side: int = 160):
    if num_examples < 0:
      raise ValueError(f"{num_examples=} must be >= 0")
    if not 1 <= min_side <= max_side:
      raise ValueError(f"need 1 <= min_side <= max_side, got {min_side=}, "
                       f"{max_side=}")
    self.num_examples = int(num_examples)
    self.seed = int(seed)
    self.min_side = int(min_side)
    self.max_side = int(max_side)

  @property
  def num_classes(self) -> int:
    return NUM_CLASSES

  @property
  def class_names(self) -> tuple[str, ...]:
    return CLASS_NAMES

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if index < 0:
      index += self.num_examples
    if not 0 <= index < self.num_examples:
      raise IndexError(f"index {index} out of range for {self!r}")
    # One independent stream per (seed, index): random access in any order
    # and in any worker gives the same image.
    rng = np.random.default_rng([self.seed, index])
    height, width = rng.integers(self.min_side, self.max_side + 1, 2)
    label = index % NUM_CLASSES
    image = render(label, int(height), int(width), rng)
    return {"image": image, "label": label}

  def __repr__(self) -> str:
    return (f"SyntheticShapes(num_examples={self.num_examples}, "
            f"seed={self.seed}, min_side={self.min_side}, "
            f"max_side={self.max_side})")
