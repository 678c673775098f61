"""Record sources and image decoding.

Every source is a Grain random-access data source (`__len__`, `__getitem__`)
whose records are dicts

    {"image": bytes (an encoded image file), "label": int, "key": str}

`key` names the record in error messages (a file path, "tfds:name/split[i]",
"array_record:path[i]"). Images stay encoded until a worker decodes them with
`decode_image`, so sources are cheap to pickle into worker processes.

Sources:
  * `ImageFolderSource`: the official layout `root/<class>/<image>`, classes
    sorted by name (label = index in that order), images sorted per class,
    extensions .png .jpg .jpeg .webp (case-insensitive) as in the official
    `dataset.py`.
  * `TfdsSource`: any TFDS image-classification dataset through
    `tfds.data_source`, images kept encoded (`tfds.decode.SkipDecoding`).
  * `arrayrecord.ArrayRecordSource` (its own module, `data/arrayrecord.py`,
    which imports Grain): ArrayRecord shards written by `convert_arrayrecord`.

Bad input (see `decode_image` for the per-image cases):
  * missing root / no class folders: `FileNotFoundError` / `ValueError` at
    construction, naming the path.
  * empty class folder: kept (its label index stays reserved, as in the
    official code, so labels do not shift), logged, counted in
    `stats["empty_classes"]`.
  * files with another extension: not images by the official rule; ignored,
    logged once, counted in `stats["ignored_files"]`.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
import weakref
from typing import Any, Callable, Sequence

import cv2
import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")

# Default decompression-bomb guard: 64 megapixels (an 8k x 8k photo). Larger
# files are rejected before their pixels are decoded.
DEFAULT_MAX_IMAGE_PIXELS = 64 * 1024 * 1024


class BadImageError(ValueError):
  """An input record that cannot become an RGB image; names it and why."""

  def __init__(self, key: str, reason: str):
    super().__init__(f"{key}: {reason}")
    self.key = key
    self.reason = reason

  def __reduce__(self):
    # Grain's worker processes send errors to the main process pickled; the
    # default reduce would call __init__ with the message alone (TypeError).
    return type(self), (self.key, self.reason)


class TooManyBadRecordsError(RuntimeError):
  """Training read mostly unreadable records: stop instead of looping forever.

  Attributes:
    num_bad: bad records seen by the reader that raised (one process or one
      worker process).
    num_seen: records it read in all, bad ones included.
    example: the last bad record's "key: reason".
  """

  def __init__(self, num_bad: int, num_seen: int, example: str, max_fraction: float):
    super().__init__(
        f"{num_bad} of {num_seen} records read were bad (more than "
        f"data.max_bad_fraction={max_fraction:g} of them, and more than "
        f"{MIN_BAD_RECORDS_TO_STOP}); last one: {example}. Check the data path, "
        f"or raise data.max_bad_fraction (1 never stops)")
    self.num_bad = num_bad
    self.num_seen = num_seen
    self.example = example
    self.max_fraction = max_fraction

  def __reduce__(self):
    return type(self), (self.num_bad, self.num_seen, self.example, self.max_fraction)


# A few bad records at the start of a stream must not stop a run whose data is
# mostly good: the fraction counts only after this many.
MIN_BAD_RECORDS_TO_STOP = 100


def _to_uint8_rgb(image: Image.Image, key: str) -> Image.Image:
  """Converts any PIL mode to 8-bit RGB without silently clipping.

  8-bit modes (L, P, RGBA, LA, PA, CMYK, YCbCr, 1, ...) use PIL's `convert`,
  as the official `Image.open(p).convert("RGB")` does (alpha is dropped, CMYK
  uses PIL's naive inversion). High-bit-depth grayscale would be clipped at
  255 by `convert` (a 16-bit PNG turns almost white), so it is rescaled
  instead: I;16* by 255/65535; I by 255/65535 when its values fit 16 bits
  (PNG 16-bit) and kept when they fit 8 bits; F when its values lie in [0, 1]
  by 255. Anything else is an error.
  """
  mode = image.mode
  if mode == "RGB":
    return image
  if mode.startswith("I;16") or mode in ("I", "F"):
    values = np.asarray(image, np.float64)
    hi = float(values.max()) if values.size else 0.0
    lo = float(values.min()) if values.size else 0.0
    if mode.startswith("I;16"):
      scale = 255.0 / 65535.0
    elif mode == "I" and lo >= 0 and hi <= 255:
      scale = 1.0
    elif mode == "I" and lo >= 0 and hi <= 65535:
      scale = 255.0 / 65535.0
    elif mode == "F" and lo >= 0.0 and hi <= 1.0:
      scale = 255.0
    else:
      raise BadImageError(
          key, f"unsupported {mode} image with values in [{lo}, {hi}]")
    gray = np.rint(values * scale).astype(np.uint8)
    return Image.fromarray(gray, "L").convert("RGB")
  return image.convert("RGB")


def decode_image(data: bytes, key: str = "<bytes>", *,
                 max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 draft_size: (tuple[int, int] | Callable[[int, int],
                              tuple[int, int]] | None) = None
                 ) -> Image.Image:
  """Decodes an encoded image into an 8-bit RGB PIL image.

  Args:
    data: the file's bytes.
    key: names the record in errors.
    max_pixels: decompression-bomb guard; a larger image is rejected from its
      header, before decoding.
    draft_size: (width, height) the caller will shrink the image to at most;
      JPEGs may then be decoded at 1/2, 1/4 or 1/8 scale (never below this
      size) by the decoder's DCT scaling, which is much faster than decoding
      in full and resampling down. A callable gets the stored (width,
      height) and returns that size (or None). None decodes at full size.

  Returns:
    A loaded PIL image of mode RGB (width, height >= 1).

  Raises:
    BadImageError: empty, unreadable, truncated or corrupt data, a non-image
      file, too many pixels, a zero-sized image or an unsupported pixel mode;
      the message names `key`.
  """
  if not data:
    raise BadImageError(key, "empty file")
  try:
    image = Image.open(io.BytesIO(data))
  except Image.DecompressionBombError as e:
    raise BadImageError(key, f"decompression bomb: {e}") from e
  except Exception as e:  # PIL raises several types for non-images.
    raise BadImageError(key, f"not a readable image ({e})") from e
  width, height = image.size
  if width < 1 or height < 1:
    raise BadImageError(key, f"image has no pixels ({width}x{height})")
  if width * height > max_pixels:
    raise BadImageError(
        key, f"{width}x{height} = {width * height} pixels exceeds the "
        f"decompression-bomb guard of {max_pixels}")
  if callable(draft_size):
    draft_size = draft_size(width, height)
  if draft_size is not None and image.format == "JPEG":
    image.draft("RGB", tuple(max(1, int(s)) for s in draft_size))
  try:
    image.load()
  except Exception as e:  # Truncated or corrupt data.
    raise BadImageError(key, f"cannot decode ({e})") from e
  return _to_uint8_rgb(image, key)


# OpenCV's flags for a JPEG decoded at 1/s scale by the decoder's DCT
# scaling, s = 1, 2, 4, 8 (as PIL's draft); EXIF orientation is ignored, as
# PIL ignores it.
_CV2_JPEG_FLAGS = {
    1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
    8: cv2.IMREAD_REDUCED_COLOR_8}


def decode_jpeg_fast(data: bytes, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                     draft_size: (tuple[int, int] | Callable[[int, int],
                                  tuple[int, int]] | None) = None
                     ) -> np.ndarray | None:
  """OpenCV's decoding of a plain JPEG: the pixels `decode_image` gives, as
  an array, without PIL's copy out of its image (about 25% less time).

  Only a complete JPEG (it ends with the end-of-image marker) in YCbCr/RGB
  or grayscale within `max_pixels` qualifies; the reduced scale for
  `draft_size` is chosen as PIL's `draft` chooses it. Both decoders are
  libjpeg-turbo with the same settings (identical pixels on the ImageNet
  sample; tests/test_eval_resamplers.py checks).

  Args:
    data: the file's bytes.
    max_pixels, draft_size: as `decode_image`.

  Returns:
    (h, w, 3) uint8 RGB, or None for anything else, truncated or unreadable
    data included: decode those with `decode_image`, which reports errors.
  """
  if not data.endswith(b"\xff\xd9"):
    return None  # Not a JPEG, or truncated (PIL reports that).
  try:
    image = Image.open(io.BytesIO(data))
  except Exception:  # pylint: disable=broad-except
    return None
  width, height = image.size
  if (image.format != "JPEG" or image.mode not in ("RGB", "L") or width < 1 or height < 1
      or width * height > max_pixels):
    return None
  if callable(draft_size):
    draft_size = draft_size(width, height)
  scale = 1
  if draft_size is not None:
    ratio = min(width // max(1, int(draft_size[0])), height // max(1, int(draft_size[1])))
    scale = next((s for s in (8, 4, 2) if ratio >= s), 1)
  pixels = cv2.imdecode(np.frombuffer(data, np.uint8),
                        _CV2_JPEG_FLAGS[scale] | cv2.IMREAD_IGNORE_ORIENTATION)
  if pixels is None or pixels.shape != (-(-height // scale), -(-width // scale), 3):
    return None
  return cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)


# ---------------------------------------------------------------- folder


def file_record(path: str, label: int) -> dict[str, Any]:
  """The record of one image file: {"image": its bytes, "label", "key"}.

  A file deleted or unreadable since listing gives empty bytes (logged), so
  that decode_image reports it as a bad record naming the path.
  """
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    logging.warning("%s: cannot read (%s)", path, e)
    data = b""
  return {"image": data, "label": label, "key": path}


def class_folders(root: str | os.PathLike) -> list[str]:
  """The sub-directory names of `root`, sorted (the official class order)."""
  root = os.fspath(root)
  return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))


def list_images(folder: str | os.PathLike,
                extensions: Sequence[str] = IMAGE_EXTENSIONS) -> tuple[list[str], int]:
  """The image files directly in `folder`: (sorted names, count of others).

  An image is a file whose lower-cased name ends with one of `extensions`
  (the official rule); the second value counts the entries that are not.
  The one listing of image files: every source and the evaluation specs
  use it.
  """
  folder = os.fspath(folder)
  extensions = tuple(e.lower() for e in extensions)
  names = sorted(os.listdir(folder))
  images = [f for f in names if f.lower().endswith(extensions)
            and os.path.isfile(os.path.join(folder, f))]
  return images, len(names) - len(images)


class ImageFolderSource:
  """Images in the official layout `root/<class>/<image>`.

  Attributes:
    root: the dataset directory.
    class_names: sorted class folder names; label = index.
    stats: {"empty_classes": int, "ignored_files": int} found at listing.
  """

  def __init__(self, root: str | os.PathLike,
               extensions: Sequence[str] = IMAGE_EXTENSIONS):
    """Lists the dataset (no image is opened).

    Args:
      root: dataset directory holding one folder per class.
      extensions: lower-case file extensions taken as images.

    Raises:
      FileNotFoundError: `root` does not exist or is not a directory.
      ValueError: `root` holds no class folder, or no image at all.
    """
    self.root = os.fspath(root)
    if not os.path.isdir(self.root):
      raise FileNotFoundError(f"image folder {self.root!r} does not exist or "
                              "is not a directory")
    self.class_names = class_folders(self.root)
    if not self.class_names:
      raise ValueError(f"image folder {self.root!r} has no class "
                       "sub-directories (expected root/<class>/<image>)")
    extensions = tuple(e.lower() for e in extensions)
    self._items: list[tuple[str, int]] = []
    self.stats = {"empty_classes": 0, "ignored_files": 0}
    for label, name in enumerate(self.class_names):
      folder = os.path.join(self.root, name)
      images, ignored = list_images(folder, extensions)
      if ignored:
        self.stats["ignored_files"] += ignored
        logging.warning("%s: ignored %d non-image entries (extensions %s)",
                        folder, ignored, extensions)
      if not images:
        self.stats["empty_classes"] += 1
        logging.warning("%s: class %d (%r) has no images; its label stays "
                        "reserved", folder, label, name)
      self._items.extend((os.path.join(folder, f), label) for f in images)
    if not self._items:
      raise ValueError(f"image folder {self.root!r} has no images with "
                       f"extensions {extensions}")

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def __len__(self) -> int:
    return len(self._items)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return file_record(*self._items[index])

  def __repr__(self) -> str:
    return (f"ImageFolderSource({self.root!r}, {len(self)} images, "
            f"{self.num_classes} classes)")


# ---------------------------------------------------------------- TFDS


class TfdsSource:
  """A TFDS image-classification split, images left encoded.

  Uses `tfds.data_source` (random access over the prepared ArrayRecord
  files; the dataset must already be prepared in `data_dir`, or `download`
  must be True).
  """

  def __init__(self, name: str, split: str, *, data_dir: str | None = None,
               image_key: str = "image", label_key: str = "label",
               download: bool = False):
    """Opens the split.

    Args:
      name: TFDS name, e.g. "imagenet2012" or "cifar10".
      split: e.g. "train", "validation[:1000]".
      data_dir: TFDS data directory (None: TFDS's default).
      image_key, label_key: feature names of the image and the class label.
      download: let TFDS download and prepare the dataset if missing.
    """
    import tensorflow_datasets as tfds  # Heavy; only when used.
    self.name, self.split = name, split
    self._image_key, self._label_key = image_key, label_key
    self._source = tfds.data_source(
        name, split=split, data_dir=data_dir, download=download,
        decoders={image_key: tfds.decode.SkipDecoding()})
    label_feature = self._source.dataset_info.features[label_key]
    self.num_classes = getattr(label_feature, "num_classes", None)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = self._source[index]
    return {"image": bytes(record[self._image_key]),
            "label": int(record[self._label_key]),
            "key": f"tfds:{self.name}/{self.split}[{index}]"}

  def __repr__(self) -> str:
    return f"TfdsSource({self.name!r}, {self.split!r}, {len(self)} records)"


def _remove_quietly(path: str) -> None:
  try:
    os.unlink(path)
  except OSError:
    pass


class DecodedImageCache:
  """Another source's images, decoded once into one memory-mapped file.

  For datasets that fit in memory (CIFAR-10: 50,000 x 32 x 32 x 3 = 154 MB):
  every image is read and decoded once, at construction, and its RGB pixels
  are stored in a flat uint8 file (in /dev/shm when it exists). Records are
  then {"image": (h, w, 3) uint8 array, "label", "key"}, a view of the file,
  with no file read, header parse or decode per sample (~0.2 ms of a core
  for a CIFAR JPEG, a fifth of its whole training transform). Worker
  processes receive the file's name, not its bytes, and map it: the pages
  are shared by all of them.

  Records that do not decode (`decode_image` raises) stay the underlying
  source's records, so the pipeline reports them as before.

  Pixels equal `decode_image` at full size. The training transform may
  decode a JPEG at 1/2 to 1/8 scale (`draft_size`) when the sample shrinks
  it to half its stored size or less; from the cache it resamples the full
  image instead (a little sharper). On images no sample shrinks that far
  (CIFAR at canvas >= 32) the output is identical.

  Attributes:
    num_classes: the underlying source's, when it has one.
    nbytes: size of the decoded pixels.
  """

  def __init__(self, source, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
               directory: str | None = None):
    """Decodes every record of `source` (records as this module's sources).

    Args:
      source: a random-access source of encoded-image records.
      max_pixels: decompression-bomb guard, as `decode_image`.
      directory: where the pixel file goes; default /dev/shm if it exists,
        else the temporary directory. It is unlinked when this object (in
        the process that built it) is collected; mappings stay valid.
    """
    self._source = source
    self.num_classes = getattr(source, "num_classes", None)
    n = len(source)
    self._labels = np.zeros(n, np.int64)
    self._keys: list[str] = []
    self._shapes = np.zeros((n, 2), np.int64)  # (0, 0): undecodable.
    pixels = []
    for i in range(n):
      record = source[i]
      key = record.get("key", f"<record {i}>")
      self._labels[i] = int(record["label"])
      self._keys.append(key)
      try:
        image = decode_image(record["image"], key, max_pixels=max_pixels)
      except BadImageError:
        continue
      array = np.asarray(image, np.uint8)
      self._shapes[i] = array.shape[:2]
      pixels.append(array.reshape(-1))
    sizes = self._shapes[:, 0] * self._shapes[:, 1] * 3
    self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    self.nbytes = int(self._offsets[-1])
    if directory is None:
      directory = "/dev/shm" if os.path.isdir("/dev/shm") else None
    fd, self._path = tempfile.mkstemp(prefix="mambaeye_decoded_",
                                      suffix=".u8", dir=directory)
    with os.fdopen(fd, "wb") as f:
      for array in pixels:
        f.write(array.tobytes())
    # Removed with this object or at exit, whichever comes first; never by
    # the worker processes' copies (not pickled).
    self._cleanup = weakref.finalize(self, _remove_quietly, self._path)
    self._pixels = self._map()

  def _map(self) -> np.ndarray:
    if not self.nbytes:  # np.memmap cannot map an empty file.
      return np.zeros(0, np.uint8)
    # A plain ndarray view: slicing a np.memmap builds memmap objects (~10x
    # the cost of an ndarray slice, per sample).
    return np.memmap(self._path, np.uint8, mode="r",
                     shape=(self.nbytes,)).view(np.ndarray)

  def __len__(self) -> int:
    return len(self._labels)

  def __getitem__(self, index: int) -> dict[str, Any]:
    h, w = self._shapes[index]
    if not h:
      return self._source[index]
    start = self._offsets[index]
    image = self._pixels[start:start + h * w * 3].reshape(h, w, 3)
    return {"image": image, "label": int(self._labels[index]),
            "key": self._keys[index]}

  def __getstate__(self) -> dict[str, Any]:
    # Worker processes map the file; they never remove it.
    state = dict(self.__dict__)
    del state["_pixels"]
    state.pop("_cleanup", None)
    return state

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._pixels = self._map()

  def __repr__(self) -> str:
    return (f"DecodedImageCache({self._source!r}, {self.nbytes / 2**20:.0f} "
            f"MiB at {self._path})")
