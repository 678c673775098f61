"""Reads PyTorch `.pt` state_dicts and `.safetensors` files without torch.

A `torch.save` file is a zip archive: `<name>/data.pkl` pickles the object
graph, and each tensor's storage is a raw little-endian file
`<name>/data/<key>`. We unpickle with a whitelist: only the classes a
state_dict needs are resolved (tensors are rebuilt as numpy arrays), so a
checkpoint can never run code on load.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64,
    "HalfStorage": np.float16, "BFloat16Storage": "bfloat16",
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}

_SAFETENSORS_DTYPES = {
    "F32": np.float32, "F64": np.float64, "F16": np.float16, "BF16": "bfloat16",
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U8": np.uint8, "BOOL": np.bool_,
}


class CheckpointFormatError(ValueError):
  """A checkpoint file that is not what it claims to be."""


def _np_dtype(dtype):
  if dtype == "bfloat16":
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(dtype)


class _StorageType:
  def __init__(self, name: str):
    self.dtype = _np_dtype(_STORAGE_DTYPES[name])


def _rebuild_tensor(storage, offset, size, stride, *unused_args):
  """torch._utils._rebuild_tensor_v2 for numpy: a strided view of the storage."""
  itemsize = storage.dtype.itemsize
  if not size:
    return storage[offset].copy()
  view = np.lib.stride_tricks.as_strided(
      storage[offset:], shape=tuple(size),
      strides=tuple(s * itemsize for s in stride))
  return np.array(view)


def _rebuild_parameter(data, *unused_args):
  return data


class _Unpickler(pickle.Unpickler):
  """Resolves only what a state_dict needs; everything else is refused."""

  def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, path: str):
    super().__init__(io.BytesIO(data))
    self._archive = archive
    self._prefix = prefix
    self._path = path
    self._storages = {}

  def find_class(self, module, name):
    if module == "collections" and name == "OrderedDict":
      return collections.OrderedDict
    if module == "torch._utils" and name == "_rebuild_tensor_v2":
      return _rebuild_tensor
    if module == "torch._utils" and name == "_rebuild_parameter":
      return _rebuild_parameter
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    if module == "torch" and name == "Size":
      return tuple
    raise CheckpointFormatError(
        f"{self._path}: refusing to unpickle {module}.{name}; only plain "
        "state_dicts of tensors can be read without torch")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
      raise CheckpointFormatError(f"{self._path}: unexpected persistent id {pid!r}")
    _, storage_type, key, _, _ = pid
    if key not in self._storages:
      name = f"{self._prefix}data/{key}"
      try:
        raw = self._archive.read(name)
      except KeyError:
        raise CheckpointFormatError(f"{self._path}: missing tensor data {name}") from None
      dtype = storage_type.dtype
      if len(raw) % dtype.itemsize:
        raise CheckpointFormatError(f"{self._path}: {name} is truncated")
      self._storages[key] = np.frombuffer(raw, dtype)
    return self._storages[key]


def load_torch_file(path: str) -> dict:
  """Loads a `torch.save`d object (a state_dict) as numpy arrays.

  Raises:
    FileNotFoundError: the path does not exist.
    CheckpointFormatError: not a zip-format torch file, truncated, or not a
      plain state_dict.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint {path} does not exist")
  try:
    archive = zipfile.ZipFile(path)
  except (zipfile.BadZipFile, OSError) as e:
    raise CheckpointFormatError(
        f"{path}: not a PyTorch checkpoint (expected the zip format of "
        f"torch.save, {e})") from None
  with archive:
    pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
    if not pickles:
      raise CheckpointFormatError(f"{path}: zip archive without data.pkl")
    prefix = pickles[0][:-len("data.pkl")]
    try:
      return _Unpickler(archive.read(pickles[0]), archive, prefix, path).load()
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile) as e:
      raise CheckpointFormatError(f"{path}: corrupt checkpoint ({e})") from None


def load_safetensors(path: str) -> dict:
  """Loads a `.safetensors` file as a dict of numpy arrays.

  Layout: an 8-byte little-endian header length N, N bytes of JSON
  {name: {"dtype", "shape", "data_offsets": [start, end]}}, then the data.

  Raises:
    FileNotFoundError: the path does not exist.
    CheckpointFormatError: not a safetensors file (a header longer than the
      file, or not JSON), a tensor of a dtype this reader does not know, or
      offsets that do not fit the shape or the file; the message names the
      file and the tensor.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint {path} does not exist")
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) != 8:
      raise CheckpointFormatError(f"{path}: not a safetensors file: "
                                  f"{size} bytes, too short for a header")
    (header_len,) = struct.unpack("<Q", head)
    # Checked before reading: random bytes give lengths of many exabytes.
    if header_len > size - 8:
      raise CheckpointFormatError(
          f"{path}: not a safetensors file: header length {header_len:,} "
          f"exceeds the file's size ({size:,} bytes)")
    try:
      header = json.loads(f.read(header_len))
    except (ValueError, UnicodeDecodeError) as e:
      raise CheckpointFormatError(f"{path}: not a safetensors file: its "
                                  f"header is not JSON ({e})") from None
    body = f.read()
  if not isinstance(header, dict):
    raise CheckpointFormatError(f"{path}: not a safetensors file: its header "
                                f"is a JSON {type(header).__name__}, not an object")
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    try:
      dtype_name, shape = info["dtype"], tuple(int(d) for d in info["shape"])
      start, end = (int(x) for x in info["data_offsets"])
    except (TypeError, KeyError, ValueError) as e:
      raise CheckpointFormatError(
          f"{path}: tensor {name!r} has a malformed header entry {info!r} "
          f"({type(e).__name__}: {e})") from None
    if dtype_name not in _SAFETENSORS_DTYPES:
      raise CheckpointFormatError(
          f"{path}: tensor {name!r} has dtype {dtype_name}, which this reader "
          f"does not support (supported: {', '.join(_SAFETENSORS_DTYPES)})")
    dtype = _np_dtype(_SAFETENSORS_DTYPES[dtype_name])
    want = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if not 0 <= start <= end or end - start != want:
      raise CheckpointFormatError(
          f"{path}: tensor {name!r} has data offsets [{start}, {end}], which "
          f"do not hold {dtype_name} {list(shape)} ({want} bytes)")
    if end > len(body):
      raise CheckpointFormatError(f"{path}: tensor {name!r} is truncated "
                                  f"(ends at byte {end} of {len(body)})")
    out[name] = np.frombuffer(body[start:end], dtype).reshape(shape).copy()
  return out


def load_state_dict(path: str) -> dict:
  """A flat {name: array} from a `.pt`/`.pth`/`.bin` or `.safetensors` file.

  Checkpoints that wrap the state_dict ({"model": ...}, {"state_dict": ...})
  are unwrapped, and DataParallel / torch.compile prefixes removed.
  """
  if path.endswith(".safetensors"):
    state = load_safetensors(path)
  else:
    state = load_torch_file(path)
  for key in ("model", "state_dict", "model_state_dict", "module"):
    if isinstance(state, dict) and key in state and isinstance(state[key], dict):
      state = state[key]
  if not isinstance(state, dict):
    raise CheckpointFormatError(f"{path}: holds a {type(state).__name__}, not a state_dict")
  clean = {}
  for name, value in state.items():
    for prefix in ("module.", "_orig_mod."):
      if name.startswith(prefix):
        name = name[len(prefix):]
    clean[name] = value
  return clean
