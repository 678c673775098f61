"""The evaluator's host side: worker processes that prepare batches.

Dimension letters: n batch slots, b batch, S canvas side, T glimpses.

For one evaluation `Setting` every record becomes a canvas (S, S, 3) uint8,
corners (T, 2) int32 and a label (`prepare_example`: decode, resize, scan
order; the patches are gathered on the device). `WorkerPool` runs that in
spawned processes writing straight into shared-memory batch slots
(`HostBatches`), or in this process with no workers. Numpy, PIL and OpenCV
only: the workers never import JAX.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import multiprocessing
import os
from multiprocessing import shared_memory
from typing import Any, Mapping, Sequence

import cv2
import numpy as np

from mambaeye_jax.data import eval_transforms
from mambaeye_jax.data import geometry
from mambaeye_jax.data import glimpses
from mambaeye_jax.data import sources


@dataclasses.dataclass(frozen=True)
class Setting:
  """One evaluation setting; every example of it has the same shapes.

  resampler: "fast" or "reference" (`data.eval_transforms.RESAMPLERS`): how
  the canvas pixels are resampled; the geometry is the same either way.
  """
  canvas_size: int
  resize: str
  scan: str
  num_glimpses: int
  resampler: str = "fast"

  def label(self) -> str:
    return f"{self.scan}/{self.resize}/{self.canvas_size}"


def prepare_example(record: Mapping[str, Any], setting: Setting, seed: int,
                    index: int, out: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray, geometry.ImageBox]:
  """One record -> (canvas (S, S, 3) uint8, positions (T, 2) int32, box).

  The canvas is written into `out` (S, S, 3) uint8 when given (a batch row).
  """

  def draft(width: int, height: int):  # The fast resampler's reduced-scale JPEG decoding.
    return eval_transforms.draft_size(width, height, setting.resize, setting.canvas_size,
                                      resampler=setting.resampler)

  canvas, box, positions = glimpses.eval_canvas_and_positions(
      eval_transforms.record_image(record, draft_size=draft,
                                   fast_jpeg=setting.resampler == "fast"),
      canvas_size=setting.canvas_size,
      resize=setting.resize, scan=setting.scan, num_glimpses=setting.num_glimpses, seed=seed,
      index=index, resampler=setting.resampler, out=out)
  return canvas, positions, box


@dataclasses.dataclass
class HostBatches:
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
      _, pos, _ = prepare_example(record, setting, seed, index, out=canvases[slot, row])
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
    positions[slot, row] = pos
    labels[slot, row] = int(record["label"])
    ok[slot, row] = 1
  return bad


_WORKER: dict[str, Any] = {}


def _worker_init(source):
  # Workers only prepare numpy data (this module imports no JAX); should
  # anything import it and start a backend, keep it off the accelerator.
  os.environ["JAX_PLATFORMS"] = "cpu"
  # One thread per worker: the pool already has a process per core, and
  # OpenCV's own thread pool in each would oversubscribe them.
  cv2.setNumThreads(1)
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

  def submit(self, batches: HostBatches, setting: Setting, seed: int,
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


class BatchRing:
  """`slots` host batch buffers, filled ahead by a `WorkerPool`, handed out
  in the order they were started.

  `submit` starts filling the next slot (slot = submissions so far modulo
  `slots`); `next_ready` waits for the oldest and returns (batch index,
  slot, rows, unreadable rows skipped), re-raising a worker's error. The
  caller reads the slot's arrays from `batches` and must be done with them
  before `slots` more submissions reuse it.
  """

  def __init__(self, pool: WorkerPool, setting: Setting, seed: int, slots: int,
               batch_size: int, skip_bad: bool):
    self.batches = HostBatches.create(slots, batch_size, setting,
                                      shared=pool.num_workers > 0)
    self._pool = pool
    self._setting = setting
    self._seed = seed
    self._slots = slots
    self._skip_bad = skip_bad
    self._submitted = 0
    self._pending: collections.deque = collections.deque()

  def submit(self, batch_index: int, indices: Sequence[int]) -> None:
    slot = self._submitted % self._slots
    self._submitted += 1
    self._pending.append((batch_index, slot, len(indices),
                          self._pool.submit(self.batches, self._setting, self._seed, slot,
                                            indices, self._skip_bad)))

  def __bool__(self) -> bool:
    return bool(self._pending)

  def next_ready(self) -> tuple[int, int, int, int]:
    batch_index, slot, count, futures = self._pending.popleft()
    return batch_index, slot, count, sum(f.result() for f in futures)

  def close(self) -> None:
    """Cancels what has not started, waits for the rest, frees the buffers."""
    for *_, futures in self._pending:
      for f in futures:
        f.cancel()
    for *_, futures in self._pending:
      concurrent.futures.wait(futures)
    self._pending.clear()
    self.batches.close()
