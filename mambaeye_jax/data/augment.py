"""The official training transform (DESIGN.md section 3), fast: PIL, numpy, OpenCV.

Official order (`mambaeye/dataset.py`, `ImagenetDatasetSinusoidal`):

  1. canvas side c ~ U{canvas_min..canvas_max};
  2. aspect-resize to fit c x c: (int(w * s), int(h * s)), s = min(c/w, c/h),
     LANCZOS when shrinking, BICUBIC otherwise;
  3. horizontal flip p 0.5; ColorJitter(0.4, 0.4, 0.4, 0.1) p 0.4 (the four
     adjustments in a random order, torchvision's PIL path); grayscale p 0.2;
     GaussianBlur p 0.2 with torchvision `GaussianBlur(kernel_size=(5, 9),
     sigma=(0.1, 5.0))`, i.e. a 5-wide, 9-tall kernel (DESIGN.md's "kernel
     5..9" reads this tuple as a range; torchvision takes it as (kx, ky)) and
     sigma ~ U(0.1, 5), reflect padding;
  4. perspective p 0.3: corners moved by U(-d, d), d = 0.5 * min(w, h) / 2,
     output = the moved corners' bounding box, BICUBIC, black fill;
  5. min_side = max(16, int(0.3 * min(w, h))); with p 0.8 crop a random
     window of sides U{min_side..side - min_side}, then (always) LANCZOS
     resize to independent U{min_side..c} width and height;
  6. RandomErasing p 0.4 (scale 0.02..0.33, ratio 0.3..3.3, value 0);
  7. paste centred on a zero c x c canvas.

What this implementation does differently, and why it is the same data:

  * Fused geometry: flip, perspective, crop and the final resize compose
    into one map from output pixels to input pixels. Without perspective it
    is one axis-aligned LANCZOS `resize(box=...)` (flip then crop equals
    crop at the mirrored offset then flip); with perspective, one BICUBIC
    warp (black fill) of the crop window only, at the coarser of the input's
    and the output's scale, then a LANCZOS resize to the output where it is
    larger. The input is the decoded image when the fit enlarges it (an
    enlargement adds no detail), and the fitted image, built as the official
    builds it, when the fit shrinks it or blur needs its pixel grid; then
    only the window the crop sees (plus the filters' reach) is built,
    coloured and blurred. Resampling once instead of two or three times
    changes pixels by ~1 gray level on average (tests/test_data_augment.py
    bounds it against `apply_reference`, the step-by-step chain; backend
    "pil", the same filters).
  * Point-wise colour steps (jitter, grayscale) run on the smallest image
    where the official order allows: before the geometry (the official
    order; on the decoded pixels, before the fit, when the fit enlarges),
    or after it when there is neither blur nor perspective (whose black
    fill the official never colours). Point-wise maps commute with
    resampling up to 8-bit rounding; the one non-point-wise input, the
    contrast adjustment's grayscale mean, is taken from a 64-pixel
    thumbnail of the whole (uncropped) image with the earlier adjustments
    applied, as the official takes it from the whole image (within a gray
    level or so). Brightness and contrast run as lookup tables of PIL's own
    blend (identical output). The hue shift runs as a 33^3 trilinear RGB
    lookup table (PIL's `Color3DLUT`, one per 8-bit shift, cached) of the
    continuous map behind PIL's HSV round trip: half its cost, ~0.3 levels
    from it on average (`apply_reference` keeps the exact round trip).
    Images of at most HUE_EXACT_MAX_PIXELS (CIFAR) take the exact round
    trip instead, where the table's per-call setup costs more. (Backend
    "opencv": OpenCV's own 8-bit HSV round trip, ~15x PIL's speed.)
  * Grayscale samples run as one L band from the grayscale step on (its
    three channels are equal; a third of the resampling work), and from
    before the fit when there is no jitter (point-wise, as above). The
    output is expanded to three channels at the end.
  * Step 2 uses LANCZOS when shrinking, as DESIGN.md says. (The official
    code compares the already-fitted size with the canvas, so it in fact
    always takes BICUBIC.)
  * JPEGs are decoded at reduced DCT scale when the fitted size is at most
    half the stored size (never below the fitted size; see
    `sources.decode_image`).
  * An axis too short to crop (side < 2 * min_side: fitted sides under 32
    pixels, e.g. very elongated images or canvas 32 on CIFAR) is kept whole;
    the official code raises there and drops the sample.
  * Images smaller than a patch need nothing special: step 2 upsamples every
    image to touch the canvas, and step 5 makes both sides >= 16.

Two backends (`apply(..., backend)`, `DataConfig.transform_backend`) run
the same plan through the same steps and differ only in the few filters:

  * "opencv" (the default): OpenCV's resize (per axis: bicubic when it
    enlarges, blur + bicubic when it shrinks by less than 2x, area averaging
    from 2x), bicubic perspective warp, separable blur and 8-bit HSV round
    trip for the hue; ~3x less CPU than "pil" on ImageNet photos. Its pixels
    are statistically those of "pil" (per-channel means and stds within a
    tenth of a level on average, sharpness ~2-3% lower, the same black
    fill), not identical: the kernels differ, and a resized box may sit up
    to half an output pixel from PIL's (`_resize_axis`).
  * "pil": Pillow's LANCZOS / BICUBIC filters as the official uses them,
    the hue by the lookup table below: the reference path, the one
    `apply_reference` is compared with.

Every random choice comes from the `np.random.Generator` passed in (Grain's
per-record generator), so a (seed, record index) pair fixes the output.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageStat
from scipy import ndimage

from mambaeye_jax.data import geometry


P = geometry.PATCH_SIZE

# Backends of `apply`'s resampling, blur and hue shift (`DataConfig.
# transform_backend`): "opencv" (the default, fast) or "pil" (the reference:
# Pillow's filters, as `apply_reference` uses them). The plan, the geometry
# and every other step are the same code for both.
BACKENDS = ("opencv", "pil")

# The data pipeline runs one record per worker thread and as many workers as
# cores: OpenCV's own thread pool would only contend with the other workers
# (and count their CPU time twice in the benchmark's per-core figures).
cv2.setNumThreads(1)


def check_backend(backend: str) -> None:
  """Raises ValueError naming the backends when `backend` is not one."""
  if backend not in BACKENDS:
    raise ValueError(f"transform_backend={backend!r} is not a transform backend; one of "
                     f"{BACKENDS} ('opencv': fast, the default; 'pil': the reference)")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Training transform parameters; defaults are the official ones."""
  canvas_min: int = 256
  canvas_max: int = 1024
  flip_prob: float = 0.5
  jitter_prob: float = 0.4
  brightness: float = 0.4
  contrast: float = 0.4
  saturation: float = 0.4
  hue: float = 0.1
  grayscale_prob: float = 0.2
  blur_prob: float = 0.2
  blur_kernel: tuple[int, int] = (5, 9)  # (width, height), as torchvision.
  blur_sigma: tuple[float, float] = (0.1, 5.0)
  perspective_prob: float = 0.3
  perspective_distortion: float = 0.5
  crop_prob: float = 0.8
  crop_min_fraction: float = 0.3
  erase_prob: float = 0.4
  erase_scale: tuple[float, float] = (0.02, 0.33)
  erase_ratio: tuple[float, float] = (0.3, 3.3)

  def __post_init__(self):
    if not P <= self.canvas_min <= self.canvas_max:
      raise ValueError(f"need {P} <= canvas_min <= canvas_max, got "
                       f"{self.canvas_min=}, {self.canvas_max=}")
    if any(k % 2 == 0 or k < 1 for k in self.blur_kernel):
      raise ValueError(f"{self.blur_kernel=} must be odd and positive")
    # Out-of-range values would not fail, only train on odd images.
    for name in ("flip_prob", "jitter_prob", "grayscale_prob", "blur_prob",
                 "perspective_prob", "crop_prob", "erase_prob",
                 "perspective_distortion"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f"augment.{name}={getattr(self, name)} must be in [0, 1]")
    for name in ("brightness", "contrast", "saturation"):
      if getattr(self, name) < 0:
        raise ValueError(f"augment.{name}={getattr(self, name)} must be >= 0")
    if not 0.0 <= self.hue <= 0.5:
      raise ValueError(f"augment.hue={self.hue} must be in [0, 0.5]")
    if not 0.0 < self.crop_min_fraction <= 1.0:
      raise ValueError(f"augment.crop_min_fraction={self.crop_min_fraction} must be in (0, 1]")
    ranges = {"blur_sigma": (self.blur_sigma, None), "erase_scale": (self.erase_scale, 1.0),
              "erase_ratio": (self.erase_ratio, None)}
    for name, (pair, top) in ranges.items():
      lo, hi = pair
      if not 0 < lo <= hi or (top is not None and hi > top):
        bound = f" <= {top}" if top is not None else ""
        raise ValueError(f"augment.{name}={tuple(pair)} must satisfy 0 < low <= high{bound}")


def fit_size(width: int, height: int, canvas: int) -> tuple[int, int]:
  """Official aspect-fit size (width, height): int(side * min(c/w, c/h))."""
  scale = min(canvas / width, canvas / height)
  return max(1, int(width * scale)), max(1, int(height * scale))


# ---------------------------------------------------------------- colour


def _jitter_plan(rng: np.random.Generator, cfg: AugmentConfig
                 ) -> list[tuple[str, float]]:
  """torchvision ColorJitter.get_params: a random order and four factors."""
  factors = {
      "brightness": rng.uniform(1 - cfg.brightness, 1 + cfg.brightness),
      "contrast": rng.uniform(1 - cfg.contrast, 1 + cfg.contrast),
      "saturation": rng.uniform(1 - cfg.saturation, 1 + cfg.saturation),
      "hue": rng.uniform(-cfg.hue, cfg.hue),
  }
  order = ("brightness", "contrast", "saturation", "hue")
  return [(order[i], factors[order[i]]) for i in rng.permutation(4)]


def _gray_mean(image: Image.Image) -> int:
  """PIL ImageEnhance.Contrast's degenerate level: rounded mean of L."""
  return int(ImageStat.Stat(image.convert("L")).mean[0] + 0.5)


def _adjust(image: Image.Image, op: str, factor: float,
            mean: int | None = None) -> Image.Image:
  """One torchvision (PIL path) colour adjustment.

  Args:
    image: RGB image.
    op: brightness | contrast | saturation | hue.
    factor: its factor (hue: shift in [-0.5, 0.5] of a turn).
    mean: contrast's gray level; None computes it from `image` itself.

  Returns:
    The adjusted RGB image.
  """
  if op == "brightness":
    return ImageEnhance.Brightness(image).enhance(factor)
  if op == "contrast":
    level = _gray_mean(image) if mean is None else mean
    return Image.blend(Image.new("RGB", image.size, (level,) * 3), image,
                       factor)
  if op == "saturation":
    return ImageEnhance.Color(image).enhance(factor)
  if op == "hue":
    # torchvision adds np.uint8(hue * 255) to H with uint8 wrap-around. A
    # lookup table on the HSV image (identity on S and V) does it without a
    # round trip through numpy.
    return _hue_exact(image, _hue_shift(factor))
  raise ValueError(f"unknown colour op {op!r}")


def _hue_exact(image: Image.Image, shift: int) -> Image.Image:
  """PIL's HSV round trip with `shift` added to H (uint8 wrap-around).

  The addition runs in numpy: `point` with a Python table rounds its 768
  entries in Python on every call (~0.1 ms, more than the whole shift costs
  on a CIFAR-sized image); the wrap-around of uint8 is the table's `% 256`.
  """
  hsv = np.array(image.convert("HSV"))
  hsv[..., 0] += np.uint8(shift)
  return Image.fromarray(hsv, "HSV").convert("RGB")


# Grid points per axis of the hue shift's 3D lookup table (see `_hue_lut`).
HUE_LUT_SIZE = 33

# Up to this many pixels the fast transform shifts the hue exactly
# (`_hue_exact`) rather than by the lookup table: applying a table first
# converts its 33^3 x 3 entries to PIL's fixed point (~0.2 ms a call, the
# cost of the exact shift on ~8,000 pixels), which dominates on small
# images (CIFAR). Measured crossover on one core: 8,000 to 10,000 pixels.
HUE_EXACT_MAX_PIXELS = 8192

# Up to this many pixels an 8-bit lookup table runs in numpy: `Image.point`
# rounds its Python table entry by entry on every call (~0.1 ms for RGB),
# numpy's fancy index costs ~1 ns a byte; above it PIL's single pass wins.
NUMPY_TABLE_MAX_PIXELS = 16384

# The six HSV sectors' (r, g, b) as indices into (v, p, q, t), as hsv2rgb.
_SECTOR_RGB = np.array([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0],
                        [3, 1, 0], [0, 1, 2]])


def _rgb_to_hsv(rgb: np.ndarray, exact: bool) -> tuple[np.ndarray, ...]:
  """PIL's rgb2hsv: (h, s, v) in 8-bit units, float64, of (..., 3) colours.

  exact: PIL's arithmetic (float32 where its C code uses float; H and S
  truncated to integers); otherwise the continuous values less half a unit,
  the truncation's mean effect.
  """
  f32 = np.float32
  r, g, b = (np.asarray(rgb, np.float64)[..., k].astype(f32) for k in range(3))
  v = np.maximum(np.maximum(r, g), b)
  cr = v - np.minimum(np.minimum(r, g), b)
  safe = np.where(cr > 0, cr, f32(1))
  s = cr / np.where(v > 0, v, f32(1))
  rc, gc, bc = (v - r) / safe, (v - g) / safe, (v - b) / safe
  # Double sums stored in float, then double arithmetic, as in the C code.
  h = np.where(r == v, bc - gc, np.where(
      g == v, (2.0 + rc.astype(np.float64) - bc).astype(f32),
      (4.0 + gc.astype(np.float64) - rc).astype(f32)))
  h = np.fmod(h.astype(np.float64) / 6.0 + 1.0, 1.0).astype(f32)
  h = np.where(cr > 0, h.astype(np.float64) * 255.0, 0.0)
  s = np.where(cr > 0, s.astype(np.float64) * 255.0, 0.0)
  if exact:
    return np.trunc(h), np.trunc(s), v.astype(np.float64)
  return np.maximum(h - 0.5, 0.0), np.maximum(s - 0.5, 0.0), v.astype(
      np.float64)


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray,
                exact: bool) -> np.ndarray:
  """PIL's hsv2rgb (double arithmetic) of 8-bit-unit h, s, v: (..., 3).

  exact: outputs rounded as its C round() (half away from zero).
  """
  x = h * (6.0 / 255.0)
  sector = np.floor(x)
  fs = (x - sector) * s * 255.0
  p = v * (255.0 - s) / 255.0
  q = v * (255.0 * 255.0 - fs) / (255.0 * 255.0)
  t = v * (255.0 * 255.0 - (255.0 * s - fs)) / (255.0 * 255.0)
  values = np.stack([v, p, q, t], -1)
  if exact:
    values = np.floor(values + 0.5)
  pick = _SECTOR_RGB[sector.astype(np.int64) % 6]
  out = np.take_along_axis(values, pick, -1)
  return np.where((s > 0)[..., None], out, v[..., None])


def _hue_rgb(rgb: np.ndarray, shift: int, exact: bool = False) -> np.ndarray:
  """PIL's hue shift: RGB -> HSV, H + shift (8-bit wrap) -> RGB, per colour.

  Args:
    rgb: (..., 3) colours in [0, 255] (any real values).
    shift: added to PIL's 8-bit H (255 units are a turn), mod 256.
    exact: PIL's own arithmetic (its C conversions: float32 where they use
      float, H and S truncated to 8 bits, outputs rounded): on integer
      colours this equals `convert("HSV")`, the shift, `convert("RGB")`.
      Otherwise the continuous map that PIL's rounds: H and S less half a
      unit (the mean effect of the truncation) and no output rounding, the
      values a lookup table interpolates best.

  Returns:
    (..., 3) float64 in [0, 255].
  """
  h, s, v = _rgb_to_hsv(rgb, exact)
  return _hsv_to_rgb(np.mod(h + shift, 256.0), s, v, exact)


@functools.lru_cache(maxsize=1)
def _grid_hsv() -> tuple[np.ndarray, ...]:
  """The continuous HSV of the lookup table's grid (red fastest)."""
  grid = np.arange(HUE_LUT_SIZE) * (255.0 / (HUE_LUT_SIZE - 1))
  b, g, r = np.meshgrid(grid, grid, grid, indexing="ij")
  return _rgb_to_hsv(np.stack([r, g, b], -1).reshape(-1, 3), exact=False)


@functools.lru_cache(maxsize=None)
def _hue_lut(shift: int) -> ImageFilter.Color3DLUT:
  """The hue shift as PIL's trilinear 3D lookup table, cached per shift.

  Applying it (~15 ns per pixel) costs about half PIL's HSV round trip
  (~30 ns); it differs from the exact shift by ~0.3 levels on average on
  ImageNet photos (the exact path's own 8-bit HSV rounding is most of it).
  A table is 33^3 x 3 float32 (0.4 MB): for hue 0.1, 51 shifts, 22 MB.
  """
  h, s, v = _grid_hsv()
  table = _hsv_to_rgb(np.mod(h + shift, 256.0), s, v, exact=False) / 255.0
  return ImageFilter.Color3DLUT(HUE_LUT_SIZE,
                                table.astype(np.float32).reshape(-1))


@functools.lru_cache(maxsize=None)
def _build_hue_luts(hue: float) -> None:
  """Builds the table of every shift that ColorJitter(hue=hue) can draw.

  Once per process and config (~0.17 s of one core for hue 0.1), at its
  first jittered sample, so that later samples never pay a table's
  construction.
  """
  for shift in range(int(-hue * 255), int(hue * 255) + 1):
    _hue_lut(shift % 256)


def _hue_shift(factor: float) -> int:
  """torchvision's np.uint8(hue * 255) as a 0..255 shift of PIL's H.

  int() truncates toward zero as that C cast does; % 256 wraps negatives.
  """
  return int(factor * 255) % 256


def _blend_table(level: int, factor: float) -> list[int]:
  """`Image.blend(constant level, image, factor)` for each 8-bit value.

  PIL's own blend of the 256 levels (its float arithmetic and clipping), so
  `image.point` of this table equals the blend exactly.
  """
  ramp = Image.frombytes("L", (256, 1), bytes(range(256)))
  return list(Image.blend(Image.new("L", (256, 1), level), ramp,
                          factor).tobytes())


def _apply_table(image: Image.Image, table: list[int] | None) -> Image.Image:
  """The same 8-bit lookup table on every band (None: unchanged)."""
  if table is None:
    return image
  if image.width * image.height <= NUMPY_TABLE_MAX_PIXELS:
    # Same table, same result (see NUMPY_TABLE_MAX_PIXELS).
    lut = np.asarray(table, np.uint8)
    return Image.fromarray(lut[np.asarray(image)], image.mode)
  return image.point(table * len(image.getbands()))


def _colour(image: Image.Image, jitter: list[tuple[str, float]] | None,
            gray: bool, thumbnail: Image.Image | None = None,
            gray_as_l: bool = False, hue_lut: bool = False,
            backend: str = "pil") -> Image.Image:
  """ColorJitter (in its drawn order) then grayscale, as the official.

  Args:
    image: RGB image to adjust (or L when only `gray` is asked: unchanged).
    jitter: the plan of `_jitter_plan`, or None (no jitter).
    gray: convert to 3-channel grayscale at the end.
    thumbnail: when `image` is a crop of the image the official adjusts, a
      small copy of the whole image: the contrast mean is taken from it with
      the adjustments drawn before contrast applied.
    gray_as_l: return the grayscale image as one L band (its three equal
      channels), for later steps to work on a third of the bytes.
    hue_lut: shift the hue of `image` with the cached 3D lookup table
      (`_hue_lut`, ~0.3 levels from the exact shift) instead of PIL's HSV
      round trip, on images above HUE_EXACT_MAX_PIXELS (the thumbnail and
      smaller images keep the exact one).
    backend: "opencv" shifts the hue of `image` (not the thumbnail's) with
      OpenCV's 8-bit HSV round trip instead (`_hue_opencv`).

  Returns:
    The adjusted RGB image, or L when `gray` and `gray_as_l`.
  """
  # Brightness and contrast are the same map on every channel value: one
  # lookup table each (PIL's own blend of the 256 levels, so identical),
  # composed while adjacent, applied before any other step reads the image.
  pending = None
  for op, factor in jitter or ():
    if op in ("brightness", "contrast"):
      if op == "brightness":
        level = 0  # ImageEnhance.Brightness blends with black.
      elif thumbnail is not None:
        level = _gray_mean(thumbnail)
      else:
        image, pending = _apply_table(image, pending), None
        level = _gray_mean(image)
      table = _blend_table(level, factor)
      pending = table if pending is None else [table[v] for v in pending]
    else:
      image, pending = _apply_table(image, pending), None
      if op == "hue" and backend == "opencv":
        image = _hue_opencv(image, _hue_shift(factor))
      elif (op == "hue" and hue_lut
            and image.width * image.height > HUE_EXACT_MAX_PIXELS):
        image = image.filter(_hue_lut(_hue_shift(factor)))
      else:
        image = _adjust(image, op, factor)
    if op == "contrast":
      thumbnail = None  # Later adjustments never read it.
    if thumbnail is not None:
      thumbnail = _adjust(thumbnail, op, factor)
  image = _apply_table(image, pending)
  if gray:
    image = image.convert("L")
    if not gray_as_l:
      image = image.convert("RGB")
  return image


def _fast_colour(image: Image.Image, jitter: list[tuple[str, float]] | None,
                 gray: bool, thumbnail: Image.Image | None,
                 backend: str) -> Image.Image:
  """`_colour` as `apply` runs it: grayscale kept as one L band, the hue
  shifted by OpenCV or by the cached lookup table, as `backend` says
  (`apply_reference` keeps the defaults, the official step-by-step forms)."""
  return _colour(image, jitter, gray, thumbnail, gray_as_l=True, hue_lut=True,
                 backend=backend)


def _hue_opencv(image: Image.Image, shift: int) -> Image.Image:
  """The hue shift by OpenCV's 8-bit HSV round trip (~15x PIL's).

  OpenCV's full-range H has 256 units a turn, PIL's 255: the same integer
  shift turns by 0.4% more, under a unit for any shift ColorJitter draws
  (|shift| <= 127). OpenCV rounds H and S where PIL truncates them: no bias
  either way beyond half a level. Grays stay exactly gray (S = 0).
  """
  hsv = cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2HSV_FULL)
  hsv[..., 0] += np.uint8(shift)  # uint8 wrap-around, as torchvision.
  return Image.fromarray(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL), "RGB")


def _gaussian_kernel(size: int, sigma: float) -> np.ndarray:
  """torchvision _get_gaussian_kernel1d: (size,) float32, sums to 1."""
  x = np.linspace(-(size - 1) / 2, (size - 1) / 2, size)
  pdf = np.exp(-0.5 * (x / sigma) ** 2)
  return (pdf / pdf.sum()).astype(np.float32)


def _blur(image: Image.Image, kernel_wh: tuple[int, int],
          sigma: float, backend: str = "pil") -> Image.Image:
  """torchvision gaussian_blur on uint8: float conv, reflect pad, round.

  Any 8-bit mode (RGB or L); returns the same mode. backend "opencv":
  OpenCV's separable filter with the same kernels and padding (its 8-bit
  arithmetic rounds within a level of the float convolution's).
  """
  pixels = np.asarray(image)
  kx, ky = kernel_wh
  if backend == "opencv":
    out = cv2.sepFilter2D(pixels, -1, _gaussian_kernel(kx, sigma),
                          _gaussian_kernel(ky, sigma),
                          borderType=cv2.BORDER_REFLECT_101)
    return Image.fromarray(out, image.mode)
  # torch "reflect" padding excludes the edge pixel: scipy's "mirror".
  out = ndimage.correlate1d(pixels, _gaussian_kernel(ky, sigma), axis=0,
                            output=np.float32, mode="mirror")
  out = ndimage.correlate1d(out, _gaussian_kernel(kx, sigma), axis=1,
                            output=np.float32, mode="mirror")
  # Float32 bounds: with Python ints np.clip takes a slow path (~20x).
  np.clip(np.rint(out, out=out), np.float32(0), np.float32(255), out=out)
  return Image.fromarray(out.astype(np.uint8), image.mode)


# ---------------------------------------------------------------- geometry


def _perspective_plan(rng: np.random.Generator, width: int, height: int,
                      distortion: float
                      ) -> tuple[tuple[int, int], np.ndarray]:
  """Official `apply_perspective` geometry.

  Returns:
    ((out_width, out_height), coeffs (8,)): PIL PERSPECTIVE coefficients
    mapping output pixels to input pixels.
  """
  source = np.array([[0, 0], [width, 0], [width, height], [0, height]],
                    np.float64)
  delta = distortion * min(width, height) / 2
  target = source + rng.uniform(-delta, delta, (4, 2))
  lo, hi = target.min(axis=0), target.max(axis=0)
  out_size = (max(1, int(np.ceil(hi[0] - lo[0]))),
              max(1, int(np.ceil(hi[1] - lo[1]))))
  target -= lo
  # Solve for the homography taking target (output) points to source points.
  a = np.zeros((8, 8))
  for k, ((x, y), (u, v)) in enumerate(zip(target, source)):
    a[2 * k] = [x, y, 1, 0, 0, 0, -u * x, -u * y]
    a[2 * k + 1] = [0, 0, 0, x, y, 1, -v * x, -v * y]
  coeffs = np.linalg.solve(a, source.reshape(-1))
  return out_size, coeffs


def warp_to_fitted(params: dict[str, Any]) -> np.ndarray:
  """(3, 3) float64: the plan's warped pixel -> fitted pixel map.

  PIL's continuous coordinates (pixel i spans [i, i + 1)), as PIL's
  PERSPECTIVE coefficients (output -> input); the horizontal flip, which the
  official applies before the warp, composed in (fitted x -> w1 - x).
  Without perspective: the flip alone, or the identity.
  """
  if params["perspective"] is None:
    warp = np.eye(3)
  else:
    warp = np.append(params["perspective"][1], 1.0).reshape(3, 3)
  if params["flip"]:
    w1 = params["fit"][0]
    warp = np.array([[-1, 0, w1], [0, 1, 0], [0, 0, 1]], np.float64) @ warp
  return warp


def _crop_axis(rng: np.random.Generator, side: int,
               min_side: int) -> tuple[int, int]:
  """Official crop extent and offset along one axis: (offset, extent).

  An axis shorter than 2 * min_side cannot be cropped by the official rule
  (it raises); it is kept whole here.
  """
  if side < 2 * min_side:
    return 0, side
  extent = int(rng.integers(min_side, side - min_side, endpoint=True))
  offset = int(rng.integers(0, side - extent, endpoint=True))
  return offset, extent


def erase_box(rng: np.random.Generator, height: int, width: int,
              cfg: AugmentConfig) -> tuple[int, int, int, int] | None:
  """torchvision RandomErasing's box (value 0) on an (height, width) image.

  The one drawing of the box, shared by `apply` (which zeroes it) and the
  device path (`pipeline.TrainTransform` with ship "source", which ships it in
  the plan), so that one generator state gives both the same box.

  Returns:
    (top, left, eh, ew), or None when no attempt of torchvision's ten fits.
  """
  area = height * width
  log_ratio = np.log(cfg.erase_ratio)
  for _ in range(10):  # torchvision's attempts.
    erase_area = area * rng.uniform(*cfg.erase_scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    eh = int(round(math.sqrt(erase_area * aspect)))
    ew = int(round(math.sqrt(erase_area / aspect)))
    if not (eh < height and ew < width):
      continue
    top = int(rng.integers(0, height - eh, endpoint=True))
    left = int(rng.integers(0, width - ew, endpoint=True))
    return top, left, eh, ew
  return None


def _random_erase(pixels: np.ndarray, rng: np.random.Generator,
                  cfg: AugmentConfig) -> None:
  """torchvision RandomErasing (value 0) in place, on (h, w, 3) uint8."""
  box = erase_box(rng, *pixels.shape[:2], cfg)
  if box is not None:
    top, left, eh, ew = box
    pixels[top:top + eh, left:left + ew] = 0


# ---------------------------------------------------------------- resampling


# Per axis, OpenCV reduces by area averaging from this reduction factor on;
# below it, by a Gaussian blur then bicubic interpolation (area averaging at
# factors near 1 blends neighbours like a bilinear filter: 20% less
# sharpness than PIL's LANCZOS at 1.1, where blur + bicubic is within 3%).
AREA_MIN_FACTOR = 2.0

# The antialiasing blur before a bicubic reduction by factor f < 2 has sigma
# ANTIALIAS_SIGMA * sqrt(f^2 - 1) input pixels: the sharpness (mean
# neighbour difference) of PIL's LANCZOS reduction within ~5% on ImageNet
# photos from f 1.1 to 2.
ANTIALIAS_SIGMA = 0.35


def _antialias_sigma(factor: float) -> float:
  """The blur before a bicubic reduction by `factor` (0: none)."""
  if 1 < factor < AREA_MIN_FACTOR:
    return ANTIALIAS_SIGMA * math.sqrt(factor * factor - 1)
  return 0.0


def _resize_axis(lo: float, hi: float, n_in: int, n_out: int
                 ) -> tuple[int, int, int, int, float]:
  """How `_resize_opencv` covers input span [lo, hi) with n_out pixels.

  Returns:
    (start, stop, offset, factor): resize input pixels [start, stop) and
    keep output pixels [offset, offset + n_out); factor: input pixels per
    output pixel. Interpolation (factor < AREA_MIN_FACTOR) resizes whole
    pixels around the span, with the reach of its filters, at the span's
    exact scale and cuts the span out: the span moves by at most half an
    output pixel. Area averaging snaps the span to whole input pixels
    (offset 0): its edges move by at most half an input pixel (a fraction
    of an output pixel).
  """
  factor = (hi - lo) / n_out
  if factor < AREA_MIN_FACTOR:
    # Input pixels the filters read beyond the span (as PIL's read the
    # image around a box): the bicubic taps 2, the blur its kernel's radius.
    reach = 2 + math.ceil(3 * _antialias_sigma(factor))
    start = max(0, math.floor(lo) - reach)
    stop = min(n_in, math.ceil(hi) + reach)
    # OpenCV's output has round((stop - start) / factor) pixels: the span
    # fits in it, but for the rounding at the image's edge.
    size = round((stop - start) / factor)
    offset = max(0, min(round((lo - start) / factor), size - n_out))
    return start, stop, offset, factor
  start = min(n_in - 1, max(0, round(lo)))
  stop = max(start + 1, min(n_in, round(hi)))
  return start, stop, 0, factor


def _resize_opencv(pixels: np.ndarray, size: tuple[int, int],
                   box: tuple[float, float, float, float]) -> np.ndarray:
  """PIL's `resize(size, LANCZOS or BICUBIC, box=box)`, by OpenCV.

  Per axis: an enlargement is interpolated bicubically (INTER_CUBIC, a =
  -0.75: between PIL's BICUBIC, a = -0.5, and LANCZOS in sharpness); a
  reduction by a factor of AREA_MIN_FACTOR or more is averaged by area
  (INTER_AREA, antialiased as PIL's LANCZOS, ~5% softer); a smaller one is
  blurred (ANTIALIAS_SIGMA) and interpolated bicubically. Area averaging
  runs first, so that the rest works on fewer pixels. Costs ~5-15x less
  than PIL's resize.

  Args:
    pixels: (h, w, 3) or (h, w) uint8.
    size: (width, height) of the output.
    box: (x0, y0, x1, y1) of `pixels`, continuous coordinates (pixel i
      spans [i, i + 1)), as PIL's.

  Returns:
    (height, width[, 3]) uint8.
  """
  (rw, rh), (x0, y0, x1, y1) = size, box
  xa, xb, ox, fx = _resize_axis(x0, x1, pixels.shape[1], rw)
  ya, yb, oy, fy = _resize_axis(y0, y1, pixels.shape[0], rh)
  out = pixels[ya:yb, xa:xb]
  area_x, area_y = fx >= AREA_MIN_FACTOR, fy >= AREA_MIN_FACTOR
  if area_x or area_y:
    out = cv2.resize(out, (rw if area_x else out.shape[1],
                           rh if area_y else out.shape[0]),
                     interpolation=cv2.INTER_AREA)
  sx, sy = _antialias_sigma(fx), _antialias_sigma(fy)
  if sx or sy:
    # 3 sigma each side (OpenCV's own 8-bit rule); 1: not this axis.
    kx, ky = (2 * math.ceil(3 * sg) + 1 if sg else 1 for sg in (sx, sy))
    out = cv2.GaussianBlur(out, (kx, ky), sx or 1.0, sigmaY=sy or 1.0,
                           borderType=cv2.BORDER_REPLICATE)
  if not (area_x and area_y):
    # No dsize: OpenCV then maps with exactly these scales (with a dsize it
    # would use the rounded size's).
    out = cv2.resize(out, None, fx=1.0 if area_x else 1 / fx,
                     fy=1.0 if area_y else 1 / fy, interpolation=cv2.INTER_CUBIC)
  return np.ascontiguousarray(out[oy:oy + rh, ox:ox + rw])


# An image between the steps of `apply`: PIL (RGB or L), or, out of the
# OpenCV backend's last resampling, (h, w, 3) or (h, w) uint8 (converting
# a large output to PIL and back would cost ~0.5 ms).
AnyImage = Image.Image | np.ndarray


def _size(image: AnyImage) -> tuple[int, int]:
  """(width, height) of either kind of image."""
  return image.size if isinstance(image, Image.Image) else image.shape[1::-1]


def _resize(image: AnyImage, size: tuple[int, int],
            resample: Image.Resampling, box: tuple[float, float, float, float]
            | None = None, backend: str = "pil", as_array: bool = False
            ) -> AnyImage:
  """`image.resize(size, resample, box=box)` in the given backend.

  resample (LANCZOS or BICUBIC) is the PIL backend's filter; OpenCV's
  choice follows each axis's scale (`_resize_opencv`). An array `image`
  (OpenCV backend only) is taken as it is; as_array: the OpenCV backend
  returns the array (the PIL backend always returns PIL).
  """
  if backend == "pil":
    return image.resize(size, resample, box=box)
  box = box if box is not None else (0, 0, *_size(image))
  out = _resize_opencv(np.asarray(image), size, box)
  return out if as_array else Image.fromarray(out)


def _warp(image: AnyImage, size: tuple[int, int], m: np.ndarray,
          backend: str = "pil", as_array: bool = False) -> AnyImage:
  """Bicubic perspective warp, black fill, in the given backend.

  Args:
    image: RGB or L (an array only with the OpenCV backend).
    size: (width, height) of the output.
    m: (3, 3) output -> input homography on PIL's continuous coordinates
      (pixel i spans [i, i + 1)), m[2, 2] = 1: PIL's PERSPECTIVE
      coefficients.
    backend, as_array: as `_resize`.

  Returns:
    The warped image, `image`'s mode.
  """
  if backend == "pil":
    return image.transform(size, Image.Transform.PERSPECTIVE,
                           tuple(m.reshape(-1)[:8]), Image.Resampling.BICUBIC,
                           fillcolor=0 if image.mode == "L" else (0, 0, 0))
  # OpenCV's pixel i is centred on i: shift in by half a pixel, out by half.
  half = np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]], np.float64)
  m = np.linalg.inv(half) @ m @ half
  out = cv2.warpPerspective(np.asarray(image), m, size,
                            flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=0)
  return out if as_array else Image.fromarray(out)


# ---------------------------------------------------------------- transform


# `_apply_perspective` warps straight to the output when the output has at
# most this many times the pixels of the warp's own grid; otherwise it warps
# at the grid and then enlarges. PIL's bicubic warp costs ~3x its LANCZOS
# resize per pixel; OpenCV's ~8x its bicubic resize.
WARP_STRAIGHT_MAX_GROWTH = {"pil": 1.5, "opencv": 1.1}


def plan(rng: np.random.Generator, width: int, height: int,
         cfg: AugmentConfig) -> dict[str, Any]:
  """Draws every random choice of one sample (before decoding the pixels).

  Args:
    rng: the record's generator.
    width, height: the stored image size.
    cfg: transform parameters.

  Returns:
    A dict: canvas, fit (w1, h1), flip, jitter, gray, blur_sigma,
    perspective ((wp, hp), coeffs) or None, crop (x, y, w, h) in the
    post-perspective image, out_size (rw, rh), erase (bool).
  """
  canvas = int(rng.integers(cfg.canvas_min, cfg.canvas_max, endpoint=True))
  w1, h1 = fit_size(width, height, canvas)
  flip = rng.random() < cfg.flip_prob
  jitter = _jitter_plan(rng, cfg) if rng.random() < cfg.jitter_prob else None
  gray = rng.random() < cfg.grayscale_prob
  blur_sigma = (float(rng.uniform(*cfg.blur_sigma))
                if rng.random() < cfg.blur_prob else None)
  perspective = None
  wp, hp = w1, h1
  if rng.random() < cfg.perspective_prob:
    perspective = _perspective_plan(rng, w1, h1, cfg.perspective_distortion)
    wp, hp = perspective[0]
  min_side = max(P, int(cfg.crop_min_fraction * min(wp, hp)))
  x, cw = _crop_axis(rng, wp, min_side)
  y, ch = _crop_axis(rng, hp, min_side)
  if not rng.random() < cfg.crop_prob:
    x, y, cw, ch = 0, 0, wp, hp
  min_side = min(min_side, canvas)
  out_size = (int(rng.integers(min_side, canvas, endpoint=True)),
              int(rng.integers(min_side, canvas, endpoint=True)))
  return {"canvas": canvas, "fit": (w1, h1), "flip": flip, "jitter": jitter,
          "gray": gray, "blur_sigma": blur_sigma, "perspective": perspective,
          "crop": (x, y, cw, ch), "out_size": out_size,
          "erase": rng.random() < cfg.erase_prob}


def _fitted(image: Image.Image, params: dict[str, Any],
            window: tuple[int, int, int, int],
            jitter: list[tuple[str, float]] | None = None, gray: bool = False,
            thumbnail: Image.Image | None = None, backend: str = "pil"
            ) -> Image.Image:
  """A window of the official fitted image (step 2), colour steps applied.

  The colour steps are point-wise, so they run on the smaller of the two
  images they may see (to +-1 level of rounding): the part of the decoded
  image that the fit reads when the fit enlarges, the fitted window when it
  shrinks. Grayscale alone always runs first, so that the fit resamples
  one band.

  Args:
    image: decoded RGB image (maybe DCT-reduced: any size >= the fit).
    params: the plan.
    window: (x0, y0, x1, y1) in fitted pixels; PIL resamples a box exactly
      as the whole image (to +-1 level of rounding), so the window equals
      that part of the full fitted image.
    jitter, gray, thumbnail: as `_colour`.
    backend: as `apply`.

  Returns:
    The window: RGB, or L when `gray`.
  """
  w1, h1 = params["fit"]
  x0, y0, x1, y1 = window
  width, height = image.size
  sx, sy = width / w1, height / h1
  shrink = w1 < width or h1 < height
  box = (x0 * sx, y0 * sy, x1 * sx, y1 * sy)
  colour = jitter is not None or gray
  if colour and (not shrink or jitter is None):
    # Only the part the resize reads: the box plus the filter's support
    # (LANCZOS 3, BICUBIC 2 input pixels, times the shrink) and one, so
    # that the resize sees the same pixels as on the whole image.
    support = 3.0 if shrink else 2.0
    pad_x, pad_y = support * max(1.0, sx) + 1, support * max(1.0, sy) + 1
    region = (max(0, math.floor(box[0] - pad_x)),
              max(0, math.floor(box[1] - pad_y)),
              min(width, math.ceil(box[2] + pad_x)),
              min(height, math.ceil(box[3] + pad_y)))
    image = _fast_colour(image.crop(region), jitter, gray, thumbnail, backend)
    box = (box[0] - region[0], box[1] - region[1], box[2] - region[0],
           box[3] - region[1])
    colour = False
  out = _resize(image, (x1 - x0, y1 - y0), Image.Resampling.LANCZOS if shrink
                else Image.Resampling.BICUBIC, box, backend)
  if colour:
    out = _fast_colour(out, jitter, gray, thumbnail, backend)
  return out


def _thumbnail(image: Image.Image) -> Image.Image:
  """64 x 64 copy of the whole image, for the contrast adjustment's mean.

  A 256 x 256 point sample averaged in 4 x 4 blocks: its gray mean is
  within 0.06 levels of the whole image's on average on ImageNet photos
  (max 0.4), as close as a BILINEAR thumbnail (0.07, max 0.3), at a quarter
  of the cost, since it reads 64 Ki pixels, not all of them.
  """
  return image.resize((256, 256), Image.Resampling.NEAREST).reduce(4)


def _apply_axis_aligned(image: Image.Image, params: dict[str, Any],
                        cfg: AugmentConfig, backend: str) -> AnyImage:
  """No perspective: flip + crop + resize are one axis-aligned box.

  Flip then crop equals crop at the mirrored offset then flip. The fitted
  image is built (as a window around the crop, plus the blur kernel's
  margin) only when the fit shrinks (later steps must not see detail the
  official drops) or blur needs the fitted pixel grid; otherwise the final
  LANCZOS resize reads the decoded image directly (the official BICUBIC
  enlargement adds no detail).
  """
  w1, h1 = params["fit"]
  x, y, cw, ch = params["crop"]
  if params["flip"]:
    x = w1 - x - cw
  jitter, gray = params["jitter"], params["gray"]
  colour = jitter is not None or gray
  shrink = w1 < image.size[0] or h1 < image.size[1]
  blur = params["blur_sigma"]
  # Colour always runs on part of the image: the contrast mean comes from a
  # thumbnail of the whole (only jitter has a contrast step).
  thumbnail = _thumbnail(image) if jitter is not None else None
  if shrink or blur is not None:
    mx, my = ((k // 2 for k in cfg.blur_kernel) if blur is not None
              else (0, 0))
    window = (max(0, x - mx), max(0, y - my), min(w1, x + cw + mx),
              min(h1, y + ch + my))
    # Coloured before the blur, as the official.
    base = _fitted(image, params, window, jitter, gray, thumbnail, backend)
    colour = False
    if blur is not None:
      # Beyond the margin the kernel sees real pixels; at the image's own
      # edges the window edge is the image edge, reflected as the official.
      base = _blur(base, cfg.blur_kernel, blur, backend)
    box = (x - window[0], y - window[1], x - window[0] + cw,
           y - window[1] + ch)
  else:
    base = image
    sx, sy = image.size[0] / w1, image.size[1] / h1
    box = (x * sx, y * sy, min((x + cw) * sx, image.size[0]),
           min((y + ch) * sy, image.size[1]))
  rw, rh = params["out_size"]
  if colour and base is image:
    # Colour only the part the resize reads: the box plus the LANCZOS
    # support (3 input pixels, times the shrink factor), so that the resize
    # sees the same pixels as on the whole image.
    pad_x = 3 * max(1.0, (box[2] - box[0]) / rw) + 1
    pad_y = 3 * max(1.0, (box[3] - box[1]) / rh) + 1
    region = (max(0, int(box[0] - pad_x)), max(0, int(box[1] - pad_y)),
              min(image.size[0], int(np.ceil(box[2] + pad_x))),
              min(image.size[1], int(np.ceil(box[3] + pad_y))))
    base = image.crop(region)
    box = (box[0] - region[0], box[1] - region[1], box[2] - region[0],
           box[3] - region[1])
  if colour and base.size[0] * base.size[1] <= rw * rh:
    base = _fast_colour(base, jitter, gray, thumbnail, backend)
    colour = False
  out = _resize(base, (rw, rh), Image.Resampling.LANCZOS, box, backend,
                as_array=not colour)
  if isinstance(out, np.ndarray):
    return cv2.flip(out, 1) if params["flip"] else out
  if params["flip"]:
    out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  if colour:  # The output is smaller than the input: colour it instead.
    out = _fast_colour(out, jitter, gray, thumbnail, backend)
  return out


def _apply_perspective(image: Image.Image, params: dict[str, Any],
                       cfg: AugmentConfig, backend: str) -> AnyImage:
  """With perspective: flip, warp, crop and resize composed into one warp.

  The official warps the whole fitted image at its scale, then LANCZOS-
  resizes the crop to the output. Here only the part of the image that the
  crop window sees (the bounding box of the window's preimage, plus the
  filters' reach) is built, coloured and blurred, and the warp renders the
  crop window only, at the coarser of the input's and the output's scale:
  when the output is larger, a LANCZOS resize enlarges the warp as the
  official's does; when smaller, the input is first shrunk to the output's
  scale with LANCZOS (the warp itself does not low-pass; the official resize
  does). Colour runs before the warp, whose black fill the official never
  colours, and before the blur, as the official.

  Maps are 3x3 homographies on PIL's continuous pixel coordinates (pixel i
  spans [i, i + 1)), output -> input as PIL's PERSPECTIVE coefficients.
  """
  w1, h1 = params["fit"]
  rw, rh = params["out_size"]
  x, y, cw, ch = params["crop"]
  jitter, gray, blur = params["jitter"], params["gray"], params["blur_sigma"]
  colour = jitter is not None or gray
  warp = warp_to_fitted(params)  # The flip (before the warp) composed in.
  # Window of the fitted image that the crop sees, padded by the reach of
  # the bicubic warp and the LANCZOS shrink (scaled by it) and of the blur.
  corners = warp @ np.array([[x, x + cw, x + cw, x], [y, y, y + ch, y + ch],
                             [1, 1, 1, 1]], np.float64)
  corners = corners[:2] / corners[2]
  mx, my = (k // 2 for k in cfg.blur_kernel) if blur is not None else (0, 0)
  pad_x = 4 * max(1.0, cw / rw) + 2 + mx
  pad_y = 4 * max(1.0, ch / rh) + 2 + my
  wx0 = int(np.clip(np.floor(corners[0].min() - pad_x), 0, w1))
  wy0 = int(np.clip(np.floor(corners[1].min() - pad_y), 0, h1))
  wx1 = int(np.clip(np.ceil(corners[0].max() + pad_x), 0, w1))
  wy1 = int(np.clip(np.ceil(corners[1].max() + pad_y), 0, h1))
  if wx1 <= wx0 or wy1 <= wy0:  # The crop sees only the black fill.
    return Image.new("RGB", (rw, rh))
  thumbnail = _thumbnail(image) if jitter is not None else None
  shrink = w1 < image.size[0] or h1 < image.size[1]
  if shrink or blur is not None:
    base = _fitted(image, params, (wx0, wy0, wx1, wy1), jitter, gray,
                   thumbnail, backend)
    colour = False
    to_base = np.array([[1, 0, -wx0], [0, 1, -wy0], [0, 0, 1]], np.float64)
  else:  # The warp reads the decoded image (BICUBIC enlargement adds none).
    sx, sy = image.size[0] / w1, image.size[1] / h1
    box = (int(wx0 * sx), int(wy0 * sy), min(image.size[0],
                                             int(np.ceil(wx1 * sx))),
           min(image.size[1], int(np.ceil(wy1 * sy))))
    base = image.crop(box) if colour else image
    offset = box[:2] if colour else (0, 0)
    to_base = np.array([[sx, 0, -offset[0]], [0, sy, -offset[1]], [0, 0, 1]],
                       np.float64)
  if colour:
    base = _fast_colour(base, jitter, gray, thumbnail, backend)
  if blur is not None:
    base = _blur(base, cfg.blur_kernel, blur, backend)
  crop_w, crop_h = cw * to_base[0, 0], ch * to_base[1, 1]  # Base pixels.
  fx, fy = max(1.0, crop_w / rw), max(1.0, crop_h / rh)
  if max(fx, fy) > 1.25:
    bw, bh = base.size
    size = (max(1, round(bw / fx)), max(1, round(bh / fy)))
    base = _resize(base, size, Image.Resampling.LANCZOS, backend=backend,
                   as_array=True)
    to_base = np.diag([size[0] / bw, size[1] / bh, 1.0]) @ to_base
    crop_w, crop_h = crop_w * size[0] / bw, crop_h * size[1] / bh
  grid = (min(rw, max(1, round(crop_w))), min(rh, max(1, round(crop_h))))
  if rw * rh <= WARP_STRAIGHT_MAX_GROWTH[backend] * grid[0] * grid[1]:
    # Nearly the output's size: warping straight to it is cheaper than
    # warp + resize (WARP_STRAIGHT_MAX_GROWTH says why).
    grid = (rw, rh)
  # Grid pixel -> crop window (persp. output) -> fitted -> base.
  to_crop = np.array([[cw / grid[0], 0, x], [0, ch / grid[1], y], [0, 0, 1]],
                     np.float64)
  m = to_base @ warp @ to_crop
  out = _warp(base, grid, m / m[2, 2], backend, as_array=True)
  if grid != (rw, rh):
    out = _resize(out, (rw, rh), Image.Resampling.LANCZOS, backend=backend,
                  as_array=True)
  return out


def apply(image: Image.Image, params: dict[str, Any], rng: np.random.Generator,
          cfg: AugmentConfig, backend: str = "opencv") -> np.ndarray:
  """Runs a `plan` on a decoded image (see the module docstring).

  Args:
    image: RGB PIL image (possibly DCT-reduced; its size may exceed the plan's
      `fit`, never fall below it).
    params: from `plan` on the stored image size.
    rng: the record's generator (random erasing draws from it).
    cfg: transform parameters.
    backend: "opencv" (fast) or "pil" (the reference's filters) for the
      resampling, the blur and the hue shift (BACKENDS); the same plan, the
      same output size.

  Returns:
    (rh, rw, 3) uint8: the image to paste centred on the zero canvas.
  """
  check_backend(backend)
  if params["jitter"] is not None and backend == "pil":
    _build_hue_luts(cfg.hue)
  if params["perspective"] is None:
    out = _apply_axis_aligned(image, params, cfg, backend)
  else:
    out = _apply_perspective(image, params, cfg, backend)
  if isinstance(out, np.ndarray):  # OpenCV's own output: writable.
    pixels = cv2.cvtColor(out, cv2.COLOR_GRAY2RGB) if out.ndim == 2 else out
  else:
    if out.mode == "L":  # Grayscale, kept as one band since the colour step.
      out = out.convert("RGB")
    pixels = np.array(out, np.uint8)  # Writable copy for erasing.
  if params["erase"]:
    _random_erase(pixels, rng, cfg)
  return pixels


def apply_reference(image: Image.Image, params: dict[str, Any],
                    rng: np.random.Generator, cfg: AugmentConfig
                    ) -> np.ndarray:
  """The same `plan`, run step by step in the official order and sizes.

  Slow (every step at the fitted size, the perspective at its full bounding
  box); a reference for tests and the benchmark. `apply` agrees with it up
  to resampling differences.

  Args: as `apply`.

  Returns:
    (rh, rw, 3) uint8.
  """
  w1, h1 = params["fit"]
  x, y, cw, ch = params["crop"]
  shrink = w1 < image.size[0] or h1 < image.size[1]
  inter = image.resize((w1, h1), Image.Resampling.LANCZOS if shrink
                       else Image.Resampling.BICUBIC)
  if params["flip"]:
    inter = inter.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  inter = _colour(inter, params["jitter"], params["gray"])
  if params["blur_sigma"] is not None:
    inter = _blur(inter, cfg.blur_kernel, params["blur_sigma"])
  if params["perspective"] is not None:
    size, coeffs = params["perspective"]
    inter = inter.transform(size, Image.Transform.PERSPECTIVE, tuple(coeffs),
                            Image.Resampling.BICUBIC, fillcolor=(0, 0, 0))
  out = inter.resize(params["out_size"], Image.Resampling.LANCZOS,
                     box=(x, y, x + cw, y + ch))
  pixels = np.array(out, np.uint8)
  if params["erase"]:
    _random_erase(pixels, rng, cfg)
  return pixels


def centred_box(canvas: int, pixels_hw: tuple[int, int]) -> geometry.ImageBox:
  """Official centred paste: offsets (c - h) // 2, (c - w) // 2."""
  h, w = pixels_hw
  return geometry.ImageBox((canvas - h) // 2, (canvas - w) // 2, h, w)
