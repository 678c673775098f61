"""ArrayRecord shards of encoded images: the record format and the source.

`encode_record` / `decode_record` define one record (written by
`convert_arrayrecord`); `ArrayRecordSource` reads shards (local, or gs://
through etils) as a Grain random-access source of the records of
`sources` ({"image": bytes, "label": int, "key": str}). Its own module
because Grain (which imports JAX) is needed here and not by the other
sources, which the evaluation workers import.
"""

from __future__ import annotations

import glob
import json
import os
import re
import struct
from typing import Any, Sequence

import grain
from etils import epath

_HEADER = struct.Struct("<I")  # Length of the JSON metadata that follows.


def encode_record(image: bytes, label: int, key: str) -> bytes:
  """Serialises one example: u32 metadata length, JSON metadata, image bytes.

  Args:
    image: the encoded image file, stored unchanged.
    label: class index.
    key: the record's name (e.g. its original path).

  Returns:
    The record's bytes.
  """
  meta = json.dumps({"label": int(label), "key": key}).encode()
  return _HEADER.pack(len(meta)) + meta + image


def decode_record(record: bytes) -> dict[str, Any]:
  """Inverse of `encode_record` -> {"image", "label", "key"}."""
  (n,) = _HEADER.unpack_from(record)
  meta = json.loads(record[_HEADER.size:_HEADER.size + n])
  return {"image": bytes(record[_HEADER.size + n:]), "label": meta["label"],
          "key": meta["key"]}


class ArrayRecordSource:
  """Examples from ArrayRecord shards written by `convert_arrayrecord`."""

  def __init__(self, paths: str | Sequence[str]):
    """Opens the shards.

    Args:
      paths: shard file paths, or one glob pattern (e.g. "out/train-*").

    Raises:
      FileNotFoundError: when no shard matches.
      ValueError: a shard is not an ArrayRecord file (the message names it).
    """
    # array_record reads gs:// itself; only the look-ups go through epath
    # (gcsfs), as glob / os.path would search a local "gs:" directory.
    globbed = False
    asked = [paths] if isinstance(paths, str) else list(paths)
    if isinstance(paths, str):
      if not any(c in paths for c in "*?["):
        paths = [paths]
      elif _is_url(paths):
        pattern = epath.Path(paths)
        paths = sorted(str(p) for p in pattern.parent.glob(pattern.name))
        globbed = True
      else:
        paths = sorted(glob.glob(paths))
    # A bucket's glob lists existing objects only; a look-up per shard would
    # cost one request each (thousands of shards).
    missing = [p for p in paths if not (
        (globbed or epath.Path(p).exists()) if _is_url(p) else os.path.isfile(p))]
    if not paths or missing:
      # A pattern that matched nothing is named as given.
      raise FileNotFoundError(f"ArrayRecord shards not found: "
                              f"{missing or paths or asked}")
    self.paths = list(paths)
    try:
      self._source = grain.sources.ArrayRecordDataSource(self.paths)
    except Exception:  # pylint: disable=broad-except
      # array_record's errors ("ArrayRecord file should be at least 64KB
      # big") do not say which of the shards is bad: find it.
      _raise_bad_shard(self.paths)
      raise
    meta_path = _metadata_path(self.paths[0])
    self.num_classes = None
    if epath.Path(meta_path).is_file():
      with epath.Path(meta_path).open() as f:
        self.num_classes = json.load(f).get("num_classes")

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return decode_record(self._source[index])

  def __repr__(self) -> str:
    return f"ArrayRecordSource({len(self.paths)} shards, {len(self)} records)"


def _is_url(path: str | os.PathLike) -> bool:
  """True for "gs://bucket/..."-style paths, which os.path and glob cannot read."""
  return "://" in os.fspath(path)


def _raise_bad_shard(paths: Sequence[str]) -> None:
  """Opens each shard alone; raises ValueError naming the first that fails.

  Returns (the caller re-raises its own error) when each opens alone.
  """
  for path in paths:
    try:
      grain.sources.ArrayRecordDataSource([path])
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"ArrayRecord shard {path} cannot be read: {type(e).__name__}: "
                       f"{e} (a corrupt or truncated file, or not an ArrayRecord "
                       "file; rewrite it with mambaeye_jax.data.convert_arrayrecord)"
                       ) from e


_SHARD_SUFFIX = re.compile(r"-\d{5}-of-\d{5}\.array_record$")


def shard_paths(prefix: str, num_shards: int) -> list[str]:
  """Shard file names for `prefix`: PREFIX-00000-of-00004.array_record ..."""
  return [f"{prefix}-{i:05d}-of-{num_shards:05d}.array_record"
          for i in range(num_shards)]


def _metadata_path(shard_path: str) -> str:
  """Sidecar JSON (class names) written next to the shards: PREFIX.json."""
  return _SHARD_SUFFIX.sub("", shard_path) + ".json"


# ---------------------------------------------------------------- decoded
