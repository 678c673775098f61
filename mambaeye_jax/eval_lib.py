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

The host side (settings, worker processes, shared-memory batches) is
`eval_workers`; reports are `eval_reports`; the single-image mode is
`eval_image`; datasets come from `eval_data.open_source`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from mambaeye_jax import checkpoint
from mambaeye_jax import eval_data
from mambaeye_jax import eval_reports
from mambaeye_jax import eval_workers
from mambaeye_jax import glimpse
from mambaeye_jax import loss
from mambaeye_jax import model_dir
from mambaeye_jax import progress as progress_lib
from mambaeye_jax import work_dir
from mambaeye_jax.data import eval_transforms
from mambaeye_jax.data import geometry
from mambaeye_jax.data import scan_patterns
from mambaeye_jax.data import sources
from mambaeye_jax.eval_data import CheckpointError
from mambaeye_jax.eval_data import DataError
from mambaeye_jax.eval_data import EvalError
from mambaeye_jax.eval_data import SubsetSource
from mambaeye_jax.eval_data import record_labels
from mambaeye_jax.eval_data import stratified_subset

# The library API of docs/evaluation.md in one import: load_eval_model,
# open_source, EvalConfig, evaluate, write_reports.
open_source = eval_data.open_source
write_reports = eval_reports.write_reports

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
    resampler: "fast" (OpenCV) or "reference" (PIL LANCZOS, the official
      pixels): how canvases are resampled (`data.eval_transforms`).
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
  resampler: str = "fast"

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
    eval_transforms.check_resampler(self.resampler)
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

  def settings(self) -> list[eval_workers.Setting]:
    """Every (canvas, resize, scan) combination, canvas sizes outermost."""
    return [eval_workers.Setting(s, r, p, self.num_glimpses, self.resampler)
            for s in self.canvas_sizes for r in self.resize_modes for p in self.scan_patterns]


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

  def warm_up(self, setting: eval_workers.Setting) -> float:
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
  setting: eval_workers.Setting
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


def evaluate_setting(runner: DeviceRunner, pool: eval_workers.WorkerPool, source,
                     setting: eval_workers.Setting, config: EvalConfig,
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
  tally = _Tally(_Counts.zeros(num, setting.num_glimpses), b, progress, setting.label(),
                 total=min(num, len(my_batches) * b),
                 last_batch=my_batches[-1] if my_batches else -1)
  ring = eval_workers.BatchRing(pool, setting, config.seed, config.slots, b,
                                config.skip_bad_images)
  ahead = iter(my_batches)

  def submit_next():
    batch_index = next(ahead, None)
    if batch_index is not None:
      lo = batch_index * b
      ring.submit(batch_index, range(lo, min(lo + b, num)))

  try:
    for _ in range(min(config.slots - 1, len(my_batches))):
      submit_next()
    in_flight = None
    while ring:
      batch_index, slot, count, skipped = _next_ready(ring)
      tally.counts.skipped += skipped
      batches = ring.batches
      valid = batches.ok[slot].astype(bool)
      valid[count:] = False  # Padding rows keep stale data; mask them.
      labels_host = batches.labels[slot].copy()
      if runner.num_classes is not None and valid.any() and (
          labels_host[valid].max() >= runner.num_classes):
        raise DataError(f"label {labels_host[valid].max()} is out of range "
                        f"for a model of {runner.num_classes} classes")
      arrays = runner.put(batches.canvases[slot], batches.positions[slot],
                          labels_host, valid)
      submit_next()  # The slot is free again once its data is on the device.
      out = runner.run(arrays)
      if in_flight is not None:
        tally.add(*in_flight)
      in_flight = (batch_index, count, valid, labels_host, out)
    if in_flight is not None:
      tally.add(*in_flight)
  finally:
    ring.close()
  end = time.perf_counter()
  counts, rate = tally.counts, tally.images_per_second(end)
  if gather and num_shards > 1:
    counts = _gather_processes(counts)
    rate *= num_shards  # Every process runs at about the same pace.
  return result_from_counts(setting, counts, seconds=end - start,
                            images_per_second=rate)


def _next_ready(ring: eval_workers.BatchRing) -> tuple[int, int, int, int]:
  """`ring.next_ready()`, with the workers' failures as one-line errors."""
  try:
    return ring.next_ready()
  except (sources.BadImageError, eval_workers.WorkerError) as e:
    if isinstance(e, eval_workers.WorkerError) and not e.bad_image:
      raise DataError(f"a data worker failed: {e}") from e
    raise DataError(f"unreadable image {e} (pass --skip-bad-images to "
                    "leave such images out)") from e
  except concurrent.futures.process.BrokenProcessPool as e:
    raise EvalError("a data worker process died without an error "
                    "message (killed, e.g. out of memory: try fewer "
                    "--workers or a smaller --batch-size)") from e


class _Tally:
  """Adds each batch's device outputs into the setting's counts, moves the
  progress line and measures the rate after the first batch (which
  includes compilation)."""

  def __init__(self, counts: _Counts, batch_size: int, progress, label: str, total: int,
               last_batch: int):
    self.counts = counts
    self._b = batch_size
    self._progress = progress
    self._label = label
    self._total = total
    self._last_batch = last_batch
    self._done = 0
    self._first = None  # (time, images) when the first batch was counted.

  def add(self, batch_index: int, count: int, valid_host: np.ndarray,
          labels_host: np.ndarray, out) -> None:
    out = jax.device_get(out)
    counts = self.counts
    counts.top1 += out["top1"]
    counts.top5 += out["top5"]
    lo = batch_index * self._b
    pred = np.where(valid_host[:count], out["last_pred"][:count], -1)
    counts.predictions[lo:lo + count] = pred
    counts.labels[lo:lo + count] = labels_host[:count]
    counts.counted += int(valid_host[:count].sum())
    self._done += count
    if self._first is None:
      self._first = (time.perf_counter(), self._done)
    if self._progress is not None:
      self._progress.update(count, self._label, self._done, self._total,
                            force=batch_index == self._last_batch)

  def images_per_second(self, end: float) -> float:
    if self._first is None or self._done <= self._first[1] or end <= self._first[0]:
      return 0.0
    return (self._done - self._first[1]) / (end - self._first[0])


def result_from_counts(setting: eval_workers.Setting, counts: _Counts, seconds: float = 0.0,
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
             progress_stream=None,
             on_setting_done: Callable[[list[SettingResult]], None] | None = None
             ) -> list[SettingResult]:
  """Evaluates every setting of `config` on `source`.

  Args:
    model: `model(patches (b, T, 768) u8, positions (b, T, 2)) -> (b, T, K)`.
    source: from `open_source` (or any `len` / `[i]` record source).
    config: the settings and the pipeline's sizes; with `max_examples` the
      examples are a class-stratified subset (`select_examples`), and
      results' `predictions` / `labels` follow its order.
    progress_stream: where the progress line goes (stderr by default;
      False for none).
    on_setting_done: called with the results so far after each setting but
      the last (eval.py writes them, so a long grid that is stopped keeps
      what it scored).

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
  with eval_workers.WorkerPool(source, config.num_workers) as pool:
    for setting in settings:
      results.append(evaluate_setting(runner, pool, source, setting, config,
                                      progress))
      if on_setting_done is not None and len(results) < len(settings):
        on_setting_done(list(results))
  if progress is not None:
    progress.finish()
  return results


