"""Evaluation canvases: the official resize modes "none", "fit" and "full".

An evaluation image becomes a square canvas (S, S, 3) uint8, zero outside the
image, with the image pasted centred, and the `geometry.ImageBox` saying where
it lies. This reproduces the official `InferenceDataset` (`mambaeye/dataset.py`
of github usingcolor/MambaEye, commit 8d7d643), which the official `eval.py`
uses to validate on a dataset:

1. The image is converted to RGB by PIL (`.convert("RGB")`: grayscale is
   replicated, alpha dropped without compositing, palettes expanded).
2. An image wider or taller than the canvas is first shrunk to fit it:
   `ratio = min(S / w, S / h)`, new sides `int(w * ratio)`, `int(h * ratio)`
   (Python float, truncated: the longer side can come out one pixel short;
   `augment.fit_size`, which keeps sides >= 1 where the official code would
   fail on a needle-thin image), LANCZOS.
3. Then per mode: "none" keeps it; "fit" applies the same ratio formula again
   (so small images are enlarged until the longer side is S), LANCZOS;
   "full" stretches to S x S, LANCZOS.
4. Paste at `top = (S - h) // 2`, `left = (S - w) // 2` on a zero canvas.

`eval.py`'s single-image mode differs in two ways, both available here:
with "none" the canvas is the image's longer side (`canvas_size=None`), and
"fit"/"full" resize the original directly without step 2
(`shrink_first=False`; "full" then differs for images larger than S, which
the dataset path stretches from the shrunk copy).

The sizes (and so the canvas geometry) always follow the official steps;
the pixels come from one of two resamplers (`RESAMPLERS`):

- "reference": PIL LANCZOS, each official step in turn, as above;
- "fast" (the default): OpenCV, one resize from the decoded image straight
  to the final size: INTER_AREA (an area average, so antialiased) when a
  side shrinks, INTER_CUBIC when enlarging (OpenCV's INTER_LANCZOS4 does not
  antialias a reduction and is several times slower than INTER_CUBIC on an
  enlargement). A JPEG much larger than its final size is decoded at 1/2 to
  1/8 scale (`draft_size`), never below twice the final size, so the area
  average still spans >= 2 x 2 decoded pixels: decoding straight to the
  final size doubled the difference to the reference. The evaluator also
  decodes plain JPEGs with OpenCV for this resampler (`record_image`'s
  fast_jpeg: the same pixels as PIL's). On ImageNet photos the evaluator's
  host step (decode, fit, scan order) is 1.8x (canvas 224), 2.8x (512) and
  4.9x (1024) faster than with the reference; the pixels
  differ by about 0.7 (enlarging) to 1.8 (shrinking) grey levels on
  average, with no bias (docs/evaluation.md has the figures;
  tests/test_eval_resamplers.py holds them to tolerances).
"""

from __future__ import annotations

from typing import Any, Mapping

import cv2
import numpy as np
from PIL import Image

from mambaeye_jax.data import augment
from mambaeye_jax.data import geometry
from mambaeye_jax.data import sources

RESIZE_MODES = ("none", "fit", "full")

RESAMPLERS = ("fast", "reference")

_RESAMPLE = Image.Resampling.LANCZOS  # The official filter for every resize.

# The fast resampler decodes a JPEG at reduced scale down to this many times
# its final size at least (see the module docstring).
_DRAFT_MARGIN = 2


def to_rgb(image: Image.Image | np.ndarray) -> Image.Image:
  """An RGB PIL image from a PIL image of any mode or a uint8 array.

  Args:
    image: PIL image, or uint8 array (h, w), (h, w, 1), (h, w, 3) or
      (h, w, 4) (RGBA).

  Returns:
    PIL image in mode "RGB".

  Raises:
    TypeError: for arrays that are not uint8.
    ValueError: for arrays of another shape.
  """
  if isinstance(image, Image.Image):
    return image if image.mode == "RGB" else image.convert("RGB")
  array = np.asarray(image)
  if array.dtype != np.uint8:
    raise TypeError(f"image arrays must be uint8, got {array.dtype}")
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.ndim not in (2, 3) or (array.ndim == 3
                                  and array.shape[-1] not in (3, 4)):
    raise ValueError(f"image array of shape {array.shape} is not (h, w), "
                     "(h, w, 1), (h, w, 3) or (h, w, 4)")
  return Image.fromarray(array).convert("RGB")


def record_image(record: Mapping[str, Any], key: str | None = None, *,
                 max_pixels: int = sources.DEFAULT_MAX_IMAGE_PIXELS,
                 draft_size=None, fast_jpeg: bool = False) -> Image.Image | np.ndarray:
  """A record's image as an RGB PIL image: the one decoding of a record, for
  training and evaluation alike.

  Args:
    record: a source's record; "image" is encoded bytes, a PIL image or a
      uint8 array (`to_rgb`'s shapes).
    key: the name in error messages (default: the record's "key").
    max_pixels, draft_size: as `sources.decode_image`.
    fast_jpeg: decode plain JPEG bytes with OpenCV into an (h, w, 3) uint8
      RGB array instead (`sources.decode_jpeg_fast`: the same pixels,
      faster); other data as without it.

  Raises:
    sources.BadImageError: corrupt or unreadable data, naming the record.
  """
  image = record["image"]
  key = key if key is not None else record.get("key", "<image>")
  if isinstance(image, (bytes, bytearray, memoryview)):
    data = bytes(image)
    if fast_jpeg:
      pixels = sources.decode_jpeg_fast(data, max_pixels=max_pixels, draft_size=draft_size)
      if pixels is not None:
        return pixels
    return sources.decode_image(data, key, max_pixels=max_pixels, draft_size=draft_size)
  if isinstance(image, Image.Image):
    return image.convert("RGB")
  try:
    return to_rgb(np.asarray(image))
  except (TypeError, ValueError) as e:
    raise sources.BadImageError(key, str(e)) from e


def check_resampler(resampler: str) -> None:
  """Raises ValueError naming the known resamplers for an unknown one."""
  if resampler not in RESAMPLERS:
    raise ValueError(f"unknown resampler {resampler!r}; known resamplers: "
                     f"{', '.join(RESAMPLERS)}")


def _resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
  # PIL returns a copy for a same-size resize; spelt out so it is certain.
  return image if image.size == size else image.resize(size, _RESAMPLE)


def _resize_fast(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """pixels (h, w, 3) uint8 -> (height, width, 3) uint8 for size (width, height)."""
  width, height = size
  if pixels.shape[:2] == (height, width):
    return pixels
  shrinks = width < pixels.shape[1] or height < pixels.shape[0]
  return cv2.resize(pixels, (width, height),
                    interpolation=cv2.INTER_AREA if shrinks else cv2.INTER_CUBIC)


def resize_steps(width: int, height: int, mode: str, canvas_size: int | None,
                 *, shrink_first: bool = True) -> tuple[int, list[tuple[int, int]]]:
  """The official resizes of a width x height image, sizes only.

  Args:
    width, height: the decoded image's size.
    mode, canvas_size, shrink_first: as `eval_canvas`.

  Returns:
    (canvas side S, [(width, height) after each resize, in order]); the
    list is empty when nothing is resized and the image keeps its size, and
    a step may keep the previous size (a no-op).

  Raises:
    ValueError: as `eval_canvas`.
  """
  if mode not in RESIZE_MODES:
    raise ValueError(f"unknown resize mode {mode!r}; known modes: "
                     f"{', '.join(RESIZE_MODES)}")
  if canvas_size is None:
    if mode != "none":
      raise ValueError(f"resize mode {mode!r} needs a canvas_size")
    canvas_size = max(width, height)
    if canvas_size < geometry.PATCH_SIZE:
      raise ValueError(
          f"image {height}x{width} is smaller than one {geometry.PATCH_SIZE}x"
          f"{geometry.PATCH_SIZE} patch; give a canvas_size >= "
          f"{geometry.PATCH_SIZE}")
  canvas_size = int(canvas_size)
  if canvas_size < geometry.PATCH_SIZE:
    raise ValueError(f"{canvas_size=} is smaller than one "
                     f"{geometry.PATCH_SIZE}x{geometry.PATCH_SIZE} patch")
  steps = []
  size = (width, height)
  if shrink_first and (width > canvas_size or height > canvas_size):
    size = augment.fit_size(width, height, canvas_size)
    steps.append(size)
  if mode == "fit":
    steps.append(augment.fit_size(*size, canvas_size))
  elif mode == "full":
    steps.append((canvas_size, canvas_size))
  elif size[0] > canvas_size or size[1] > canvas_size:
    # "none" without the shrink: nothing official to match; fail clearly.
    raise ValueError(f"image {size[1]}x{size[0]} exceeds the "
                     f"{canvas_size}x{canvas_size} canvas with resize mode "
                     "'none' and shrink_first=False")
  return canvas_size, steps


def draft_size(width: int, height: int, mode: str, canvas_size: int | None, *,
               shrink_first: bool = True, resampler: str = "fast"
               ) -> tuple[int, int] | None:
  """The `record_image` draft_size for an image of this stored size.

  Returns:
    None (decode in full) for the reference resampler and for images not
    shrunk; otherwise (width, height) = `_DRAFT_MARGIN` x the final size, so
    a JPEG at least twice that size decodes at 1/2, 1/4 or 1/8 scale.
  """
  check_resampler(resampler)
  if resampler == "reference":
    return None
  try:
    _, steps = resize_steps(width, height, mode, canvas_size, shrink_first=shrink_first)
  except ValueError:
    return None  # eval_canvas reports it on the decoded image.
  if not steps:
    return None
  final_width, final_height = steps[-1]
  if final_width * _DRAFT_MARGIN > width or final_height * _DRAFT_MARGIN > height:
    return None
  return final_width * _DRAFT_MARGIN, final_height * _DRAFT_MARGIN


def paste_centred(image: np.ndarray, canvas_size: int, out: np.ndarray | None = None
                  ) -> tuple[np.ndarray, geometry.ImageBox]:
  """Pastes an image centred on a zero square canvas (official rounding).

  Args:
    image: (h, w, 3) uint8 with h, w <= canvas_size.
    canvas_size: S.
    out: (S, S, 3) uint8 to write the canvas into (e.g. a shared-memory
      batch row: no new canvas and no second copy); None: a new array.

  Returns:
    (canvas (S, S, 3) uint8, box) with box.top = (S - h) // 2 and
    box.left = (S - w) // 2.
  """
  height, width = image.shape[:2]
  if height > canvas_size or width > canvas_size:
    raise ValueError(f"image {height}x{width} does not fit a {canvas_size}"
                     f"x{canvas_size} canvas")
  box = augment.centred_box(canvas_size, (height, width))
  if out is None:
    canvas = np.zeros((canvas_size, canvas_size, 3), np.uint8)
  else:
    if out.shape != (canvas_size, canvas_size, 3) or out.dtype != np.uint8:
      raise ValueError(f"out is {out.dtype} {out.shape}, not uint8 "
                       f"{(canvas_size, canvas_size, 3)}")
    canvas = out
    canvas[:box.top] = 0
    canvas[box.top + height:] = 0
    canvas[box.top:box.top + height, :box.left] = 0
    canvas[box.top:box.top + height, box.left + width:] = 0
  canvas[box.top:box.top + height, box.left:box.left + width] = image
  return canvas, box


def eval_canvas(image: Image.Image | np.ndarray, mode: str = "none",
                canvas_size: int | None = None, *, shrink_first: bool = True,
                resampler: str = "fast", out: np.ndarray | None = None
                ) -> tuple[np.ndarray, geometry.ImageBox]:
  """The official evaluation canvas of one image.

  Args:
    image: PIL image of any mode, or uint8 array as `to_rgb` takes.
    mode: "none" (no resampling unless the image exceeds the canvas), "fit"
      (aspect-resize so the longer side is the canvas side) or "full"
      (stretch to the canvas).
    canvas_size: canvas side S (>= 16). None, allowed with "none" only,
      makes the canvas the image's longer side (official single-image mode).
    shrink_first: shrink images larger than the canvas before the mode's own
      resize, as the official dataset evaluation does; False matches the
      official single-image mode for "fit" and "full".
    resampler: "fast" (OpenCV, one resize) or "reference" (PIL LANCZOS, the
      official steps); the same sizes and box either way (module docstring).
    out: (S, S, 3) uint8 to write the canvas into, as `paste_centred`.

  Returns:
    (canvas (S, S, 3) uint8, zero outside the image; box, the image's place
    on it).

  Raises:
    ValueError: for an unknown mode or resampler, a canvas side below 16, or
      canvas_size=None with "fit"/"full".
  """
  check_resampler(resampler)
  if resampler == "fast" and isinstance(image, np.ndarray) and image.dtype == np.uint8 \
      and image.ndim == 3 and image.shape[-1] == 3:
    pixels = image  # Already RGB: no round trip through PIL.
  else:
    pil = to_rgb(image)
    if resampler == "reference":
      canvas_size, steps = resize_steps(*pil.size, mode, canvas_size,
                                        shrink_first=shrink_first)
      for size in steps:
        pil = _resize(pil, size)
      return paste_centred(np.asarray(pil), canvas_size, out)
    pixels = np.asarray(pil)
  canvas_size, steps = resize_steps(pixels.shape[1], pixels.shape[0], mode, canvas_size,
                                    shrink_first=shrink_first)
  return paste_centred(_resize_fast(pixels, steps[-1]) if steps else pixels, canvas_size,
                       out)
