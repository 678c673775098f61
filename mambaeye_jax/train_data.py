"""Training batches: the source and pipeline of a config, and the prefetcher.

`make_train_iterator` builds the Grain pipeline for a config (or, for
data.source "fake", `FakeBatches`: random batches of the contract without
any input, for tests and benchmarks); `BatchPrefetcher` moves the next
batches to the devices on a thread while the step runs.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from typing import Iterator

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from mambaeye_jax import device_augment
from mambaeye_jax import model as model_lib
from mambaeye_jax import sharding as sharding_lib
from mambaeye_jax.data import pipeline


# What the train step reads; a batch has "patches", or (DataConfig.ship
# "canvas") "canvas", or (ship "source") "source" and "plan"
# (train_step.batch_patches).
BATCH_KEYS = ("patches", "canvas", "source", "plan", "positions", "ratio", "labels", "mask",
              "segment_ids")


class FakeBatches:
  """A tiny deterministic batch source with the pipeline's batch contract.

  For tests and the "fake" source: batch i is a pure function of (seed,
  process index, i), labels are random, and every patch carries a faint
  label-dependent brightness so a model can learn. Checkpointable like a
  Grain iterator (get_state / set_state).

  Yields dicts of host arrays: patches (b_local, T, 768) uint8 (ship
  "canvas": canvas (b_local, canvas, canvas, 3) uint8 instead), positions
  (b_local, T, 2) int32, ratio (b_local, T) f32, labels (b_local, T) int32,
  mask (b_local, T) bool, segment_ids (b_local, T) int32.
  """

  def __init__(self, batch_size: int, num_glimpses: int, num_classes: int,
               seed: int = 0, process_index: int = 0, canvas: int = 64,
               ship: str = "patches"):
    pipeline.check_ship(ship)
    if ship == "source":
      raise ValueError("the fake source has no images to plan: ship='source' needs a real "
                       "source (data.source folder, tfds, arrayrecord or synthetic)")
    self.batch_size = batch_size
    self.num_glimpses = num_glimpses
    self.num_classes = num_classes
    self.seed = seed
    self.process_index = process_index
    self.canvas = canvas
    self.ship = ship
    self.index = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    rng = np.random.default_rng((self.seed, self.process_index, self.index))
    self.index += 1
    b, t = self.batch_size, self.num_glimpses
    labels = rng.integers(0, self.num_classes, size=(b,), dtype=np.int32)
    level = (labels * (200 // max(self.num_classes, 1)) + 20).astype(np.int32)
    pixel_shape = ((self.canvas, self.canvas, 3) if self.ship == "canvas" else (t, 768))
    noise = rng.integers(-20, 21, size=(b, *pixel_shape), dtype=np.int32)
    pixels = np.clip(level.reshape(b, *[1] * len(pixel_shape)) + noise, 0, 255)
    positions = rng.integers(0, self.canvas - 16, size=(b, t, 2), dtype=np.int32)
    ratio = np.broadcast_to(np.linspace(0.05, 1.0, t, dtype=np.float32), (b, t))
    return {
        self.ship: pixels.astype(np.uint8),
        "positions": positions,
        "ratio": np.ascontiguousarray(ratio),
        "labels": np.repeat(labels[:, None], t, axis=1),
        "mask": np.ones((b, t), bool),
        "segment_ids": np.ones((b, t), np.int32),
    }

  def get_state(self) -> bytes:
    return json.dumps({"index": self.index}).encode()

  def set_state(self, state: bytes) -> None:
    self.index = int(json.loads(state.decode())["index"])

  def start_prefetch(self) -> None:  # Grain's checkpoint handler calls this.
    pass


def device_renderer(config: ml_collections.ConfigDict):
  """The train step's canvas renderer for ship "source" (else None)."""
  if config.data.ship != "source":
    return None
  return device_augment.renderer(config.data.canvas_max, config.data.augment.blur_kernel,
                                 config.data.augment.perspective_distortion)


def data_config_from(config: ml_collections.ConfigDict, local_batch_size: int):
  """The pipeline's DataConfig for this process (None for the fake source)."""
  fields = config.data.to_dict()
  if fields["source"] == "fake":
    return None
  return pipeline.DataConfig.from_any(fields, batch_size=local_batch_size,
                                      seed=config.seed, num_epochs=0)


def make_source(config: ml_collections.ConfigDict):
  """The configured random-access source (None for "fake"), built once.

  Listing a folder or opening TFDS, and decoding it all with cache_decoded,
  takes time: train_lib.train_and_evaluate builds it once for its length, its class
  count and the iterator.
  """
  data_config = data_config_from(config, 1)
  if data_config is None:
    return None
  return pipeline.make_source(data_config)


def num_train_examples(config: ml_collections.ConfigDict, source=None) -> int:
  """Images per epoch, for epoch-based schedules (`source`: make_source's)."""
  if config.train_examples > 0:
    return int(config.train_examples)
  if config.data.source in ("fake", "synthetic"):
    return int(config.data.synthetic_size)
  return len(make_source(config) if source is None else source)


def check_num_classes(source, model_config: model_lib.ModelConfig) -> None:
  """Refuses a source with more classes than the model has outputs.

  Labels beyond num_classes would otherwise surface only as a NaN loss.
  Fewer classes are fine (e.g. 10 folders on a 1000-way model).
  """
  have = getattr(source, "num_classes", None)
  if have is None or have <= model_config.num_classes:
    return
  where = getattr(source, "root", None) or getattr(source, "paths", None) or repr(source)
  if isinstance(where, list):
    where = where[0] if len(where) == 1 else f"{where[0]} (+{len(where) - 1} shards)"
  raise ValueError(f"{have} classes in {where} but model.num_classes is "
                   f"{model_config.num_classes}; set --config.model.num_classes={have}")


def check_labels(local_batch: dict, num_classes: int, step: int) -> None:
  """Refuses labels outside [0, num_classes) (sources without a class count)."""
  labels = local_batch["labels"][np.asarray(local_batch["mask"], bool)]
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    bad = int(labels.max() if labels.max() >= num_classes else labels.min())
    raise ValueError(f"label {bad} in the batch of step {step} is outside model.num_classes="
                     f"{num_classes} (labels must be 0..{num_classes - 1})")


def make_train_iterator(config: ml_collections.ConfigDict, local_batch_size: int,
                        model_config: model_lib.ModelConfig, source=None) -> Iterator[dict]:
  """This process's batches, (b_local, T, ...) host arrays (see FakeBatches).

  The returned object has get_state / set_state (for the checkpoint) and,
  from the real pipeline, `num_skipped` (bad records left out). `source`:
  make_source's, to reuse it (built here when None).
  """
  data_config = data_config_from(config, local_batch_size)
  if data_config is None:
    return FakeBatches(local_batch_size, config.data.num_glimpses, model_config.num_classes,
                       seed=config.seed, process_index=jax.process_index(),
                       ship=config.data.ship)
  return pipeline.make_train_iterator(data_config, data_source=source)


def pipeline_stats(iterator) -> dict[str, float]:
  """Skip counters of the pipeline, cumulative, summed over processes.

  Collective when there are several processes: all call it at the same step.
  """
  skipped = getattr(iterator, "num_skipped", None)
  if skipped is None:
    return {}
  if jax.process_count() > 1:
    skipped = multihost_utils.process_allgather(np.int64(skipped)).sum()
  return {"data/num_skipped": int(skipped)}


class BatchPrefetcher:
  """Reads batches and places them on the mesh ahead of the loop.

  With depth > 0 a background thread keeps up to `depth` global batches
  ready, so reading, host-to-device copies and the step overlap. Each batch
  travels with the iterator's state just after it was read: `get_state()`
  returns the position after the last batch the loop took, not the last one
  read ahead, so a checkpoint resumes exactly there. Saved through Grain's
  checkpoint handler (`get_state` returns JSON bytes, the same file Grain
  writes for its own iterators); restore the underlying iterator instead,
  before building the prefetcher.

  `next(prefetcher)` -> (local, batch): this process's host rows (b_local, ...)
  and the global arrays (b, ...) sharded over "data".
  """

  _DONE = object()

  def __init__(self, iterator, mesh: jax.sharding.Mesh, depth: int):
    self.iterator = iterator
    self._mesh = mesh
    self._depth = depth
    self._state = iterator.get_state()
    self._queue = queue.Queue(maxsize=max(depth, 1))
    self._stop = threading.Event()
    # Seconds that the batches taken since the last take_timings() spent in
    # next(iterator) and in the host-to-device placement, their count, and
    # how many of them the loop asked for while none was ready: which side
    # of the prefetcher a data wait comes from.
    self._timings = [0.0, 0.0, 0, 0]
    self._thread = None
    if depth > 0:
      self._thread = threading.Thread(target=self._fill, name="batch_prefetch", daemon=True)
      self._thread.start()

  def _read(self):
    t0 = time.perf_counter()
    local = next(self.iterator)
    t1 = time.perf_counter()
    batch = sharding_lib.global_batch({k: local[k] for k in BATCH_KEYS if k in local},
                                      self._mesh)
    return local, batch, self.iterator.get_state(), (t1 - t0, time.perf_counter() - t1)

  def take_timings(self) -> dict[str, float]:
    """Mean ms per batch over the batches taken since the last call.

    Returns:
      perf/batch_read_ms: in next(iterator) (Grain: the workers' batches
        reaching this process), perf/batch_put_ms: placing them on the
        mesh. Wall time of the reading thread, so both include waiting for
        the GIL. perf/batch_not_ready_fraction: of the batches taken, those
        the loop asked for while none was ready (with prefetching; a wait
        for a batch that was ready is the loop's thread waiting for its
        turn, not the pipeline). Empty when no batch was taken.
    """
    read, put, n, not_ready = self._timings
    self._timings = [0.0, 0.0, 0, 0]
    if not n:
      return {}
    return {"perf/batch_read_ms": 1000.0 * read / n, "perf/batch_put_ms": 1000.0 * put / n,
            "perf/batch_not_ready_fraction": not_ready / n}

  def _fill(self):
    while not self._stop.is_set():
      try:
        item = self._read()
      except StopIteration:
        item = self._DONE
      except Exception as e:  # pylint: disable=broad-except
        item = e  # Raised on the loop's thread by __next__.
      while not self._stop.is_set():
        try:
          self._queue.put(item, timeout=0.1)
          break
        except queue.Full:
          continue
      if item is self._DONE or isinstance(item, Exception):
        return

  def __iter__(self):
    return self

  def __next__(self):
    not_ready = False
    if self._thread is None:
      item = self._read()
    else:
      not_ready = self._queue.empty()
      item = self._queue.get()
      if item is self._DONE:
        raise StopIteration
      if isinstance(item, Exception):
        raise item
    local, batch, self._state, (read, put) = item
    t = self._timings
    self._timings = [t[0] + read, t[1] + put, t[2] + 1, t[3] + not_ready]
    return local, batch

  def get_state(self) -> bytes:
    state = self._state
    return state if isinstance(state, bytes) else json.dumps(state, indent=4).encode()

  def start_prefetch(self) -> None:  # Part of Grain's handler protocol.
    pass

  @property
  def num_skipped(self):
    return getattr(self.iterator, "num_skipped", None)

  def close(self) -> None:
    """Stops the thread and Grain's workers and frees the batches read ahead.

    Grain's worker batches live in shared memory, freed when the arrays are;
    batches still queued at exit are what Python reports as "leaked
    shared_memory objects".
    """
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=10)
    while True:
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    close_quietly(self.iterator)  # Stops Grain's worker processes.


def close_quietly(iterator) -> None:
  close = getattr(iterator, "close", None)
  if close is not None:
    try:
      close()
    except Exception:  # pylint: disable=broad-except
      logging.exception("closing the data iterator failed")
