"""Multi-resolution evaluation of a MambaEye checkpoint (the library of eval.py).

Dimension letters: N examples, b batch, S canvas side, t / T glimpses,
K classes.

One evaluation *setting* is (canvas side S, resize mode, scan pattern, T).
For each setting every image becomes

    canvas (S, S, 3) uint8 + positions (T, 2) int32 + label

on the host, in a pool of worker processes (decode, resize, scan order)
that write straight into shared-memory batch slots. The device receives
only those uint8 canvases and int corners, gathers the 16 x 16 patches
itself (`glimpse.extract_patches_jax`), runs the jitted forward and reduces
the logits to per-step correct counts: only (T,) counts and (b,) last-step
predictions ever come back to the host. Batches have one fixed shape (the
last is padded and masked), so the step compiles once per canvas size, and
the next batch is transferred while the current one computes.

Glimpse counts are read off one run of the longest: the model is causal, so
the logits after g glimpses of a T-glimpse sequence are those of a
g-glimpse sequence with the same first g corners. Grid patterns (and
`random_fixed_grid`) give exactly those corners; for `random` (and
`random_official`) the corners of
a shorter run would be other independent uniform draws, the same
distribution.

Datasets come from `eval_data.open_source` (re-exported here with the
error types and class maps, so `eval_lib` is the one import callers need).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import json
import logging
import multiprocessing
import os
import time
from multiprocessing import shared_memory
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from mambaeye_jax import checkpoint
from mambaeye_jax import glimpse
from mambaeye_jax import loss
from mambaeye_jax import model_dir
from mambaeye_jax import plots as plots_lib
from mambaeye_jax import progress as progress_lib
from mambaeye_jax import work_dir
from mambaeye_jax.data import eval_transforms
from mambaeye_jax.data import geometry
from mambaeye_jax.data import glimpses
from mambaeye_jax.data import scan_patterns
from mambaeye_jax.data import sources
from mambaeye_jax.eval_data import CheckpointError
from mambaeye_jax.eval_data import ClassMap
from mambaeye_jax.eval_data import DataError
from mambaeye_jax.eval_data import EvalError
from mambaeye_jax.eval_data import RepeatSource  # pylint: disable=unused-import (re-export)
from mambaeye_jax.eval_data import SYNSET_PATTERN
from mambaeye_jax.eval_data import SubsetSource
from mambaeye_jax.eval_data import record_labels
from mambaeye_jax.eval_data import stratified_subset
from mambaeye_jax.eval_data import builtin_imagenet_classes  # pylint: disable=unused-import (re-export)
from mambaeye_jax.eval_data import open_source  # pylint: disable=unused-import (re-export)
from mambaeye_jax.eval_data import read_class_map  # pylint: disable=unused-import (re-export)

# The official evaluation's defaults (its eval.py): T = 4096 glimpses,
# resize "fit"; 512 is the canvas of the headline numbers. The scan is
# "random", the official validation sampler, which sees the whole image;
# "random_official" is eval.py's own (scan_patterns' module docstring).
DEFAULT_CANVAS_SIZES = (512,)
DEFAULT_RESIZE_MODES = ("fit",)
DEFAULT_SCAN_PATTERNS = ("random",)
DEFAULT_GLIMPSE_COUNTS = (256, 1024, 4096)

# ------------------------------------------------------------------ model


def resolve_dtype(dtype: str) -> str:
  """"auto" -> bfloat16 on accelerators, float32 on CPU (where XLA's bf16
  matmuls are emulated and slower)."""
  if dtype != "auto":
    return dtype
  return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def _restore_from_workdir(workdir: str, **overrides):
  """The latest model of a training work directory; one holding only an
  exported model directory `model/` (no checkpoint) loads that."""
  export_dir = os.path.join(workdir, work_dir.MODEL_DIR)
  try:
    return work_dir.restore_model(workdir, **overrides)
  except FileNotFoundError:
    if os.path.isfile(os.path.join(export_dir, model_dir.CONFIG_FILE)):
      return checkpoint.load_model(export_dir, **overrides)
    raise


def load_eval_model(*, checkpoint_path: str | None = None,
                    workdir: str | None = None, dtype: str = "auto",
                    ssd_impl: str | None = None,
                    chunk_size: int | None = None):
  """Loads the model to evaluate, with compute overrides.

  Args:
    checkpoint_path: a model directory or an official .pt / .safetensors.
    workdir: a training work directory (exactly one of the two).
    dtype: "float32", "bfloat16" or "auto" (bf16 on GPU/TPU, f32 on CPU).
    ssd_impl: SSD implementation override (None keeps the config's).
    chunk_size: SSD chunk override (None keeps the config's).

  Returns:
    The `MambaEye`, parameters float32, compute in `dtype`.

  Raises:
    CheckpointError: missing path, or a file or directory that is not a
      MambaEye checkpoint; the message names the path.
  """
  if (checkpoint_path is None) == (workdir is None):
    raise CheckpointError("give exactly one of a checkpoint or a work directory")
  path = checkpoint_path or workdir
  if not os.path.exists(path):
    kind = "checkpoint" if checkpoint_path else "work directory"
    raise CheckpointError(f"{kind} {path} does not exist")
  overrides = {"dtype": resolve_dtype(dtype)}
  if ssd_impl:
    overrides["ssd_impl"] = ssd_impl
  if chunk_size:
    overrides["chunk_size"] = int(chunk_size)
  try:
    if checkpoint_path:
      return checkpoint.load_model(checkpoint_path, **overrides)
    return _restore_from_workdir(workdir, **overrides)
  except EvalError:
    raise
  except Exception as e:  # Loaders raise many types; one clear message.
    raise CheckpointError(f"cannot load a MambaEye from {path}: "
                          f"{type(e).__name__}: {e}") from e


# ------------------------------------------------------------------ settings


@dataclasses.dataclass(frozen=True)
class Setting:
  """One evaluation setting; every example of it has the same shapes."""
  canvas_size: int
  resize: str
  scan: str
  num_glimpses: int

  def label(self) -> str:
    return f"{self.scan}/{self.resize}/{self.canvas_size}"


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """What to evaluate and how.

  Attributes:
    canvas_sizes: canvas sides S.
    resize_modes: "none", "fit", "full".
    scan_patterns: names registered in `data.scan_patterns`.
    glimpse_counts: accuracies reported after these many glimpses; the run
      uses T = max(glimpse_counts) (see the module docstring).
    batch_size: images per device step (the last batch is padded).
    num_workers: host worker processes (0: decode in this process).
    seed: random scan orders are a function of (seed, example index); it
      also draws the `max_examples` subset.
    max_examples: evaluate a class-stratified subset of this many images
      (`stratified_subset`: the same count per class, give or take one,
      drawn with `seed`); None: all.
    skip_bad_images: leave unreadable images out (counted) instead of
      stopping.
    slots: batch buffers in flight (prefetch depth + 1).
  """
  canvas_sizes: tuple[int, ...] = DEFAULT_CANVAS_SIZES
  resize_modes: tuple[str, ...] = DEFAULT_RESIZE_MODES
  scan_patterns: tuple[str, ...] = DEFAULT_SCAN_PATTERNS
  glimpse_counts: tuple[int, ...] = DEFAULT_GLIMPSE_COUNTS
  batch_size: int = 64
  num_workers: int = 0
  seed: int = 0
  max_examples: int | None = None
  skip_bad_images: bool = False
  slots: int = 4

  def __post_init__(self):
    for name in ("canvas_sizes", "resize_modes", "scan_patterns",
                 "glimpse_counts"):
      if not getattr(self, name):
        raise ValueError(f"EvalConfig.{name} is empty")
    for s in self.canvas_sizes:
      if s < geometry.PATCH_SIZE:
        raise ValueError(f"canvas size {s} is smaller than one "
                         f"{geometry.PATCH_SIZE}x{geometry.PATCH_SIZE} patch")
    for mode in self.resize_modes:
      if mode not in eval_transforms.RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; known modes: "
                         f"{', '.join(eval_transforms.RESIZE_MODES)}")
    for name in self.scan_patterns:
      try:
        scan_patterns.get(name)
      except KeyError as e:
        raise ValueError(e.args[0]) from None
    if min(self.glimpse_counts) < 1:
      raise ValueError(f"glimpse counts {self.glimpse_counts} must be >= 1")
    if self.max_examples is not None and self.max_examples < 1:
      raise ValueError(f"max_examples={self.max_examples} must be >= 1")
    if self.batch_size < 1 or self.num_workers < 0 or self.slots < 2:
      raise ValueError(f"need batch_size >= 1, num_workers >= 0, slots >= 2; "
                       f"got {self.batch_size}, {self.num_workers}, {self.slots}")

  @property
  def num_glimpses(self) -> int:
    return max(self.glimpse_counts)

  def settings(self) -> list[Setting]:
    """Every (canvas, resize, scan) combination, canvas sizes outermost."""
    return [Setting(s, r, p, self.num_glimpses) for s in self.canvas_sizes
            for r in self.resize_modes for p in self.scan_patterns]


# ------------------------------------------------------------------ host side


def prepare_example(record: Mapping[str, Any], setting: Setting, seed: int,
                    index: int) -> tuple[np.ndarray, np.ndarray, geometry.ImageBox]:
  """One record -> (canvas (S, S, 3) uint8, positions (T, 2) int32, box)."""
  canvas, box, positions = glimpses.eval_canvas_and_positions(
      eval_transforms.record_image(record), canvas_size=setting.canvas_size, resize=setting.resize,
      scan=setting.scan, num_glimpses=setting.num_glimpses, seed=seed, index=index)
  return canvas, positions, box


@dataclasses.dataclass
class _HostBatches:
  """`slots` batch buffers: canvases (n, b, S, S, 3) u8, positions
  (n, b, T, 2) i32, labels (n, b) i32, ok (n, b) u8. In shared memory when
  workers fill them, plain arrays otherwise."""
  canvases: np.ndarray
  positions: np.ndarray
  labels: np.ndarray
  ok: np.ndarray
  shms: list

  @classmethod
  def create(cls, slots: int, batch: int, setting: Setting, shared: bool):
    shapes = [((slots, batch, setting.canvas_size, setting.canvas_size, 3), np.uint8),
              ((slots, batch, setting.num_glimpses, 2), np.int32),
              ((slots, batch), np.int32), ((slots, batch), np.uint8)]
    arrays, shms = [], []
    for shape, dtype in shapes:
      if shared:
        nbytes = max(int(np.prod(shape)) * np.dtype(dtype).itemsize, 1)
        shm = shared_memory.SharedMemory(create=True, size=nbytes)
        shms.append(shm)
        arrays.append(np.ndarray(shape, dtype, buffer=shm.buf))
      else:
        arrays.append(np.zeros(shape, dtype))
    return cls(*arrays, shms=shms)

  def spec(self) -> tuple:
    """What a worker needs to attach: ((name, shape, dtype str), ...)."""
    arrays = (self.canvases, self.positions, self.labels, self.ok)
    return tuple((shm.name, a.shape, a.dtype.str) for shm, a in zip(self.shms, arrays))

  def close(self):
    arrays = ("canvases", "positions", "labels", "ok")
    for name in arrays:
      setattr(self, name, None)  # Views must go before the buffers close.
    for shm in self.shms:
      _close_quietly(shm)
      shm.unlink()
    self.shms = []


def _close_quietly(shm: shared_memory.SharedMemory):
  """Closes a mapping; a view still held elsewhere (e.g. by a transfer that
  keeps its source alive) only delays the unmapping to its collection."""
  try:
    shm.close()
  except BufferError:
    pass


def _fill(source, arrays, setting: Setting, seed: int, slot: int,
          offset: int, indices: Sequence[int], skip_bad: bool) -> int:
  """Prepares examples `indices` into rows offset.. of batch slot `slot`.

  Returns:
    How many were unreadable and skipped (their `ok` is 0).

  Raises:
    sources.BadImageError: an unreadable image when not `skip_bad`.
  """
  canvases, positions, labels, ok = arrays
  bad = 0
  for row, index in enumerate(indices, start=offset):
    record = source[index]
    try:
      canvas, pos, _ = prepare_example(record, setting, seed, index)
    except sources.BadImageError:
      if not skip_bad:
        raise
      logging.warning("skipping unreadable image %s", record.get("key"))
      canvases[slot, row] = 0
      positions[slot, row] = 0
      labels[slot, row] = 0
      ok[slot, row] = 0
      bad += 1
      continue
    canvases[slot, row] = canvas
    positions[slot, row] = pos
    labels[slot, row] = int(record["label"])
    ok[slot, row] = 1
  return bad


_WORKER: dict[str, Any] = {}


def _worker_init(source):
  # Workers only prepare numpy data: keep JAX (imported by the glimpse
  # module) off the accelerator should anything initialise a backend.
  os.environ["JAX_PLATFORMS"] = "cpu"
  _WORKER["source"] = source
  _WORKER["spec"] = None


class WorkerError(Exception):
  """A data worker's exception, as a message that survives pickling.

  Exceptions travel from worker processes to the parent pickled; one whose
  class cannot be rebuilt there (a required constructor argument, an
  unpicklable attribute) turns into a "process pool is broken" error and
  its message is lost. This carries the message (and whether it was an
  unreadable image) instead; the worker's traceback stays attached as the
  cause by concurrent.futures.
  """

  def __init__(self, message: str, bad_image: bool = False):
    super().__init__(message, bad_image)
    self.message = message
    self.bad_image = bad_image

  def __str__(self) -> str:
    return self.message


def _worker_fill(spec, setting, seed, slot, offset, indices, skip_bad) -> int:
  """Runs `_fill` in a worker on the shared-memory slots named by `spec`."""
  try:
    return _worker_fill_unsafe(spec, setting, seed, slot, offset, indices, skip_bad)
  except sources.BadImageError as e:
    raise WorkerError(str(e), bad_image=True) from e
  except Exception as e:  # pylint: disable=broad-except
    raise WorkerError(f"{type(e).__name__}: {e}") from e


def _worker_fill_unsafe(spec, setting, seed, slot, offset, indices, skip_bad) -> int:
  if _WORKER["spec"] != spec:
    _WORKER["arrays"] = None  # The views go first, then their mappings.
    for shm in _WORKER.get("shms", []):
      _close_quietly(shm)
    shms = [shared_memory.SharedMemory(name=name) for name, _, _ in spec]
    _WORKER["arrays"] = [np.ndarray(shape, np.dtype(dt), buffer=shm.buf)
                         for shm, (_, shape, dt) in zip(shms, spec)]
    _WORKER["shms"] = shms
    _WORKER["spec"] = spec
  return _fill(_WORKER["source"], _WORKER["arrays"], setting, seed, slot,
               offset, indices, skip_bad)


class WorkerPool:
  """Worker processes that decode and resize into shared memory.

  Started with "spawn": the parent has already started JAX's threads, which
  a fork would copy in an undefined state.
  """

  def __init__(self, source, num_workers: int):
    self.num_workers = num_workers
    self._pool = None
    if num_workers > 0:
      self._pool = concurrent.futures.ProcessPoolExecutor(
          max_workers=num_workers, mp_context=multiprocessing.get_context("spawn"),
          initializer=_worker_init, initargs=(source,))
    self._source = source

  def submit(self, batches: _HostBatches, setting: Setting, seed: int,
             slot: int, indices: Sequence[int], skip_bad: bool) -> list:
    """Starts filling batch slot `slot` with `indices`; returns futures."""
    if self._pool is None:
      arrays = (batches.canvases, batches.positions, batches.labels, batches.ok)
      done = concurrent.futures.Future()
      try:
        done.set_result(_fill(self._source, arrays, setting, seed, slot, 0,
                              indices, skip_bad))
      except Exception as e:  # Re-raised by .result(), as from a worker.
        done.set_exception(e)
      return [done]
    # Chunks small enough that every worker takes part in each batch.
    chunk = max(1, min(16, -(-len(indices) // (2 * self.num_workers))))
    spec = batches.spec()
    return [self._pool.submit(_worker_fill, spec, setting, seed, slot, start,
                              list(indices[start:start + chunk]), skip_bad)
            for start in range(0, len(indices), chunk)]

  def close(self):
    if self._pool is not None:
      self._pool.shutdown(wait=True, cancel_futures=True)
      self._pool = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


# ------------------------------------------------------------------ device side


def score_logits(logits: jax.Array, labels: jax.Array,
                 valid: jax.Array) -> dict[str, jax.Array]:
  """Reduces logits to what leaves the device.

  Args:
    logits: (b, T, K).
    labels: (b,) int.
    valid: (b,) bool, False on padding and skipped images.

  Returns:
    top1: (T,) int32, the valid examples whose argmax at step t is the
      label (ties: the first maximum, as `jnp.argmax`).
    top5: (T,) int32, the valid examples whose label has fewer than 5
      strictly larger logits at step t.
    last_pred: (b,) int32 top-1 class after the last glimpse.
  """
  labels = labels.astype(jnp.int32)
  correct1 = loss.correct_at_steps(logits, labels)  # (b, T)
  label_logit = jnp.take_along_axis(
      logits, jnp.broadcast_to(labels[:, None, None], (*logits.shape[:2], 1)),
      axis=-1)
  rank = jnp.sum(logits > label_logit, axis=-1)  # (b, T)
  weight = valid[:, None]
  return {
      "top1": jnp.sum(correct1 & weight, axis=0, dtype=jnp.int32),
      "top5": jnp.sum((rank < 5) & weight, axis=0, dtype=jnp.int32),
      "last_pred": jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32),
  }


def _eval_step(graphdef, state, canvases, positions, labels, valid):
  """canvases (b, S, S, 3) u8, positions (b, T, 2) i32, labels (b,) i32,
  valid (b,) bool -> `score_logits` of the model's logits."""
  model = nnx.merge(graphdef, state)
  patches = glimpse.extract_patches_jax(canvases, positions)  # (b, T, 768) u8
  logits = model(patches, positions)
  return score_logits(logits, labels, valid)


@functools.lru_cache(maxsize=8)
def _jitted_step(graphdef, out_sharding):
  # One jitted step per model structure, so that runners of equal models
  # (several evaluations in one process) share compilations.
  return jax.jit(functools.partial(_eval_step, graphdef), out_shardings=out_sharding)


class DeviceRunner:
  """The jitted evaluation step, data-parallel over the local devices.

  Works with any nnx module `model(patches (b, T, 768) uint8, positions
  (b, T, 2) int32) -> logits (b, T, K)`.
  """

  def __init__(self, model: nnx.Module, batch_size: int,
               num_classes: int | None = None):
    self.num_classes = num_classes  # Labels are checked against it.
    devices = jax.local_devices()
    count = len(devices) if batch_size % len(devices) == 0 else 1
    if count < len(devices):
      logging.warning("batch size %d does not divide over %d devices: "
                      "using one", batch_size, len(devices))
    self.mesh = jax.sharding.Mesh(np.array(devices[:count]), ("data",))
    spec = jax.sharding.PartitionSpec
    self.batch_sharding = jax.sharding.NamedSharding(self.mesh, spec("data"))
    replicated = jax.sharding.NamedSharding(self.mesh, spec())
    graphdef, state = nnx.split(model)
    self.state = jax.device_put(state, replicated)
    self.batch_size = batch_size
    self._copy_host = devices[0].platform == "cpu"
    self._step = _jitted_step(graphdef, replicated)

  def put(self, canvases, positions, labels, valid) -> tuple:
    """Host arrays -> device arrays; returns once the copy is done, so the
    host buffers may be reused."""
    if self._copy_host:
      # The CPU backend may alias host memory instead of copying it.
      canvases, positions = np.array(canvases), np.array(positions)
    arrays = jax.device_put((canvases, positions, np.asarray(labels),
                             np.asarray(valid)), self.batch_sharding)
    jax.block_until_ready(arrays)
    return arrays

  def run(self, arrays) -> dict[str, jax.Array]:
    """Dispatches one step (asynchronous)."""
    # The mesh lets the Pallas SSD kernel split over the batch (ssd.py).
    with jax.set_mesh(self.mesh):
      return self._step(self.state, *arrays)

  def warm_up(self, setting: Setting) -> float:
    """Compiles the step for a setting's shapes; returns seconds taken."""
    start = time.perf_counter()
    b, s, t = self.batch_size, setting.canvas_size, setting.num_glimpses
    arrays = self.put(np.zeros((b, s, s, 3), np.uint8), np.zeros((b, t, 2), np.int32),
                      np.zeros((b,), np.int32), np.zeros((b,), bool))
    jax.block_until_ready(self.run(arrays))
    return time.perf_counter() - start


# ------------------------------------------------------------------ results


@dataclasses.dataclass
class SettingResult:
  """Accuracy of one setting.

  Attributes:
    setting: what was evaluated.
    num_examples: images counted.
    num_skipped: unreadable images left out.
    top1_curve: (T,) float accuracy after t + 1 glimpses.
    top5_curve: (T,) float.
    predictions: (N,) int32 top-1 class after the last glimpse (-1 where
      skipped), in dataset order.
    labels: (N,) int32.
    seconds: wall time of the setting, compilation included.
    images_per_second: after the first batch (compilation excluded).
    counts: the raw counts behind the accuracies.
  """
  setting: Setting
  num_examples: int
  num_skipped: int
  top1_curve: np.ndarray
  top5_curve: np.ndarray
  predictions: np.ndarray
  labels: np.ndarray
  seconds: float
  images_per_second: float
  counts: Any = None

  def top1_at(self, glimpses: int) -> float:
    return float(self.top1_curve[glimpses - 1])

  def top5_at(self, glimpses: int) -> float:
    return float(self.top5_curve[glimpses - 1])


def _check_labels(source, num_classes: int):
  known = getattr(source, "num_classes", None)
  if known is not None and known > num_classes:
    raise DataError(f"the dataset has {known} classes but the model only "
                    f"{num_classes}")


@dataclasses.dataclass
class _Counts:
  """What one process accumulates for a setting: top1/top5 (T,) int64
  correct counts, predictions/labels (N,) int32 (-1 where not seen here),
  counted (valid images), skipped (unreadable ones)."""
  top1: np.ndarray
  top5: np.ndarray
  predictions: np.ndarray
  labels: np.ndarray
  counted: int = 0
  skipped: int = 0

  @classmethod
  def zeros(cls, num: int, num_glimpses: int) -> "_Counts":
    return cls(np.zeros(num_glimpses, np.int64), np.zeros(num_glimpses, np.int64),
               np.full(num, -1, np.int32), np.full(num, -1, np.int32))


def combine_counts(parts: Sequence[_Counts]) -> _Counts:
  """Merges the counts of disjoint shards of one setting: sums, and for
  the per-example arrays the one shard that saw each example (others -1)."""
  return _Counts(
      top1=np.sum([p.top1 for p in parts], axis=0),
      top5=np.sum([p.top5 for p in parts], axis=0),
      predictions=np.max([p.predictions for p in parts], axis=0),
      labels=np.max([p.labels for p in parts], axis=0),
      counted=sum(p.counted for p in parts), skipped=sum(p.skipped for p in parts))


def _gather_processes(counts: _Counts) -> _Counts:
  """Every process's counts, combined (a collective: all processes call it)."""
  arrays = multihost_utils.process_allgather(
      (counts.top1, counts.top5, counts.predictions, counts.labels,
       np.array([counts.counted, counts.skipped], np.int64)), tiled=False)
  top1, top5, preds, labels, scalars = (np.asarray(a) for a in arrays)
  parts = [_Counts(top1[i], top5[i], preds[i], labels[i], int(scalars[i, 0]),
                   int(scalars[i, 1])) for i in range(top1.shape[0])]
  return combine_counts(parts)


def evaluate_setting(runner: DeviceRunner, pool: WorkerPool, source,
                     setting: Setting, config: EvalConfig,
                     progress: progress_lib.Progress | None = None, *,
                     shard: tuple[int, int] | None = None) -> SettingResult:
  """Evaluates one setting over the whole source.

  Pipeline: worker slots filled `config.slots - 1` batches ahead; each
  ready batch is copied to the device (overlapping the previous batch's
  compute), its step dispatched, then the previous step's small outputs
  read back.

  Several processes (multi-host JAX) split the batches round-robin, each on
  its local devices, and combine their counts at the end; every process
  returns the whole result.

  Args:
    runner: the device step.
    pool: the host workers.
    source: the records.
    setting: what to evaluate.
    config: batch size, seed, limits.
    progress: status line, or None.
    shard: (index, count) of this process among those splitting the work;
      None: (jax.process_index(), jax.process_count()), counts gathered
      from all processes. An explicit shard returns this shard's counts
      only (for `combine_counts`).

  Returns:
    The setting's result (its `counts` field holds the raw counts).

  Raises:
    DataError: an unreadable image (unless skipped) or a label out of range.
  """
  start = time.perf_counter()
  gather = shard is None
  shard_index, num_shards = shard or (jax.process_index(), jax.process_count())
  num = len(source) if config.max_examples is None else min(
      len(source), config.max_examples)
  b = config.batch_size
  my_batches = list(range(shard_index, -(-num // b), num_shards))
  counts = _Counts.zeros(num, setting.num_glimpses)
  images_done = 0
  first_done = None
  batches = _HostBatches.create(config.slots, b, setting,
                                shared=pool.num_workers > 0)
  pending: collections.deque = collections.deque()

  def submit(position):
    batch_index = my_batches[position]
    lo = batch_index * b
    indices = range(lo, min(lo + b, num))
    slot = position % config.slots
    pending.append((batch_index, slot, len(indices),
                    pool.submit(batches, setting, config.seed, slot, indices,
                                config.skip_bad_images)))

  def collect(item):
    nonlocal images_done, first_done
    batch_index, count, valid_host, labels_host, out = item
    out = jax.device_get(out)
    counts.top1 += out["top1"]
    counts.top5 += out["top5"]
    lo = batch_index * b
    pred = np.where(valid_host[:count], out["last_pred"][:count], -1)
    counts.predictions[lo:lo + count] = pred
    counts.labels[lo:lo + count] = labels_host[:count]
    counts.counted += int(valid_host[:count].sum())
    images_done += count
    if first_done is None:
      first_done = (time.perf_counter(), images_done)
    if progress is not None:
      mine = min(num, len(my_batches) * b)
      progress.update(count, setting.label(), images_done, mine,
                      force=batch_index == my_batches[-1])

  try:
    next_position = 0
    while next_position < min(config.slots - 1, len(my_batches)):
      submit(next_position)
      next_position += 1
    in_flight = None
    while pending:
      batch_index, slot, count, futures = pending.popleft()
      try:
        counts.skipped += sum(f.result() for f in futures)
      except (sources.BadImageError, WorkerError) as e:
        if isinstance(e, WorkerError) and not e.bad_image:
          raise DataError(f"a data worker failed: {e}") from e
        raise DataError(f"unreadable image {e} (pass --skip-bad-images to "
                        "leave such images out)") from e
      except concurrent.futures.process.BrokenProcessPool as e:
        raise EvalError("a data worker process died without an error "
                        "message (killed, e.g. out of memory: try fewer "
                        "--workers or a smaller --batch-size)") from e
      valid = batches.ok[slot].astype(bool)
      valid[count:] = False  # Padding rows keep stale data; mask them.
      labels_host = batches.labels[slot].copy()
      if runner.num_classes is not None and valid.any() and (
          labels_host[valid].max() >= runner.num_classes):
        raise DataError(f"label {labels_host[valid].max()} is out of range "
                        f"for a model of {runner.num_classes} classes")
      arrays = runner.put(batches.canvases[slot], batches.positions[slot],
                          labels_host, valid)
      # The slot is free again once its data is on the device.
      if next_position < len(my_batches):
        submit(next_position)
        next_position += 1
      out = runner.run(arrays)
      if in_flight is not None:
        collect(in_flight)
      in_flight = (batch_index, count, valid, labels_host, out)
    if in_flight is not None:
      collect(in_flight)
  finally:
    for *_, futures in pending:
      for f in futures:
        f.cancel()
    for *_, futures in pending:
      concurrent.futures.wait(futures)
    batches.close()
  end = time.perf_counter()
  rate = 0.0
  if first_done is not None and images_done > first_done[1] and end > first_done[0]:
    rate = (images_done - first_done[1]) / (end - first_done[0])
  if gather and num_shards > 1:
    counts = _gather_processes(counts)
    rate *= num_shards  # Every process runs at about the same pace.
  return result_from_counts(setting, counts, seconds=end - start,
                            images_per_second=rate)


def result_from_counts(setting: Setting, counts: _Counts, seconds: float = 0.0,
                       images_per_second: float = 0.0) -> SettingResult:
  """A `SettingResult` (accuracies over the counted images) from counts."""
  denom = max(counts.counted, 1)
  return SettingResult(
      setting=setting, num_examples=counts.counted, num_skipped=counts.skipped,
      top1_curve=counts.top1 / denom, top5_curve=counts.top5 / denom,
      predictions=counts.predictions, labels=counts.labels, seconds=seconds,
      images_per_second=images_per_second, counts=counts)


def select_examples(source, config: EvalConfig):
  """The examples an evaluation covers: all, or with `max_examples` a
  class-stratified subset drawn with `config.seed` (`stratified_subset`).

  Returns:
    `source` itself, or a `SubsetSource` whose description says what was
    drawn.
  """
  if config.max_examples is None or config.max_examples >= len(source):
    return source
  labels = record_labels(source)
  indices = stratified_subset(labels, config.max_examples, config.seed)
  per_class = np.bincount(labels[indices])
  per_class = per_class[per_class > 0]
  spread = (f"{per_class.min()}" if per_class.min() == per_class.max()
            else f"{per_class.min()}-{per_class.max()}")
  description = (f"{getattr(source, 'description', source)}: "
                 f"{len(indices)} drawn with seed {config.seed}, {spread} per "
                 f"class of {len(per_class)}")
  return SubsetSource(source, indices, description)


def evaluate(model: nnx.Module, source, config: EvalConfig,
             progress_stream=None) -> list[SettingResult]:
  """Evaluates every setting of `config` on `source`.

  Args:
    model: `model(patches (b, T, 768) u8, positions (b, T, 2)) -> (b, T, K)`.
    source: from `open_source` (or any `len` / `[i]` record source).
    config: the settings and the pipeline's sizes; with `max_examples` the
      examples are a class-stratified subset (`select_examples`), and
      results' `predictions` / `labels` follow its order.
    progress_stream: where the progress line goes (stderr by default;
      False for none).

  Returns:
    One `SettingResult` per `config.settings()`, in that order.
  """
  source = select_examples(source, config)
  num_classes = getattr(getattr(model, "config", None), "num_classes", None)
  if num_classes is not None:
    _check_labels(source, num_classes)
  num = len(source) if config.max_examples is None else min(
      len(source), config.max_examples)
  if num == 0:
    raise DataError("the dataset is empty")
  runner = DeviceRunner(model, config.batch_size, num_classes)
  settings = config.settings()
  progress = None
  if progress_stream is not False:
    # Each process (multi-host) evaluates about 1/P of the images.
    progress = progress_lib.Progress(-(-num // jax.process_count()) * len(settings),
                        progress_stream)
  results = []
  with WorkerPool(source, config.num_workers) as pool:
    for setting in settings:
      results.append(evaluate_setting(runner, pool, source, setting, config,
                                      progress))
  if progress is not None:
    progress.finish()
  return results


# ------------------------------------------------------------------ reports


def results_to_json(results: Sequence[SettingResult], config: EvalConfig,
                    meta: Mapping[str, Any]) -> dict[str, Any]:
  """A JSON-ready report.

  Layout: {"meta": {...}, "config": {...}, "results": [{"canvas_size",
  "resize", "scan", "num_glimpses", "num_examples", "num_skipped",
  "top1": {g: acc}, "top5": {g: acc}, "top1_curve": [T floats],
  "top5_curve": [...], "seconds", "images_per_second"}]}; accuracies are
  fractions in [0, 1], keys of "top1"/"top5" the glimpse counts as strings.
  """
  counts = sorted(set(config.glimpse_counts))
  out = []
  for r in results:
    out.append({
        **dataclasses.asdict(r.setting),
        "num_examples": r.num_examples,
        "num_skipped": r.num_skipped,
        "top1": {str(g): round(r.top1_at(g), 6) for g in counts},
        "top5": {str(g): round(r.top5_at(g), 6) for g in counts},
        "top1_curve": [round(float(x), 6) for x in r.top1_curve],
        "top5_curve": [round(float(x), 6) for x in r.top5_curve],
        "seconds": round(r.seconds, 3),
        "images_per_second": round(r.images_per_second, 2),
    })
  cfg = dataclasses.asdict(config)
  return {"meta": dict(meta), "config": cfg, "results": out}


def markdown_report(report: Mapping[str, Any]) -> str:
  """Markdown tables from `results_to_json`'s report: top-1 / top-5 (%) per
  (scan, resize, glimpses) row and canvas-size column, as the paper's."""
  meta, results = report["meta"], report["results"]
  sizes = sorted({r["canvas_size"] for r in results})
  lines = ["# MambaEye evaluation", ""]
  for key, value in meta.items():
    lines.append(f"- {key}: {value}")
  lines.append("")
  for metric in ("top1", "top5"):
    lines += [f"## {'Top-1' if metric == 'top1' else 'Top-5'} accuracy (%)", "",
              "| scan | resize | glimpses | " + " | ".join(map(str, sizes)) + " |",
              "|---|---|---|" + "---|" * len(sizes)]
    rows = {}
    for r in results:
      for g, acc in r[metric].items():
        rows.setdefault((r["scan"], r["resize"], int(g)), {})[r["canvas_size"]] = acc
    for (scan, resize, g), by_size in rows.items():
      cells = [f"{100 * by_size[s]:.2f}" if s in by_size else "" for s in sizes]
      lines.append(f"| {scan} | {resize} | {g} | " + " | ".join(cells) + " |")
    lines.append("")
  # "wall s" is the whole setting, its compilation and first batch
  # included; "images/s" is measured after the first batch, so excludes it.
  lines += ["## Runs", "", "| scan | resize | canvas | images | skipped | "
            "wall s (incl. compile) | images/s (excl. compile) |",
            "|---|---|---|---|---|---|---|"]
  for r in results:
    lines.append(f"| {r['scan']} | {r['resize']} | {r['canvas_size']} | "
                 f"{r['num_examples']} | {r['num_skipped']} | {r['seconds']:.1f} | "
                 f"{r['images_per_second']:.1f} |")
  return "\n".join(lines) + "\n"


def write_reports(results: Sequence[SettingResult], config: EvalConfig,
                  meta: Mapping[str, Any], output_dir: str,
                  plots: bool = True) -> dict[str, str]:
  """Writes results.json, results.md and the PNG plots into output_dir.

  Returns:
    {"json": path, "markdown": path, "resolution_plot": path,
    "glimpses_plot": path} (plots left out when `plots` is False or
    matplotlib, the "plots" extra, is not installed).
  """
  os.makedirs(output_dir, exist_ok=True)
  report = results_to_json(results, config, meta)
  paths = {"json": os.path.join(output_dir, "results.json"),
           "markdown": os.path.join(output_dir, "results.md")}
  with open(paths["json"], "w") as f:
    json.dump(report, f, indent=1)
  with open(paths["markdown"], "w") as f:
    f.write(markdown_report(report))
  if plots and not plots_lib.available():
    logging.warning("no PNG plots: matplotlib is not installed "
                    "(pip install 'mambaeye-jax[plots]')")
  elif plots:
    paths["resolution_plot"] = plots_lib.accuracy_vs_resolution(
        report, os.path.join(output_dir, "accuracy_vs_resolution.png"))
    paths["glimpses_plot"] = plots_lib.accuracy_vs_glimpses(
        report, os.path.join(output_dir, "accuracy_vs_glimpses.png"))
  return paths


# ------------------------------------------------------------------ one image


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
                   top_k: int = 5) -> ImagePrediction:
  """Classifies one image file as the official single-image mode does.

  With resize "none" the canvas is the image's longer side (canvas_size is
  ignored); "fit" / "full" resize the original straight to the canvas.

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
      scan=scan, num_glimpses=num_glimpses, seed=seed, index=0, shrink_first=False)
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
