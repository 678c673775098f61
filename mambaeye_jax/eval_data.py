"""Evaluation datasets: the `--data` specs of eval.py and ImageNet class maps.

`open_source(spec)` turns a spec into a random-access source of records

    {"image": encoded bytes or (h, w, 3) uint8, "label": int, "key": str}

(the record format of `data.sources`; images are decoded later, in the
evaluator's workers) with a `class_map` (index -> key and readable name),
`num_classes` and a `description`. Specs: an image folder `root/<class>/
<image>`; a folder of loose photos named `<synset>_<name>.<ext>` (ImageNet
class from the synset); a `.tar.gz` / `.tgz` / `.tar` of either;
`tfds:NAME[:SPLIT]`; `synthetic[:N]` (`data.synthetic.SyntheticShapes`).

ImageNet-1K class indices are positions in the sorted list of the 1000
synsets, read from the copy tensorflow-datasets ships
(`builtin_imagenet_classes`), or from a `--class-map` file.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import importlib.resources
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
from typing import Any, Sequence

import numpy as np

from mambaeye_jax.data import sources
from mambaeye_jax.data import synthetic


class EvalError(Exception):
  """A failure the command line reports as one clear sentence."""


class CheckpointError(EvalError):
  """The checkpoint is missing or is not a MambaEye."""


class DataError(EvalError):
  """The dataset cannot be read or does not fit the model."""


# Loose photos and folder names carrying an ImageNet synset id.
# Package data beside the data modules: the ImageNet-1K class list.
IMAGENET_CLASSES_FILE = "imagenet_classes.txt"

SYNSET_PATTERN = re.compile(r"^(n\d{8})(?:[_\-. ](.*))?$")
# The official rule for what is an image (as `data.sources.ImageFolderSource`).


# ------------------------------------------------------------------ classes


@dataclasses.dataclass(frozen=True)
class ClassMap:
  """Class index -> key (a synset or folder name) and a readable name.

  Attributes:
    keys: (K,) keys in class-index order.
    names: (K,) readable names ("" where unknown).
  """
  keys: tuple[str, ...]
  names: tuple[str, ...]

  def __post_init__(self):
    if len(self.keys) != len(self.names):
      raise ValueError("ClassMap keys and names differ in length")
    if len(set(self.keys)) != len(self.keys):
      dup = sorted(k for k, n in collections.Counter(self.keys).items() if n > 1)
      raise ValueError(f"class map repeats keys {dup[:5]}")

  def index(self) -> dict[str, int]:
    return {k: i for i, k in enumerate(self.keys)}

  def name(self, index: int) -> str:
    """Readable name of a class index (its key when no name is known)."""
    if 0 <= index < len(self.keys):
      return self.names[index] or self.keys[index]
    return str(index)


def _parse_class_text(text: str) -> ClassMap:
  """`KEY [readable name]` lines in index order (blank lines and `#` comments
  skipped) -> ClassMap."""
  keys, names = [], []
  for line in text.splitlines():
    line = line.strip()
    if not line or line.startswith("#"):
      continue
    key, _, name = line.partition(" ")
    keys.append(key.strip())
    names.append(name.strip())
  return ClassMap(tuple(keys), tuple(names))


def read_class_map(path: str) -> ClassMap:
  """Reads a class-map file.

  Formats: a text file with one class per line in index order,
  `KEY [readable name]` (KEY a synset such as n01440764 or a folder name;
  blank lines and `#` comments skipped); or JSON, either a list of keys, or
  an object {KEY: index} / {KEY: [index, name]}.

  Raises:
    DataError: missing file or a malformed map.
  """
  if not os.path.isfile(path):
    raise DataError(f"class map {path} does not exist")
  with open(path, encoding="utf-8") as f:
    text = f.read()
  try:
    if path.endswith(".json"):
      data = json.loads(text)
      if isinstance(data, list):
        return ClassMap(tuple(map(str, data)), ("",) * len(data))
      entries = sorted(
          (int(v[0]) if isinstance(v, list) else int(v), str(k),
           str(v[1]) if isinstance(v, list) and len(v) > 1 else "")
          for k, v in data.items())
      if [e[0] for e in entries] != list(range(len(entries))):
        raise ValueError("indices must be 0..K-1, each once")
      return ClassMap(tuple(e[1] for e in entries), tuple(e[2] for e in entries))
    return _parse_class_text(text)
  except (ValueError, TypeError, KeyError) as e:
    raise DataError(f"class map {path} is malformed: {e}") from e


def builtin_imagenet_classes() -> ClassMap:
  """The 1000 ImageNet-1K synsets in class-index order, with readable names.

  The standard class index of ImageNet-1K (torchvision's ImageFolder over
  the train folders, the official code's labels) is the position of the
  synset in the sorted list of the 1000 synsets. The list ships with this
  package (`data/imagenet_classes.txt`, written once by
  tools/make_imagenet_classes.py from tensorflow-datasets' files).
  """
  text = importlib.resources.files("mambaeye_jax.data").joinpath(
      IMAGENET_CLASSES_FILE).read_text(encoding="utf-8")
  return _parse_class_text(text)


def _readable(name: str) -> str:
  return name.replace("_", " ").strip()


# ------------------------------------------------------------------ sources


class FileListSource:
  """Images given as (path, label) pairs; records as `data.sources` has them.

  Records are {"image": bytes, "label": int, "key": path}; images are
  decoded in the workers.
  """

  def __init__(self, items: Sequence[tuple[str, int]], class_map: ClassMap,
               description: str):
    self._items = list(items)
    self.class_map = class_map
    self.num_classes = len(class_map.keys)
    self.description = description

  def __len__(self) -> int:
    return len(self._items)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return sources.file_record(*self._items[index])

  def labels(self) -> np.ndarray:
    """(N,) int64 every record's label, without reading an image."""
    return np.array([label for _, label in self._items], np.int64)


class RepeatSource:
  """A source seen `times` times in a row (benchmarks on a small sample)."""

  def __init__(self, source, times: int):
    self._source = source
    self._times = int(times)
    self.class_map = getattr(source, "class_map", None)
    self.num_classes = getattr(source, "num_classes", None)
    self.description = f"{getattr(source, 'description', source)} x{times}"

  def __len__(self) -> int:
    return len(self._source) * self._times

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._source[index % len(self._source)]

  def labels(self) -> np.ndarray:
    return np.tile(record_labels(self._source), self._times)


class SubsetSource:
  """The records `indices` of a source, in that order (`--max-examples`)."""

  def __init__(self, source, indices: Sequence[int], description: str):
    self._source = source
    self.indices = np.asarray(indices, np.int64)
    self.class_map = getattr(source, "class_map", None)
    self.num_classes = getattr(source, "num_classes", None)
    self.description = description

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._source[int(self.indices[index])]

  def labels(self) -> np.ndarray:
    return record_labels(self._source)[self.indices]


def record_labels(source) -> np.ndarray:
  """(N,) int64 the label of every record of a source.

  Uses the source's `labels()` where it has one, or the (path, label) list
  of `data.sources.ImageFolderSource`; any other source is read record by
  record (TFDS datasets decode their images to do so).
  """
  if hasattr(source, "labels"):
    return np.asarray(source.labels(), np.int64)
  items = getattr(source, "_items", None)  # ImageFolderSource's listing.
  if isinstance(items, list) and all(
      isinstance(i, tuple) and len(i) == 2 for i in items[:1]):
    return np.array([label for _, label in items], np.int64)
  if len(source) > 10_000:
    logging.warning("reading the labels of %d records to draw a stratified "
                    "subset (this source keeps no label list)", len(source))
  return np.array([int(source[i]["label"]) for i in range(len(source))], np.int64)


def stratified_subset(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
  """Indices of `count` examples, the same number per class give or take one.

  Each class's examples are shuffled; round r takes the r-th example of
  every class that has one, and the last, partial round takes classes in a
  random order. A class with fewer examples than its share gives all it
  has, and the others make up the count.

  Args:
    labels: (N,) int, every example's class.
    count: how many to take (all N when count >= N).
    seed: the draw; the same seed, labels and count give the same subset.

  Returns:
    (min(count, N),) int64 indices, ascending (dataset order).
  """
  labels = np.asarray(labels, np.int64)
  n = len(labels)
  if count >= n:
    return np.arange(n, dtype=np.int64)
  # A stream apart from the scan orders' (glimpses.example_rng: [seed, i]).
  rng = np.random.default_rng([seed, 0, 1])
  shuffled = rng.permutation(n)
  # Grouped by class, shuffled within: the rank of each example in its class.
  grouped = shuffled[np.argsort(labels[shuffled], kind="stable")]
  classes, starts = np.unique(labels[grouped], return_index=True)
  rank = np.arange(n) - np.repeat(starts, np.diff(np.append(starts, n)))
  priority = rng.permutation(len(classes))[np.searchsorted(classes, labels[grouped])]
  take = grouped[np.lexsort((priority, rank))[:count]]
  return np.sort(take)


class _Described:
  """Wraps a `data.sources` / `data.synthetic` source with a class map."""

  def __init__(self, source, class_map: ClassMap | None, description: str):
    self._source = source
    self.class_map = class_map
    self.num_classes = (len(class_map.keys) if class_map is not None
                        else getattr(source, "num_classes", None))
    self.description = description

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._source[index]

  def labels(self) -> np.ndarray:
    return record_labels(self._source)


def _extract_archive(path: str, extract_dir: str | None) -> str:
  """Unpacks a tar archive; returns the directory holding its content.

  A single top-level folder is descended into. The archive is unpacked with
  the "data" filter (no absolute paths, links out of the tree or devices).
  """
  if extract_dir is None:
    extract_dir = tempfile.mkdtemp(prefix="mambaeye_eval_")
    atexit.register(shutil.rmtree, extract_dir, ignore_errors=True)
  try:
    with tarfile.open(path) as tar:
      tar.extractall(extract_dir, filter="data")
  except (tarfile.TarError, OSError, EOFError) as e:
    raise DataError(f"cannot unpack {path}: {e}") from e
  root = extract_dir
  while True:
    entries = [e for e in os.listdir(root) if not e.startswith(".")]
    if len(entries) == 1 and os.path.isdir(os.path.join(root, entries[0])):
      root = os.path.join(root, entries[0])
    else:
      return root


def _loose_photos(root: str, files: Sequence[str],
                  class_map: ClassMap | None, unknown_synsets: str):
  """Loose photos named `<synset>_<name>.<ext>` -> FileListSource."""
  parsed = []
  for f in files:
    match = SYNSET_PATTERN.match(os.path.splitext(f)[0])
    if not match:
      raise DataError(
          f"{os.path.join(root, f)}: loose photos must be named "
          "<synset>_<name>.<ext> (e.g. n01440764_tench.JPEG); put them in "
          "class folders root/<class>/<image> otherwise")
    parsed.append((f, match.group(1), _readable(match.group(2) or "")))
  given = class_map is not None
  class_map = class_map or builtin_imagenet_classes()
  if class_map is None:
    if unknown_synsets != "sorted":
      raise DataError(
          "the class index of an ImageNet synset needs the sorted list of the "
          "1000 ImageNet synsets: install tensorflow-datasets (it ships that "
          "list) or pass --class-map FILE (one synset per line, in class "
          "order)")
    keys = tuple(sorted({s for _, s, _ in parsed}))
    logging.warning("no ImageNet synset list: %d synsets numbered in sorted "
                    "order of those present (accuracies against a 1000-class "
                    "model are meaningless)", len(keys))
    class_map = ClassMap(keys, ("",) * len(keys))
  index = class_map.index()
  missing = sorted({s for _, s, _ in parsed if s not in index})
  if missing:
    raise DataError(f"synsets {missing[:5]} of {root} are not in the "
                    f"{'given' if given else 'ImageNet'} class map")
  # Readable names from the file names where the map has none.
  names = list(class_map.names)
  for _, synset, name in parsed:
    if name and not names[index[synset]]:
      names[index[synset]] = name
  class_map = ClassMap(class_map.keys, tuple(names))
  items = [(os.path.join(root, f), index[s]) for f, s, _ in parsed]
  return FileListSource(items, class_map, f"{root} ({len(items)} photos)")


def _class_folders(root: str, class_map: ClassMap | None):
  """`root/<class>/<image>` -> a source with a class map.

  Without a class map, folders named by ImageNet synsets are numbered by the
  ImageNet list (right for any subset of the 1000 classes); other folders
  by their sorted names, as the official code (torchvision ImageFolder).
  """
  folders = sources.class_folders(root)
  if class_map is None and folders and all(SYNSET_PATTERN.match(d) for d in folders):
    class_map = builtin_imagenet_classes()
  if class_map is None:
    src = sources.ImageFolderSource(root)
    cmap = ClassMap(tuple(src.class_names),
                    tuple(_readable(n) for n in src.class_names))
    return _Described(src, cmap, f"{root} ({len(src)} images, "
                      f"{src.num_classes} classes)")
  index = class_map.index()
  missing = [d for d in folders if d not in index]
  if missing:
    raise DataError(f"class folders {missing[:5]} of {root} are not in the "
                    "class map")
  items = []
  for d in folders:
    items += [(os.path.join(root, d, f), index[d])
              for f in sources.list_images(os.path.join(root, d))[0]]
  if not items:
    raise DataError(f"{root} holds no images")
  return FileListSource(items, class_map, f"{root} ({len(items)} images)")


def open_source(spec: str, *, class_map: str | ClassMap | None = None,
                extract_dir: str | None = None, tfds_data_dir: str | None = None,
                unknown_synsets: str = "error"):
  """Opens a dataset for evaluation.

  Args:
    spec: an image folder (class folders, or loose `<synset>_<name>` photos),
      a `.tar.gz` / `.tgz` / `.tar` of one, `tfds:NAME[:SPLIT]` (split
      "validation" by default) or `synthetic[:N]` (N = 100 by default).
    class_map: a `ClassMap` or a path for `read_class_map`.
    extract_dir: where archives are unpacked (a temporary folder, removed at
      exit, by default).
    tfds_data_dir: TFDS data directory.
    unknown_synsets: "error", or "sorted" to number the synsets present in
      sorted order when no ImageNet list is available (benchmarks only).

  Returns:
    A random-access source: `len`, `[i]` -> {"image": bytes or (h, w, 3)
    uint8, "label": int, "key": str}, plus `class_map` (or None),
    `num_classes` and `description`.

  Raises:
    DataError: for anything that cannot be read as a dataset.
  """
  if isinstance(class_map, str):
    class_map = read_class_map(class_map)
  if spec.startswith("synthetic"):
    _, _, count = spec.partition(":")
    try:
      num = int(count) if count else 100
    except ValueError:
      raise DataError(f"bad synthetic dataset {spec!r}; use synthetic[:N]") from None
    src = synthetic.SyntheticShapes(num)
    names = tuple(synthetic.CLASS_NAMES)
    return _Described(src, ClassMap(names, names), f"synthetic shapes ({num})")
  if spec.startswith("tfds:"):
    # Splits may hold colons themselves ("validation[:1000]").
    name, _, split = spec[len("tfds:"):].partition(":")
    split = split or "validation"
    try:
      src = sources.TfdsSource(name, split, data_dir=tfds_data_dir)
    except Exception as e:  # TFDS raises many types for a missing dataset.
      raise DataError(f"cannot open TFDS dataset {name} split {split}: {e}") from e
    if class_map is None:
      try:
        info = src._source.dataset_info  # pylint: disable=protected-access
        label_names = tuple(getattr(info.features["label"], "names", None) or ())
      except (AttributeError, KeyError):
        label_names = ()
      if label_names:
        class_map = ClassMap(label_names, tuple(map(_readable, label_names)))
    return _Described(src, class_map, f"tfds {name}/{split} ({len(src)})")
  if not os.path.exists(spec):
    raise DataError(f"dataset {spec} does not exist (give an image folder, a "
                    ".tar.gz of one, tfds:NAME[:SPLIT] or synthetic[:N])")
  root = spec
  if os.path.isfile(spec):
    if not tarfile.is_tarfile(spec):
      raise DataError(f"{spec} is neither a folder nor a tar archive")
    root = _extract_archive(spec, extract_dir)
  files = sources.list_images(root)[0]
  folders = sources.class_folders(root)
  try:
    if files and not folders:
      return _loose_photos(root, files, class_map, unknown_synsets)
    if folders:
      return _class_folders(root, class_map)
  except (FileNotFoundError, ValueError) as e:
    if isinstance(e, EvalError):
      raise
    raise DataError(str(e)) from e
  raise DataError(f"{spec} holds no images")
