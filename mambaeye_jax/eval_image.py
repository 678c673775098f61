"""eval.py's single-image mode: one image -> its top classes after T glimpses.

The canvas and corners are the dataset mode's (`data.glimpses`, without the
shrink-first step, as the official single-image code), the patches are
gathered on the device as in the evaluator.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import numpy as np
from flax import nnx

from mambaeye_jax import glimpse
from mambaeye_jax.data import glimpses
from mambaeye_jax.data import scan_patterns
from mambaeye_jax.data import sources
from mambaeye_jax.eval_data import ClassMap
from mambaeye_jax.eval_data import DataError
from mambaeye_jax.eval_data import SYNSET_PATTERN


@dataclasses.dataclass
class ImagePrediction:
  """Single-image result.

  Attributes:
    top: [(class index, name, probability)] after the last glimpse, best
      first.
    confidence: (T,) probability of the final top-1 class at every step.
    canvas: (S, S, 3) uint8.
    positions: (T, 2) int32.
    label: the true class when the file name says it (synset), else None.
    label_probability: its probability after the last glimpse, or None.
  """
  top: list[tuple[int, str, float]]
  confidence: np.ndarray
  canvas: np.ndarray
  positions: np.ndarray
  label: int | None
  label_probability: float | None = None


@functools.partial(jax.jit, static_argnums=(0,))
def _image_logits(graphdef, state, canvas, positions):
  """canvas (1, S, S, 3) u8, positions (1, T, 2) -> probs (1, T, K) f32."""
  model = nnx.merge(graphdef, state)
  logits = model(glimpse.extract_patches_jax(canvas, positions), positions)
  return jax.nn.softmax(logits, axis=-1)


def classify_image(model: nnx.Module, path: str, *, canvas_size: int | None = 512,
                   resize: str = "fit", scan: str = "random",
                   num_glimpses: int = 4096, seed: int = 0,
                   class_map: ClassMap | None = None,
                   top_k: int = 5, resampler: str = "fast") -> ImagePrediction:
  """Classifies one image file as the official single-image mode does.

  With resize "none" the canvas is the image's longer side (canvas_size is
  ignored); "fit" / "full" resize the original straight to the canvas, with
  `resampler` "fast" (OpenCV) or "reference" (PIL LANCZOS, the official
  pixels).

  Raises:
    DataError: missing or unreadable image.
    ValueError: unknown scan pattern or resize mode.
  """
  scan_patterns.get(scan)
  if not os.path.isfile(path):
    raise DataError(f"image {path} does not exist")
  with open(path, "rb") as f:
    data = f.read()
  try:
    pil = sources.decode_image(data, path)
  except sources.BadImageError as e:
    raise DataError(f"unreadable image {e}") from e
  canvas, _, positions = glimpses.eval_canvas_and_positions(
      pil, canvas_size=None if resize == "none" else canvas_size, resize=resize,
      scan=scan, num_glimpses=num_glimpses, seed=seed, index=0, shrink_first=False,
      resampler=resampler)
  graphdef, state = nnx.split(model)
  probs = np.asarray(_image_logits(graphdef, state, canvas[None], positions[None]))[0]
  final = probs[-1]
  order = np.argsort(-final, kind="stable")[:top_k]
  names = class_map.name if class_map is not None else str
  top = [(int(k), names(int(k)), float(final[k])) for k in order]
  label = None
  match = SYNSET_PATTERN.match(os.path.splitext(os.path.basename(path))[0])
  if match and class_map is not None:
    label = class_map.index().get(match.group(1))
  return ImagePrediction(
      top=top, confidence=probs[:, order[0]], canvas=canvas, positions=positions,
      label=label, label_probability=None if label is None else float(final[label]))
