"""The training transform's pixels rendered on the device, from the host's plan.

With `DataConfig.ship` "source" a batch carries each sample's decoded image
(zero-padded to a fixed side) and its plan vector (`data.source_plan`): the
workers drew every random choice, this module only renders. `render_canvases`
is jittable, vmapped over the batch, with fixed shapes (masks and weight
matrices carry the per-sample sizes); `train_step.batch_patches` calls it
inside the jitted step and gathers the patches from its canvases as for
ship "canvas".

Steps of one sample, in the official order and sizes (`data.augment`'s
docstring; `augment.apply_reference` is the same chain on the host), on
float32 images rounded to 8 bits wherever PIL's uint8 images round:

  1. the fit: PIL's resize (BICUBIC, a = -0.5; LANCZOS when it shrinks), as
     one weight matrix per axis, horizontal pass first, rounded after each;
  2. colour, on the fitted image: the jitter's adjustments in the plan's
     order as PIL computes them (brightness, contrast and saturation are
     `Image.blend` with black, the gray mean level and the L image,
     truncated to 8 bits; contrast's level is the rounded mean of L over
     the whole fitted image after the earlier adjustments; hue is PIL's
     exact HSV round trip with the 8-bit shift), then grayscale with PIL's
     fixed-point L weights (299/587/114). (Colouring the decoded pixels
     before the fit, a quarter of the pixels on CIFAR, measured 0.7 levels
     from the official chain with jitter, against 0.04 here.);
  3. Gaussian blur (5 wide, 9 tall, the plan's sigma) as one matrix per
     axis, reflect padding at the fitted image's own edges (torchvision's);
  4. the perspective warp, flip composed: PIL's BICUBIC transform (its
     a = -1 cubic, edge taps clamped, black outside the fitted image), into
     a buffer of (1 + distortion) canvas sides (`warp_side`: the largest
     warped side); the identity or the flip alone samples pixel centres,
     which is exact;
  5. the crop window resized to the output size: PIL's LANCZOS resize with
     a box, as weight matrices whose rows are the canvas rows (so the paste
     at the centred box, and the zeros around it, come with it). It
     antialiases a shrink exactly as PIL's does (the support widens with
     the factor), so the up-to-3x shrinks of CIFAR's crops lose nothing
     against the official;
  6. the erased box set to 0.

What differs from `augment.apply_reference` (the official chain, "pil"
filters): float32 arithmetic where PIL mixes float and fixed point (its
resampling weights are 22-bit fixed point), so a value near a rounding
boundary may round the other way: 0.04 gray levels from it on average on
CIFAR samples, 0.3 at most per sample, in every path (geometry, flip,
perspective, blur, jitter, grayscale; tests/test_device_augment.py bounds
each). (The host's fast `augment.apply`, which resamples once, is ~1-2
levels from that chain, 5 with perspective.)

Cost: two small matmuls per axis and step (fit, blur, resize: sides of 32
to 128), point-wise colour on the S^2 buffer and a 16-tap gather over a
((1 + distortion) S)^2 buffer for the warp; see benchmarks/bench_device_augment.py.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp

from mambaeye_jax.data import source_plan as sp


def warp_side(canvas_side: int, perspective_distortion: float = 1.0) -> int:
  """The warp buffer's side: a perspective output side is at most the
  fitted side (<= canvas_side) plus twice the corner shift (distortion / 2 of
  the shorter side), so (1 + distortion) times it, rounded up
  (`augment._perspective_plan`); AugmentConfig keeps distortion <= 1."""
  return math.ceil((1.0 + perspective_distortion) * canvas_side)


def _round_clip(x: jax.Array) -> jax.Array:
  """PIL's 8-bit rounding of a resampled value: half up, clipped."""
  return jnp.clip(jnp.floor(x + 0.5), 0.0, 255.0)


def _bicubic_kernel(t: jax.Array, a: float) -> jax.Array:
  """Keys' cubic convolution kernel (PIL: a = -0.5 resize, -1 transform)."""
  t = jnp.abs(t)
  near = ((a + 2.0) * t - (a + 3.0)) * t * t + 1.0
  far = (((t - 5.0) * t + 8.0) * t - 4.0) * a
  return jnp.where(t < 1.0, near, jnp.where(t < 2.0, far, 0.0))


def _lanczos_kernel(t: jax.Array) -> jax.Array:
  """PIL's LANCZOS (a = 3)."""
  return jnp.where(jnp.abs(t) < 3.0, jnp.sinc(t) * jnp.sinc(t / 3.0), 0.0)


def resample_matrix(n_out: int, n_in: int, in_size: jax.Array, box0: jax.Array,
                    box1: jax.Array, out_size: jax.Array, out_offset: jax.Array,
                    lanczos: jax.Array) -> jax.Array:
  """One axis of PIL's `resize(box=...)` as a weight matrix.

  PIL's precompute_coeffs: output pixel i's centre box0 + (i + 0.5) * scale,
  filter support widened by the shrink factor, taps clipped to the input and
  the weights renormalised.

  Args:
    n_out: rows (the output buffer's side).
    n_in: columns (the input buffer's side).
    in_size: the input's real extent (<= n_in).
    box0, box1: the input span resized, continuous coordinates.
    out_size: output pixels; row r holds output pixel r - out_offset, rows
      outside [out_offset, out_offset + out_size) are zero.
    out_offset: where the output starts in the rows.
    lanczos: bool, LANCZOS (else BICUBIC a = -0.5).

  Returns:
    (n_out, n_in) float32 weights.
  """
  i = jnp.arange(n_out, dtype=jnp.float32) - out_offset
  j = jnp.arange(n_in, dtype=jnp.float32)
  scale = (box1 - box0) / jnp.maximum(out_size, 1.0)
  fscale = jnp.maximum(scale, 1.0)
  support = jnp.where(lanczos, 3.0, 2.0) * fscale
  centre = box0 + (i + 0.5) * scale
  lo = jnp.maximum(jnp.floor(centre - support + 0.5), 0.0)
  hi = jnp.minimum(jnp.floor(centre + support + 0.5), in_size)
  t = (j[None, :] - centre[:, None] + 0.5) / fscale
  w = jnp.where(lanczos, _lanczos_kernel(t), _bicubic_kernel(t, -0.5))
  w = jnp.where((j[None, :] >= lo[:, None]) & (j[None, :] < hi[:, None]), w, 0.0)
  total = jnp.sum(w, axis=1, keepdims=True)
  w = w / jnp.where(total == 0, 1.0, total)
  row_ok = (i >= 0) & (i < out_size)
  return jnp.where(row_ok[:, None], w, 0.0)


def _resize(image: jax.Array, rows: jax.Array, cols: jax.Array) -> jax.Array:
  """(h, w, 3) -> (rows.shape[0], cols.shape[0], 3): horizontal pass, round,
  vertical pass, round (PIL's order)."""
  tmp = _round_clip(jnp.einsum("hwc,xw->hxc", image, cols, precision="highest"))
  return _round_clip(jnp.einsum("yh,hxc->yxc", rows, tmp, precision="highest"))


def blur_matrix(n: int, size: jax.Array, kernel: int, sigma: jax.Array) -> jax.Array:
  """One axis of torchvision's Gaussian blur as an (n, n) matrix.

  Args:
    n: the buffer's side.
    size: the image's real extent along the axis; the padding reflects at
      its edges (excluding the edge pixel, torch's "reflect").
    kernel: taps (odd).
    sigma: the Gaussian's sigma (> 0).

  Returns:
    (n, n) float32: row i holds output pixel i's weights (rows >= size: 0).
  """
  r = kernel // 2
  x = jnp.arange(kernel, dtype=jnp.float32) - r
  pdf = jnp.exp(-0.5 * (x / sigma) ** 2)
  taps = pdf / jnp.sum(pdf)
  i = jnp.arange(n)
  size = size.astype(jnp.int32)
  src = i[:, None] + jnp.arange(-r, r + 1)[None, :]  # (n, kernel)
  src = jnp.where(src < 0, -src, src)
  src = jnp.where(src >= size, 2 * (size - 1) - src, src)
  onehot = (src[..., None] == jnp.arange(n)[None, None, :]).astype(jnp.float32)
  m = jnp.einsum("k,ikj->ij", taps, onehot)
  return jnp.where((i < size)[:, None], m, 0.0)


def _luma(rgb: jax.Array) -> jax.Array:
  """PIL's L of (..., 3) integer-valued float colours: (...,) float32."""
  q = rgb.astype(jnp.int32)
  return ((q[..., 0] * 19595 + q[..., 1] * 38470 + q[..., 2] * 7471 + 0x8000)
          >> 16).astype(jnp.float32)


def _blend(level: jax.Array, image: jax.Array, factor: jax.Array) -> jax.Array:
  """PIL's Image.blend(level, image, factor) on 8-bit values: truncated, clipped."""
  return jnp.clip(jnp.floor(level + factor * (image - level)), 0.0, 255.0)


def _hue(rgb: jax.Array, shift: jax.Array) -> jax.Array:
  """PIL's RGB -> HSV, H + shift (8-bit wrap), -> RGB, its own arithmetic
  (`augment._hue_rgb(exact=True)`), on (..., 3) integer-valued floats."""
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  v = jnp.maximum(jnp.maximum(r, g), b)
  cr = v - jnp.minimum(jnp.minimum(r, g), b)
  safe = jnp.where(cr > 0, cr, 1.0)
  s = cr / jnp.where(v > 0, v, 1.0)
  rc, gc, bc = (v - r) / safe, (v - g) / safe, (v - b) / safe
  h = jnp.where(r == v, bc - gc, jnp.where(g == v, 2.0 + rc - bc, 4.0 + gc - rc))
  h = jnp.mod(h / 6.0 + 1.0, 1.0)
  h = jnp.where(cr > 0, jnp.trunc(h * 255.0), 0.0)
  s = jnp.where(cr > 0, jnp.trunc(s * 255.0), 0.0)
  h = jnp.mod(h + shift, 256.0)
  x = h * (6.0 / 255.0)
  sector = jnp.floor(x)
  fs = (x - sector) * s * 255.0
  p = jnp.floor(v * (255.0 - s) / 255.0 + 0.5)
  q = jnp.floor(v * (255.0 * 255.0 - fs) / (255.0 * 255.0) + 0.5)
  t = jnp.floor(v * (255.0 * 255.0 - (255.0 * s - fs)) / (255.0 * 255.0) + 0.5)
  sector = sector.astype(jnp.int32) % 6
  # The six sectors' (r, g, b) from (v, p, q, t), as PIL's hsv2rgb.
  pick = lambda *c: jnp.select([sector == k for k in range(6)], list(c))
  out = jnp.stack([pick(v, q, p, p, t, v), pick(t, v, v, q, p, p),
                   pick(p, p, t, v, v, q)], -1)
  return jnp.where((s > 0)[..., None], out, rgb)


def _colour(image: jax.Array, valid: jax.Array, plan: jax.Array) -> jax.Array:
  """Jitter in the plan's order, then grayscale, on (s, s, 3) floats.

  valid: (s, s) bool, the decoded image's pixels (the contrast mean's).
  """
  count = jnp.maximum(jnp.sum(valid), 1)
  ops, factors = plan[sp.JITTER_OPS], plan[sp.JITTER_FACTORS]
  for k in range(4):
    op, f = ops[k], factors[k]
    luma = _luma(image)
    mean = jnp.floor(jnp.sum(jnp.where(valid, luma, 0.0)) / count + 0.5)
    candidates = [_blend(0.0, image, f), _blend(mean, image, f),
                  _blend(luma[..., None], image, f), _hue(image, f)]
    image = jnp.select([op == code for code in range(4)], candidates, image)
  gray = jnp.broadcast_to(_luma(image)[..., None], image.shape)
  return jnp.where(plan[sp.GRAY] > 0, gray, image)


def _warp(image: jax.Array, plan: jax.Array, side: int) -> jax.Array:
  """PIL's BICUBIC perspective transform, black fill, into (side, side, 3).

  image: (n, n, 3), the fitted image at the top-left; the plan's WARP maps
  warped pixels to its coordinates.
  """
  w1, h1 = plan[sp.FIT_W], plan[sp.FIT_H]
  m = plan[sp.WARP].reshape(3, 3)
  i = jnp.arange(side, dtype=jnp.float32) + 0.5
  px, py = jnp.meshgrid(i, i, indexing="xy")  # (side, side): x varies along columns.
  den = m[2, 0] * px + m[2, 1] * py + m[2, 2]
  xin = (m[0, 0] * px + m[0, 1] * py + m[0, 2]) / den
  yin = (m[1, 0] * px + m[1, 1] * py + m[1, 2]) / den
  inside = ((xin >= 0) & (yin >= 0) & (xin < w1) & (yin < h1)
            & (px < plan[sp.WARP_W]) & (py < plan[sp.WARP_H]))
  xs, ys = xin - 0.5, yin - 0.5
  x0, y0 = jnp.floor(xs), jnp.floor(ys)
  dx, dy = xs - x0, ys - y0
  offsets = jnp.arange(-1, 3, dtype=jnp.float32)
  wx = _bicubic_kernel(dx[..., None] - offsets, -1.0)  # (side, side, 4)
  wy = _bicubic_kernel(dy[..., None] - offsets, -1.0)
  xx = jnp.clip(x0[..., None] + offsets, 0, w1 - 1).astype(jnp.int32)
  yy = jnp.clip(y0[..., None] + offsets, 0, h1 - 1).astype(jnp.int32)
  # One gather of whole pixels (3 channels) from the flattened image, of
  # bytes (its values are 8-bit integers): a quarter of float32's traffic.
  n = image.shape[1]
  flat = image.astype(jnp.uint8).reshape(-1, image.shape[-1])
  taps = jnp.take(flat, yy[..., :, None] * n + xx[..., None, :], axis=0,
                  mode="clip").astype(jnp.float32)  # (side, side, 4, 4, 3)
  value = jnp.einsum("abijc,abi,abj->abc", taps, wy, wx, precision="highest")
  # PIL's transform truncates to 8 bits.
  return jnp.where(inside[..., None], jnp.clip(jnp.floor(value), 0.0, 255.0), 0.0)


def render_canvas(source: jax.Array, plan: jax.Array, canvas_side: int,
                  blur_kernel: tuple[int, int] = (5, 9),
                  perspective_distortion: float = 1.0) -> jax.Array:
  """One sample's canvas (module docstring).

  Args:
    source: (s, s, 3) uint8, the decoded image at the top-left, zeros around.
    plan: (PLAN_SIZE,) float32 (`data.source_plan`).
    canvas_side: S, the padded canvas side (>= the plan's canvas).
    blur_kernel: (width, height) taps (AugmentConfig.blur_kernel).
    perspective_distortion: AugmentConfig's (at least the plans'): sizes
      the warp buffer (`warp_side`).

  Returns:
    (S, S, 3) uint8: the image at its centred box, zero elsewhere.
  """
  n, s = canvas_side, source.shape[0]
  side = warp_side(n, perspective_distortion)
  src_h, src_w = plan[sp.SOURCE_H], plan[sp.SOURCE_W]
  w1, h1 = plan[sp.FIT_W], plan[sp.FIT_H]
  lanczos = plan[sp.FIT_LANCZOS] > 0
  fit_rows = resample_matrix(n, s, src_h, 0.0, src_h, h1, 0.0, lanczos)
  fit_cols = resample_matrix(n, s, src_w, 0.0, src_w, w1, 0.0, lanczos)
  fitted = _resize(source.astype(jnp.float32), fit_rows, fit_cols)  # (n, n, 3)
  grid = jnp.arange(n, dtype=jnp.float32)
  fitted = _colour(fitted, (grid[:, None] < h1) & (grid[None, :] < w1), plan)
  # Always the blur's matmuls (the identity without blur: exact on 8-bit
  # values), so that the warp's gather reads a matmul's output: XLA fuses an
  # element-wise producer (the colour steps) into a gather and recomputes it
  # per tap, 7x the whole render's time on the CPU.
  sigma = plan[sp.BLUR_SIGMA]
  blur = sigma > 0
  safe_sigma = jnp.where(blur, sigma, 1.0)
  kx, ky = blur_kernel
  eye = jnp.eye(n, dtype=jnp.float32)
  by = jnp.where(blur, blur_matrix(n, h1, ky, safe_sigma), eye)
  bx = jnp.where(blur, blur_matrix(n, w1, kx, safe_sigma), eye)
  fitted = _round_clip(jnp.einsum("yh,hwc,xw->yxc", by, fitted, bx, precision="highest"))
  warped = _warp(fitted, plan, side)
  x, y, cw, ch = (plan[sp.CROP][k] for k in range(4))
  rw, rh = plan[sp.OUT_W], plan[sp.OUT_H]
  canvas = plan[sp.CANVAS]
  top, left = jnp.floor((canvas - rh) / 2), jnp.floor((canvas - rw) / 2)
  out_rows = resample_matrix(n, side, plan[sp.WARP_H], y, y + ch, rh, top,
                             jnp.bool_(True))
  out_cols = resample_matrix(n, side, plan[sp.WARP_W], x, x + cw, rw, left,
                             jnp.bool_(True))
  out = _resize(warped, out_rows, out_cols)
  et, el, eh, ew = (plan[sp.ERASE][k] for k in range(4))
  r = jnp.arange(n, dtype=jnp.float32)
  in_rows = (r - top >= et) & (r - top < et + eh)
  in_cols = (r - left >= el) & (r - left < el + ew)
  out = jnp.where((in_rows[:, None] & in_cols[None, :])[..., None], 0.0, out)
  return out.astype(jnp.uint8)


def render_canvases(source: jax.Array, plan: jax.Array, canvas_side: int,
                    blur_kernel: tuple[int, int] = (5, 9),
                    perspective_distortion: float = 1.0) -> jax.Array:
  """A batch's canvases: `render_canvas` vmapped.

  Args:
    source: (b, s, s, 3) uint8.
    plan: (b, PLAN_SIZE) float32; an all-zero row (a padding row) renders
      an all-zero canvas.
    canvas_side, blur_kernel, perspective_distortion: as `render_canvas`
      (static).

  Returns:
    (b, S, S, 3) uint8.
  """
  return jax.vmap(lambda s, p: render_canvas(s, p, canvas_side, blur_kernel,
                                             perspective_distortion))(source, plan)


def renderer(canvas_side: int, blur_kernel: tuple[int, int] = (5, 9),
             perspective_distortion: float = 1.0) -> Callable:
  """(source, plan) -> canvases: `render_canvases` with its static sizes bound,
  for `train_step.batch_patches` (canvas_side: the data's canvas_max; the
  others: its AugmentConfig's)."""
  return functools.partial(render_canvases, canvas_side=int(canvas_side),
                           blur_kernel=tuple(int(k) for k in blur_kernel),
                           perspective_distortion=float(perspective_distortion))
