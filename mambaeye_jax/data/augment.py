"""The official training transform (DESIGN.md section 3), fast, PIL + numpy.

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
    into one map from output pixels to input pixels, applied as one
    resampling (LANCZOS `resize(box=...)` without perspective; one BICUBIC
    perspective `transform`, black fill, otherwise). Flip then crop equals
    crop at the mirrored offset then flip. The input is the decoded image
    when the fit enlarges it (an enlargement adds no detail) and the fitted
    image, built as the official builds it, when the fit shrinks it or blur
    needs it. Resampling once instead of twice or three times changes pixels
    by ~1-2 gray levels on average (tests/test_data_augment.py bounds it
    against `apply_reference`, the step-by-step chain).
  * Point-wise colour steps (jitter, grayscale) run on the smallest image
    where the official order allows: before the geometry (the official
    order), or after it when there is no perspective (whose black fill the
    official never colours). Point-wise maps commute with resampling up to
    8-bit rounding; the one non-point-wise input, the contrast adjustment's
    grayscale mean, is then taken from a 64-pixel thumbnail of the whole
    (uncropped) image with the earlier adjustments applied, as the official
    takes it from the whole image.
  * JPEGs are decoded at reduced DCT scale when the fitted size is at most
    half the stored size (never below the fitted size; see
    `sources.decode_image`).
  * An axis too short to crop (side < 2 * min_side: fitted sides under 32
    pixels, e.g. very elongated images or canvas 32 on CIFAR) is kept whole;
    the official code raises there and drops the sample.
  * Images smaller than a patch need nothing special: step 2 upsamples every
    image to touch the canvas, and step 5 makes both sides >= 16.

Every random choice comes from the `np.random.Generator` passed in (Grain's
per-record generator), so a (seed, record index) pair fixes the output.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageStat
from scipy import ndimage

from mambaeye_jax import glimpse

P = glimpse.PATCH_SIZE


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
    h, s, v = image.convert("HSV").split()
    # torchvision adds np.uint8(hue * 255) with uint8 wrap-around; int()
    # truncates toward zero as that C cast does, % 256 wraps negatives.
    shift = int(factor * 255) % 256
    h = h.point(lambda x: (x + shift) % 256)
    return Image.merge("HSV", (h, s, v)).convert("RGB")
  raise ValueError(f"unknown colour op {op!r}")


def _colour(image: Image.Image, jitter: list[tuple[str, float]] | None,
            gray: bool, thumbnail: Image.Image | None = None) -> Image.Image:
  """ColorJitter (in its drawn order) then grayscale, as the official.

  Args:
    image: RGB image to adjust.
    jitter: the plan of `_jitter_plan`, or None (no jitter).
    gray: convert to 3-channel grayscale at the end.
    thumbnail: when `image` is a crop of the image the official adjusts, a
      small copy of the whole image: the contrast mean is taken from it with
      the adjustments drawn before contrast applied.

  Returns:
    The adjusted RGB image.
  """
  if jitter:
    for op, factor in jitter:
      mean = None
      if op == "contrast" and thumbnail is not None:
        mean = _gray_mean(thumbnail)
      image = _adjust(image, op, factor, mean)
      if thumbnail is not None:
        thumbnail = _adjust(thumbnail, op, factor)
  if gray:
    image = image.convert("L").convert("RGB")
  return image


def _gaussian_kernel(size: int, sigma: float) -> np.ndarray:
  """torchvision _get_gaussian_kernel1d: (size,) float32, sums to 1."""
  x = np.linspace(-(size - 1) / 2, (size - 1) / 2, size)
  pdf = np.exp(-0.5 * (x / sigma) ** 2)
  return (pdf / pdf.sum()).astype(np.float32)


def _blur(image: Image.Image, kernel_wh: tuple[int, int],
          sigma: float) -> Image.Image:
  """torchvision gaussian_blur on uint8: float conv, reflect pad, round."""
  pixels = np.asarray(image)
  kx, ky = kernel_wh
  # torch "reflect" padding excludes the edge pixel: scipy's "mirror".
  out = ndimage.correlate1d(pixels, _gaussian_kernel(ky, sigma), axis=0,
                            output=np.float32, mode="mirror")
  out = ndimage.correlate1d(out, _gaussian_kernel(kx, sigma), axis=1,
                            output=np.float32, mode="mirror")
  return Image.fromarray(
      np.clip(np.rint(out), 0, 255).astype(np.uint8), "RGB")


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


def _random_erase(pixels: np.ndarray, rng: np.random.Generator,
                  cfg: AugmentConfig) -> None:
  """torchvision RandomErasing (value 0) in place, on (h, w, 3) uint8."""
  height, width = pixels.shape[:2]
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
    pixels[top:top + eh, left:left + ew] = 0
    return


# ---------------------------------------------------------------- transform


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


def _homography(params: dict[str, Any], base_size: tuple[int, int],
                base_is_fitted: bool,
                grid: tuple[int, int] | None = None) -> np.ndarray:
  """Output pixel -> base pixel map of the whole official geometry.

  Composes, in PIL's continuous pixel coordinates (pixel i spans [i, i+1)):
  final resize + crop (A), perspective (H), flip (F) and fitted -> base
  scaling (S). Returns M (3, 3) with [x_base, y_base, 1] ~ M @ [u, v, 1].
  `grid` (width, height) renders the crop window at another size than the
  plan's output (default).
  """
  w1, h1 = params["fit"]
  x, y, cw, ch = params["crop"]
  rw, rh = grid or params["out_size"]
  a = np.array([[cw / rw, 0, x], [0, ch / rh, y], [0, 0, 1]], np.float64)
  h = np.eye(3)
  if params["perspective"] is not None:
    h = np.append(params["perspective"][1], 1.0).reshape(3, 3)
  f = np.eye(3)
  if params["flip"]:
    f = np.array([[-1, 0, w1], [0, 1, 0], [0, 0, 1]], np.float64)
  s = np.eye(3)
  if not base_is_fitted:
    s = np.diag([base_size[0] / w1, base_size[1] / h1, 1.0])
  return s @ f @ h @ a


def apply(image: Image.Image, params: dict[str, Any], rng: np.random.Generator,
          cfg: AugmentConfig) -> np.ndarray:
  """Runs a `plan` on a decoded image.

  The geometry (flip, perspective, crop, final resize) is one resampling
  without perspective, a LANCZOS `resize(box=...)`; with perspective, one
  BICUBIC `transform` with black fill of the crop window only, at the
  coarser of the input's and the output's scale, between LANCZOS resizes to
  and from that scale where needed (see the code). It reads the
  decoded image directly when the fit enlarges it (the official BICUBIC
  enlargement adds no detail), and the fitted image, built as the official
  does, when the fit shrinks it or blur needs its pixel grid. The point-wise
  colour steps run on whichever image is smallest among those where the
  official order allows them: before the geometry always (the official order;
  the contrast mean is then the whole image's), after it only without
  perspective (whose black fill the official never colours), with the
  contrast mean from a thumbnail of the whole image.

  Args:
    image: RGB PIL image (possibly DCT-reduced; its size may exceed the plan's
      `fit`, never fall below it).
    params: from `plan` on the stored image size.
    rng: the record's generator (random erasing draws from it).
    cfg: transform parameters.

  Returns:
    (rh, rw, 3) uint8: the image to paste centred on the zero canvas.
  """
  w1, h1 = params["fit"]
  out_size = params["out_size"]
  rw, rh = out_size
  colour = params["jitter"] is not None or params["gray"]
  base, base_is_fitted = image, False
  shrink = w1 < image.size[0] or h1 < image.size[1]
  if shrink or params["blur_sigma"] is not None:
    # The fitted image is built when it holds less detail than the decoded
    # one (shrinking: later steps must not see detail the official drops)
    # or when blur needs its pixel grid.
    if colour and image.size[0] * image.size[1] <= w1 * h1:
      base, colour = _colour(base, params["jitter"], params["gray"]), False
    base = base.resize((w1, h1), Image.Resampling.LANCZOS if shrink
                       else Image.Resampling.BICUBIC)
    base_is_fitted = True
  if params["blur_sigma"] is not None:
    if colour:
      base, colour = _colour(base, params["jitter"], params["gray"]), False
    base = _blur(base, cfg.blur_kernel, params["blur_sigma"])
  if params["perspective"] is not None:
    # The official warps at the fitted scale, then LANCZOS-resizes the crop
    # to the output. Here the warp renders the crop window only, at the
    # coarser of the input's and the output's scale: when the output is
    # larger, a LANCZOS resize enlarges the warp as the official's does;
    # when smaller, the input is first shrunk to the output's scale with
    # LANCZOS (the warp itself does not low-pass, as the official resize
    # does).
    bw, bh = base.size
    _, _, cw, ch = params["crop"]
    crop_w = cw * (1 if base_is_fitted else bw / w1)  # In base pixels.
    crop_h = ch * (1 if base_is_fitted else bh / h1)
    fx, fy = max(1.0, crop_w / rw), max(1.0, crop_h / rh)
    if max(fx, fy) > 1.25:
      size = (max(1, round(bw / fx)), max(1, round(bh / fy)))
      base = base.resize(size, Image.Resampling.LANCZOS)
      crop_w, crop_h = crop_w * size[0] / bw, crop_h * size[1] / bh
      base_is_fitted = False  # Base pixels are no longer fitted pixels.
    grid = (min(rw, max(1, round(crop_w))), min(rh, max(1, round(crop_h))))
    if colour:
      base, colour = _colour(base, params["jitter"], params["gray"]), False
    m = _homography(params, base.size, base_is_fitted, grid)
    m = m / m[2, 2]
    out = base.transform(grid, Image.Transform.PERSPECTIVE,
                         tuple(m.reshape(-1)[:8]), Image.Resampling.BICUBIC,
                         fillcolor=(0, 0, 0))
    if grid != out_size:
      out = out.resize(out_size, Image.Resampling.LANCZOS)
  else:
    m = _homography(params, base.size, base_is_fitted)
    if colour and base.size[0] * base.size[1] <= rw * rh:
      base, colour = _colour(base, params["jitter"], params["gray"]), False
    # Without perspective the map is axis-aligned: a crop box, mirrored
    # when flipped (flip then crop = crop the mirrored window then flip).
    x0, y0 = m[0, 2], m[1, 2]
    x1, y1 = m[0, 0] * rw + x0, m[1, 1] * rh + y0
    flip = x1 < x0
    bw, bh = base.size  # Clamp float round-off at the image edges.
    box = (max(min(x0, x1), 0.0), max(y0, 0.0), min(max(x0, x1), bw),
           min(y1, bh))
    out = base.resize(out_size, Image.Resampling.LANCZOS, box=box)
    if flip:
      out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if colour:
      thumbnail = base.resize((64, 64), Image.Resampling.BILINEAR,
                              reducing_gap=2.0)
      out = _colour(out, params["jitter"], params["gray"], thumbnail)
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


def centred_box(canvas: int, pixels_hw: tuple[int, int]) -> glimpse.ImageBox:
  """Official centred paste: offsets (c - h) // 2, (c - w) // 2."""
  h, w = pixels_hw
  return glimpse.ImageBox((canvas - h) // 2, (canvas - w) // 2, h, w)
