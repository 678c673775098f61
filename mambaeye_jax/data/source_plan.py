"""The training transform's plan as a fixed-length vector, for the device.

With `DataConfig.ship` "source" the workers draw every random choice of a
sample as today (`augment.plan`, `augment.erase_box`, the scan pattern,
from Grain's per-record generator) but render no pixels: they ship the
decoded image, zero-padded to a fixed side, and this vector; the training
step renders the canvas on the device (`mambaeye_jax.device_augment`).

The vector, (PLAN_SIZE,) float32, one slot per named quantity (every
integer is exact in float32: all are below 2^24):

  CANVAS          canvas side c.
  SOURCE_H, _W    the decoded image's size (at the padded source's top-left).
  FIT_W, FIT_H    step 2's fitted size (w1, h1).
  FIT_LANCZOS     1 when the fit shrinks an axis (LANCZOS), 0 (BICUBIC).
  JITTER_OPS      4 slots: the colour adjustments in their drawn order, as
                  JITTER_CODES (brightness 0, contrast 1, saturation 2, hue
                  3); NO_OP (-1) everywhere when the sample has no jitter.
  JITTER_FACTORS  4 slots, in the same order: the blend factors; for hue the
                  8-bit shift of PIL's H (`augment._hue_shift`, 0..255).
  GRAY            1: grayscale (PIL's L weights) after the jitter.
  BLUR_SIGMA      the Gaussian blur's sigma; 0: no blur.
  WARP_W, WARP_H  size of the (possibly perspective-warped) image that the
                  crop reads: the fitted size without perspective.
  WARP            9 slots, row-major 3x3: warped pixel -> fitted pixel
                  (PIL's continuous coordinates, pixel i spans [i, i + 1)),
                  the horizontal flip composed in
                  (`augment.warp_to_fitted`, as the host's perspective path
                  uses it); without perspective, the flip alone or the
                  identity.
  CROP            4 slots: (x, y, w, h) of the crop window in the warped
                  image.
  OUT_W, OUT_H    the output size (rw, rh), pasted centred on the canvas.
  ERASE           4 slots: (top, left, h, w) of the erased box in output
                  pixels; h = w = 0: nothing erased.

The warp and the crop stay separate rather than composed into one output ->
fitted map: the official resizes the crop window with LANCZOS after the
warp, and the renderer does the same (antialiased when it shrinks), where a
composed map could only be point-sampled.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mambaeye_jax.data import augment

CANVAS = 0
SOURCE_H, SOURCE_W = 1, 2
FIT_W, FIT_H = 3, 4
FIT_LANCZOS = 5
JITTER_OPS = slice(6, 10)
JITTER_FACTORS = slice(10, 14)
GRAY = 14
BLUR_SIGMA = 15
WARP_W, WARP_H = 16, 17
WARP = slice(18, 27)
CROP = slice(27, 31)
OUT_W, OUT_H = 31, 32
ERASE = slice(33, 37)
PLAN_SIZE = 37

JITTER_CODES = {"brightness": 0, "contrast": 1, "saturation": 2, "hue": 3}
NO_OP = -1


def encode_plan(params: dict[str, Any], erase: tuple[int, int, int, int] | None,
                source_hw: tuple[int, int]) -> np.ndarray:
  """One sample's plan as the device renderer reads it.

  Args:
    params: from `augment.plan`.
    erase: from `augment.erase_box` on the output size, or None.
    source_hw: (height, width) of the decoded image the device resizes.

  Returns:
    (PLAN_SIZE,) float32 (module docstring).
  """
  v = np.zeros(PLAN_SIZE, np.float64)
  w1, h1 = params["fit"]
  v[CANVAS] = params["canvas"]
  v[SOURCE_H], v[SOURCE_W] = source_hw
  v[FIT_W], v[FIT_H] = w1, h1
  v[FIT_LANCZOS] = float(w1 < source_hw[1] or h1 < source_hw[0])
  ops = np.full(4, NO_OP, np.float64)
  factors = np.zeros(4, np.float64)
  for k, (op, factor) in enumerate(params["jitter"] or ()):
    ops[k] = JITTER_CODES[op]
    factors[k] = augment._hue_shift(factor) if op == "hue" else factor  # pylint: disable=protected-access
  v[JITTER_OPS], v[JITTER_FACTORS] = ops, factors
  v[GRAY] = float(params["gray"])
  v[BLUR_SIGMA] = params["blur_sigma"] or 0.0
  wp, hp = (w1, h1) if params["perspective"] is None else params["perspective"][0]
  v[WARP_W], v[WARP_H] = wp, hp
  v[WARP] = augment.warp_to_fitted(params).reshape(-1)
  v[CROP] = params["crop"]
  v[OUT_W], v[OUT_H] = params["out_size"]
  if erase is not None:
    v[ERASE] = erase
  return v.astype(np.float32)
