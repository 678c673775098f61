"""Grain pipelines from image datasets to batches of glimpse sequences.

    it = make_train_iterator(config)          # infinite unless num_epochs
    batch = next(it)                          # dict of numpy arrays
    it.num_skipped                            # unreadable records so far

Pipeline (per JAX process):

    source -> shard (by process) -> shuffle (per epoch) -> repeat
      -> random_map(decode, transform, glimpses)  [Grain per-record rng]
      -> to_iter_dataset (threads) -> BatchIterDataset (pad or pack)
      -> mp_prefetch (worker processes) -> GlimpseIterator

Batch contract (b = batch_size rows, L = seq_len steps): "patches" (b, L,
768) uint8; "positions" (b, L, 2) int32; "ratio" (b, L) float32; "labels"
(b, L) int32; "mask" (b, L) bool; "segment_ids" (b, L) int32 (see
batching.py). With ship="canvas" (training only), "canvas" (b, S, S, 3)
uint8, S = canvas_max, replaces "patches": the trainer gathers the patches
on the device (`train_step.batch_patches`), identical to the host's. With
ship="source" (training only), "source" (b, s, s, 3) uint8, s = source_side
(the decoded images at the top-left, zeros around), and "plan" (b, P)
float32 (`source_plan`, P = PLAN_SIZE) replace it: the trainer renders the
canvases on the device (`mambaeye_jax.device_augment`), then gathers.
Per-example contract: see glimpses.py.

Determinism: every random choice comes from Grain's per-record generator,
seeded by (config seed, process shard) and the record's position in the
shuffled, repeated stream. Same config, same process count and same
`worker_count` give the same batches, also after restoring the iterator
state (`GlimpseIterator` is a Grain `DatasetIterator`: save it with
`grain.checkpoint.CheckpointSave(it)` / restore with `CheckpointRestore(it)`
in an orbax `CheckpointManager`, or `get_state()` / `set_state()`). The
worker count is part of the stream: restore with the one you saved with.

Bad records (unreadable, corrupt, truncated, non-image, decompression bomb,
unsupported pixel mode; see sources.py): with on_error="skip" (default) they
are logged with their key and reason, left out, and counted in
`GlimpseIterator.num_skipped` (put it in the training metrics); with
on_error="raise" the first one stops the pipeline with a `BadImageError`.
Training stops with `TooManyBadRecordsError` once more than
`max_bad_fraction` of the records read are bad (a folder of unreadable files
would otherwise never fill a batch). Both errors pickle, so they reach the
main process intact from Grain's worker processes.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
from typing import Any, Mapping

import grain
import numpy as np
from absl import flags

try:  # Grain's private pool of shared-memory unlinks (release_shared_memory).
  from grain._src.python.ipc import shared_memory_array
except ImportError:  # Another Grain version: nothing to wait for.
  shared_memory_array = None

from mambaeye_jax.data import arrayrecord
from mambaeye_jax.data import augment
from mambaeye_jax.data import batching
from mambaeye_jax.data import eval_transforms
from mambaeye_jax.data import geometry
from mambaeye_jax.data import glimpses
from mambaeye_jax.data import scan_patterns
from mambaeye_jax.data import source_plan
from mambaeye_jax.data import sources
from mambaeye_jax.data import synthetic

SOURCES = ("folder", "tfds", "arrayrecord", "synthetic")
# What a training batch carries of the pixels (DataConfig.ship).
SHIP_MODES = ("patches", "canvas", "source")


def check_ship(ship: str) -> None:
  """Raises ValueError naming the ship modes when `ship` is not one."""
  if ship not in SHIP_MODES:
    raise ValueError(f"ship={ship!r} must be one of {SHIP_MODES}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Everything a pipeline needs; build with `DataConfig.from_any`.

  Attributes:
    source: "folder" (official layout root/<class>/<image>), "tfds",
      "arrayrecord" (shards of convert_arrayrecord) or "synthetic".
    path: folder root, ArrayRecord shard glob, or TFDS data_dir.
    tfds_name: TFDS dataset name (source "tfds").
    split: TFDS split (source "tfds").
    synthetic_size: number of generated images (source "synthetic").
    batch_size: rows per batch on this process, b.
    num_glimpses: glimpses per sequence, T (the maximum when min_glimpses).
    min_glimpses: > 0 draws T per example uniformly in
      [min_glimpses, num_glimpses]; 0 keeps T = num_glimpses.
    seq_len: steps per batch row, L; 0 means num_glimpses.
    packing: pack several sequences per row (segment ids) instead of one
      padded sequence per row.
    canvas_min, canvas_max: training canvas side range (official 256, 1024;
      e.g. 32, 64 for CIFAR).
    augment: AugmentConfig overrides (field -> value) for training.
    transform_backend: the training transform's resampling, warp, blur and
      hue shift: "opencv" (fast, ~3x less CPU on ImageNet photos) or "pil"
      (the reference path, Pillow's filters); the same plan and geometry,
      statistically equal pixels (augment.BACKENDS, docs/data.md).
    scan_pattern: glimpse order; training default "train" (the official
      sampler), evaluation default "random".
    eval_canvas: evaluation canvas side S; 0 (resize_mode "none" only)
      makes each canvas the image's longer side, no resampling.
    resize_mode: evaluation resize, "none" | "fit" | "full".
    seed: the stream's seed (shuffle and per-record randomness).
    shuffle: shuffle training records (reshuffled every epoch).
    num_epochs: training epochs; 0 repeats forever.
    worker_count: worker processes (grain mp_prefetch); 0 runs in process.
      One core runs ~210 training samples/s at T = 1024, canvas 256..1024
      with the OpenCV backend (~110 with "pil"; benchmarks/bench_data.py),
      so use about as many workers as
      the host has cores to spare for the accelerators' appetite.
    worker_buffer_size: batches buffered per worker (each b x L x 768
      bytes of patches: 50 MB at b = 64, L = 1024).
    read_threads: threads per process running the per-record transform.
    read_buffer_size: records buffered ahead by those threads.
    on_error: "skip" (log, count, leave out) or "raise" for bad records.
    max_bad_fraction: training stops with `sources.TooManyBadRecordsError`
      once more than this fraction of the records read are bad (and more
      than `sources.MIN_BAD_RECORDS_TO_STOP`): a folder of unreadable files
      must not loop forever. Counted per reading process; 1 never stops.
    max_image_pixels: decompression-bomb guard.
    cache_decoded: decode every image of the source once, at the start, into
      one memory-mapped buffer that the workers share
      (`sources.DecodedImageCache`): for datasets that fit in memory (CIFAR:
      154 MB), it saves reading, parsing and decoding each sample (~0.2 ms
      of a core for a CIFAR JPEG). Costs that decode up front (~10 s on one
      core for CIFAR-10) and skips the reduced-scale JPEG decoding, so only
      images that samples shrink below half their size change.
    ship: what training batches carry of the pixels. "patches": the (b, L,
      768) patches, gathered by the workers. "canvas": each row's canvas,
      zero-padded to canvas_max, (b, canvas_max, canvas_max, 3), from which
      the training step gathers the same patches on the device. Canvas is
      smaller when canvas_max^2 * 3 < L * 768 (CIFAR: 12 KB against 98 KB
      per row) and saves the workers the gather and most of the batching and
      transfer. One image per row: not with packing. Evaluation iterators
      always carry patches. "source": the decoded image (zero-padded to
      source_side) and the plan vector (`source_plan`) of each row; the
      workers draw every random choice as in the other modes (the same
      stream, the same positions) but render no pixels: the training step
      renders the canvas on the device (`mambaeye_jax.device_augment`),
      about half the host work per CIFAR sample (docs/data.md). Images must be
      at most source_side a side; one image per row, not with packing.
    source_side: ship "source"'s padded image side s (CIFAR: 32); a larger
      decoded image stops the pipeline with an error naming it.
  """
  source: str = "folder"
  path: str = ""
  tfds_name: str = ""
  split: str = "train"
  synthetic_size: int = 1000
  batch_size: int = 64
  num_glimpses: int = 1024
  min_glimpses: int = 0
  seq_len: int = 0
  packing: bool = False
  canvas_min: int = 256
  canvas_max: int = 1024
  augment: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  transform_backend: str = "opencv"
  scan_pattern: str = ""
  eval_canvas: int = 512
  resize_mode: str = "fit"
  seed: int = 0
  shuffle: bool = True
  num_epochs: int = 0
  worker_count: int = 0
  worker_buffer_size: int = 2
  read_threads: int = 1
  read_buffer_size: int = 16
  on_error: str = "skip"
  max_bad_fraction: float = 0.1
  max_image_pixels: int = sources.DEFAULT_MAX_IMAGE_PIXELS
  cache_decoded: bool = False
  ship: str = "patches"
  source_side: int = 32

  def __post_init__(self):
    if self.source not in SOURCES:
      raise ValueError(f"unknown source {self.source!r}; one of {SOURCES}")
    if self.on_error not in ("skip", "raise"):
      raise ValueError(f"{self.on_error=} must be 'skip' or 'raise'")
    if not 0 <= self.min_glimpses <= self.num_glimpses or \
        self.num_glimpses < 1:
      raise ValueError(f"need 0 <= min_glimpses <= num_glimpses, num_glimpses"
                       f" >= 1; got {self.min_glimpses=}, "
                       f"{self.num_glimpses=}")
    if self.seq_len and self.seq_len < self.num_glimpses:
      raise ValueError(f"{self.seq_len=} must be >= {self.num_glimpses=}")
    if self.batch_size < 1:
      raise ValueError(f"{self.batch_size=} must be >= 1")
    at_least = {"synthetic_size": 1, "worker_count": 0, "worker_buffer_size": 1,
                "read_threads": 1, "read_buffer_size": 1, "max_image_pixels": 1,
                "eval_canvas": 0, "num_epochs": 0}
    for name, low in at_least.items():
      if getattr(self, name) < low:
        raise ValueError(f"{name}={getattr(self, name)} must be >= {low}")
    check_ship(self.ship)
    if self.ship in ("canvas", "source") and self.packing:
      raise ValueError(f"ship={self.ship!r} carries one {self.ship} per batch row, so it "
                       "cannot pack several images per row: set packing=False or "
                       "ship='patches'")
    if self.source_side < 1:
      raise ValueError(f"source_side={self.source_side} must be >= 1")
    if not 0.0 <= self.max_bad_fraction <= 1.0:
      raise ValueError(f"max_bad_fraction={self.max_bad_fraction} must be in [0, 1]")
    try:
      self.augment_config()  # Ranges and probabilities, before any work.
    except TypeError as e:  # An unknown augment field.
      raise ValueError(f"augment: {e}") from e
    augment.check_backend(self.transform_backend)
    if self.scan_pattern:
      scan_patterns.get(self.scan_pattern)  # KeyError lists known names.
    if self.resize_mode not in eval_transforms.RESIZE_MODES:
      raise ValueError(f"{self.resize_mode=} must be one of "
                       f"{eval_transforms.RESIZE_MODES}")
    if not self.eval_canvas and self.resize_mode != "none":
      raise ValueError(f"eval_canvas=0 (the image's own size) needs "
                       f"resize_mode 'none', not {self.resize_mode!r}")

  @property
  def row_length(self) -> int:
    """L: steps per batch row."""
    return self.seq_len or self.num_glimpses

  def augment_config(self) -> augment.AugmentConfig:
    return augment.AugmentConfig(canvas_min=self.canvas_min,
                                 canvas_max=self.canvas_max,
                                 **dict(self.augment))

  @classmethod
  def from_any(cls, config: Any = None, **overrides) -> "DataConfig":
    """From a DataConfig, a mapping, an ml_collections ConfigDict or any
    object with attributes of these names (argparse Namespace), plus
    keyword overrides.

    Raises:
      ValueError: a mapping with keys that are not fields (typos fail
        loudly).
    """
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    if isinstance(config, cls):
      values = dataclasses.asdict(config)
    elif config is not None:
      if hasattr(config, "to_dict"):  # ml_collections.ConfigDict
        config = config.to_dict()
      if isinstance(config, Mapping):
        unknown = set(config) - names
        if unknown:
          raise ValueError(f"unknown data config keys {sorted(unknown)}; "
                           f"known: {sorted(names)}")
        values = dict(config)
      else:
        values = {n: getattr(config, n) for n in names if hasattr(config, n)}
    values.update(overrides)
    return cls(**values)


# ---------------------------------------------------------------- sources


def make_source(cfg: DataConfig):
  """The random-access source named by the config (see sources.py)."""
  if cfg.source == "folder":
    source = sources.ImageFolderSource(cfg.path)
  elif cfg.source == "arrayrecord":
    source = arrayrecord.ArrayRecordSource(cfg.path)
  elif cfg.source == "tfds":
    source = sources.TfdsSource(cfg.tfds_name, cfg.split,
                                data_dir=cfg.path or None)
  else:
    return synthetic.SyntheticShapes(cfg.synthetic_size, seed=cfg.seed)
  if cfg.cache_decoded:
    source = sources.DecodedImageCache(source,
                                       max_pixels=cfg.max_image_pixels)
  return source


class _Skipper:
  """Turns BadImageError into a logged skip marker (or re-raises)."""

  _LOG_FIRST = 20

  def __init__(self, on_error: str):
    self._on_error = on_error
    self._count = 0

  def __call__(self, error: sources.BadImageError) -> dict[str, str]:
    if self._on_error == "raise":
      raise error
    self._count += 1
    if self._count <= self._LOG_FIRST or self._count % 1000 == 0:
      logging.warning("skipping bad record (%d in this process): %s",
                      self._count, error)
    return {batching.SKIP_KEY: str(error)}


def _num_glimpses(rng: np.random.Generator, cfg: DataConfig) -> int:
  if cfg.min_glimpses:
    return int(rng.integers(cfg.min_glimpses, cfg.num_glimpses,
                            endpoint=True))
  return cfg.num_glimpses


class TrainTransform(grain.transforms.RandomMap):
  """Record -> training example (or skip marker), official transform."""

  def __init__(self, cfg: DataConfig):
    self._cfg = cfg
    self._aug = cfg.augment_config()
    self._pattern_name = cfg.scan_pattern or "train"
    scan_patterns.get(self._pattern_name)  # Fails early on a bad name.
    self._skip = _Skipper(cfg.on_error)
    # Records read and bad ones, by this process (each worker has its copy).
    self._seen = 0
    self._bad = 0

  def _too_many_bad(self, error: sources.BadImageError) -> None:
    """Stops a stream of mostly bad records, which would never fill a batch."""
    self._bad += 1
    limit = max(sources.MIN_BAD_RECORDS_TO_STOP, self._cfg.max_bad_fraction * self._seen)
    if self._bad > limit:
      raise sources.TooManyBadRecordsError(self._bad, self._seen, str(error),
                                           self._cfg.max_bad_fraction)

  def random_map(self, record: Mapping[str, Any],
                 rng: np.random.Generator) -> dict[str, Any]:
    key = record.get("key", "<record>")
    params = {}

    def draft(width: int, height: int) -> tuple[int, int]:
      # Plan from the stored size first, so JPEGs decode at reduced scale.
      params.update(augment.plan(rng, width, height, self._aug))
      return params["fit"]

    self._seen += 1
    image = record.get("image")
    if (self._cfg.ship == "source" and isinstance(image, np.ndarray) and image.ndim == 3
        and image.shape[2] == 3 and image.dtype == np.uint8):
      # Decoded RGB (the decoded-image cache): the renderer needs these very
      # pixels, so no PIL round trip (~0.03 ms a CIFAR sample).
      height, width = image.shape[:2]
      return self._source_example(image, augment.plan(rng, width, height, self._aug), rng,
                                  record, key)
    try:
      image = eval_transforms.record_image(
          record, key, max_pixels=self._cfg.max_image_pixels, draft_size=draft)
    except sources.BadImageError as e:
      if self._cfg.on_error == "skip":
        self._too_many_bad(e)
      return self._skip(e)
    if not params:  # Already-decoded records.
      params = augment.plan(rng, *image.size, self._aug)
    if self._cfg.ship == "source":
      return self._source_example(image, params, rng, record, key)
    pixels = augment.apply(image, params, rng, self._aug, self._cfg.transform_backend)
    canvas = params["canvas"]
    box, positions = self._corners(rng, canvas, pixels.shape[:2])
    if self._cfg.ship == "canvas":
      return glimpses.make_canvas_example(pixels, (canvas, canvas), box, positions,
                                          int(record["label"]), self._cfg.canvas_max)
    return glimpses.make_example(pixels, (canvas, canvas), box, positions,
                                 int(record["label"]))

  def _corners(self, rng: np.random.Generator, canvas: int, pixels_hw: tuple[int, int]
               ) -> tuple[geometry.ImageBox, np.ndarray]:
    """The transformed image's centred box on the canvas, and the glimpse
    corners drawn over it (the last draws of a sample, in every ship mode).

    Returns:
      (box, positions (T, 2) int).
    """
    box = augment.centred_box(canvas, pixels_hw)
    return box, scan_patterns.generate(self._pattern_name, rng, (canvas, canvas), box,
                                       _num_glimpses(rng, self._cfg))

  def _source_example(self, image, params: dict[str, Any], rng: np.random.Generator,
                      record: Mapping[str, Any], key: str) -> dict[str, Any]:
    """ship="source": the plan, the erase box and the corners, drawn in the
    order `augment.apply` and `random_map` draw them; no pixels rendered."""
    pixels = np.asarray(image)
    height, width = pixels.shape[:2]
    side = self._cfg.source_side
    if height > side or width > side:
      raise ValueError(f"record {key}: decoded image {width}x{height} is larger than "
                       f"source_side={side} (ship='source' ships each image padded to "
                       "source_side a side): raise data.source_side or use ship='canvas'")
    rw, rh = params["out_size"]
    erase = augment.erase_box(rng, rh, rw, self._aug) if params["erase"] else None
    canvas = params["canvas"]
    box, positions = self._corners(rng, canvas, (rh, rw))
    return glimpses.make_source_example(
        pixels, source_plan.encode_plan(params, erase, (height, width)), (canvas, canvas),
        box, positions, int(record["label"]), side)


class EvalTransform(grain.transforms.Map):
  """Record -> evaluation example: official resize mode and scan pattern.

  Random scan patterns draw from a generator seeded by (seed, the record's
  index in the whole source), so results do not depend on the number of
  processes or workers. A record {"empty": True} (evening out process
  shards) gives an example of length 0, an all-padding row.
  """

  def __init__(self, cfg: DataConfig):
    self._cfg = cfg
    self._pattern_name = cfg.scan_pattern or "random"
    scan_patterns.get(self._pattern_name)
    self._skip = _Skipper(cfg.on_error)

  def map(self, record: Mapping[str, Any]) -> dict[str, Any]:
    if record.get("empty"):
      return glimpses.make_example(
          np.zeros((1, 1, 3), np.uint8), (geometry.PATCH_SIZE,) * 2,
          geometry.ImageBox(0, 0, 1, 1), np.zeros((0, 2), np.int32), 0)
    key = record.get("key", "<record>")
    try:
      image = eval_transforms.record_image(record, key,
                                           max_pixels=self._cfg.max_image_pixels)
    except sources.BadImageError as e:
      return self._skip(e)
    rng = glimpses.example_rng(self._cfg.seed, record["index"])  # As eval.py's.
    canvas, box = eval_transforms.eval_canvas(
        image, self._cfg.resize_mode, self._cfg.eval_canvas or None)
    side = canvas.shape[0]
    positions = scan_patterns.generate(self._pattern_name, rng, (side, side),
                                       box, _num_glimpses(rng, self._cfg))
    pixels = canvas[box.top:box.top + box.height,
                    box.left:box.left + box.width]
    return glimpses.make_example(pixels, (side, side), box, positions,
                                 int(record["label"]))


# ---------------------------------------------------------------- sharding


def _shard(shard_options: grain.sharding.ShardOptions | None
           ) -> tuple[int, int]:
  """(index, count) of this process's shard; default: by JAX process."""
  if shard_options is None:
    shard_options = grain.sharding.ShardByJaxProcess(drop_remainder=True)
  return shard_options.shard_index, shard_options.shard_count


def _seeds(seed: int, shard_index: int) -> tuple[int, int]:
  """Independent (shuffle, transform) seeds per process shard, so that
  record k of every shard does not share its augmentation."""
  state = np.random.SeedSequence([seed, shard_index]).generate_state(2)
  return int(state[0]), int(state[1])


class _EvenShard:
  """Records index, index + count, ... of a source, padded with empty
  records so every process gets ceil(n / count) and the same number of
  batches (multi-host evaluation must not desynchronise)."""

  def __init__(self, source, shard_index: int, shard_count: int):
    self._source = source
    self._shard_index = shard_index
    self._shard_count = shard_count
    self._length = -(-len(source) // shard_count)

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> Mapping[str, Any]:
    global_index = index * self._shard_count + self._shard_index
    if global_index >= len(self._source):
      return {"empty": True}
    return {**self._source[global_index], "index": global_index}


# ---------------------------------------------------------------- iterators


class GlimpseIterator(grain.DatasetIterator):
  """The batches, plus the count of skipped bad records; checkpointable.

  Attributes:
    num_skipped: bad records left out so far on this process (restored with
      the state).
  """

  def __init__(self, parent: grain.DatasetIterator):
    super().__init__(parent)
    self.num_skipped = 0

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._parent)
    self.num_skipped += int(batch.pop(batching.NUM_SKIPPED_KEY))
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"pipeline": self._parent.get_state(),
            "num_skipped": self.num_skipped}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["pipeline"])
    self.num_skipped = int(state["num_skipped"])



def mark_absl_flags_parsed() -> None:
  """Lets Grain's worker processes start in a program not run by absl.app.

  The workers read absl flags (their defaults); a program that does not run
  under absl.app (pytest, a notebook, an argparse command line) never parsed
  them, and the read would fail.
  """
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def row_arrays(cfg: DataConfig) -> dict[str, tuple[tuple[int, ...], Any]]:
  """The per-row arrays a training batch carries instead of "patches" (see
  `batching.BatchIterDataset`): none for ship "patches"."""
  if cfg.ship == "canvas":
    return {"canvas": ((cfg.canvas_max, cfg.canvas_max, 3), np.uint8)}
  if cfg.ship == "source":
    return {"source": ((cfg.source_side, cfg.source_side, 3), np.uint8),
            "plan": ((source_plan.PLAN_SIZE,), np.float32)}
  return {}


def _finish(ds: grain.MapDataset, cfg: DataConfig, drop_remainder: bool,
            rows: dict[str, tuple[tuple[int, ...], Any]] | None = None
            ) -> grain.IterDataset:
  """Threads, batches (rows: see `batching.BatchIterDataset`), workers."""
  ds = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=cfg.read_threads, prefetch_buffer_size=cfg.read_buffer_size))
  ds = batching.BatchIterDataset(ds, batch_size=cfg.batch_size,
                                 seq_len=cfg.row_length, packing=cfg.packing,
                                 drop_remainder=drop_remainder, row_arrays=rows)
  if cfg.worker_count > 0:
    mark_absl_flags_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=cfg.worker_count,
        per_worker_buffer_size=cfg.worker_buffer_size))
  return ds


def make_train_dataset(config: Any = None, *, data_source=None,
                       shard_options: grain.sharding.ShardOptions | None = None,
                       **overrides) -> grain.IterDataset:
  """The training IterDataset (see `make_train_iterator` for the args)."""
  cfg = DataConfig.from_any(config, **overrides)
  source = make_source(cfg) if data_source is None else data_source
  shard_index, shard_count = _shard(shard_options)
  ds = grain.MapDataset.source(source)
  # Equal shards (drop the remainder) keep processes in lockstep.
  per_shard = len(ds) // shard_count
  if per_shard < 1:
    raise ValueError(f"{len(ds)} records cannot feed {shard_count} "
                     "processes")
  ds = ds[:per_shard * shard_count][shard_index::shard_count]
  shuffle_seed, map_seed = _seeds(cfg.seed, shard_index)
  if cfg.shuffle:
    ds = ds.shuffle(seed=shuffle_seed)
  ds = ds.repeat(cfg.num_epochs or None)
  ds = ds.random_map(TrainTransform(cfg), seed=map_seed)
  return _finish(ds, cfg, drop_remainder=True, rows=row_arrays(cfg))


def make_train_iterator(config: Any = None, *, data_source=None,
                        shard_options: grain.sharding.ShardOptions | None = None,
                        **overrides) -> GlimpseIterator:
  """Training batches for this JAX process.

  Args:
    config: DataConfig fields as a DataConfig, mapping, ConfigDict or
      attribute object (see `DataConfig`); keyword `overrides` win.
    data_source: a random-access source to use instead of the configured one
      (records {"image": bytes | uint8 array, "label": int, "key": str}).
    shard_options: grain ShardOptions; default ShardByJaxProcess (each
      process reads a disjoint, equal share of the records).
    **overrides: DataConfig fields.

  Returns:
    A GlimpseIterator of batch dicts (module docstring; "canvas", or
    "source" and "plan", instead of "patches" with ship "canvas" or
    "source"); infinite unless num_epochs > 0, when
    the last partial batch is dropped.
  """
  return GlimpseIterator(iter(make_train_dataset(
      config, data_source=data_source, shard_options=shard_options,
      **overrides)))


def make_eval_dataset(config: Any = None, *, data_source=None,
                      shard_options: grain.sharding.ShardOptions | None = None,
                      **overrides) -> grain.IterDataset:
  """The evaluation IterDataset (see `make_eval_iterator` for the args)."""
  cfg = DataConfig.from_any(config, **overrides)
  source = make_source(cfg) if data_source is None else data_source
  shard_index, shard_count = _shard(shard_options)
  ds = grain.MapDataset.source(_EvenShard(source, shard_index, shard_count))
  ds = ds.map(EvalTransform(cfg))
  return _finish(ds, cfg, drop_remainder=False)


def make_eval_iterator(config: Any = None, *, data_source=None,
                       shard_options: grain.sharding.ShardOptions | None = None,
                       **overrides) -> GlimpseIterator:
  """One pass of evaluation batches for this JAX process.

  Each record appears exactly once over all processes, in source order (no
  shuffle, no augmentation): the official evaluation canvas (`resize_mode`,
  `eval_canvas`) and scan pattern (`scan_pattern`, default "random", seeded
  by `seed`). Every process yields the same number of batches; rows beyond
  the data are all padding (mask False).

  Args: as `make_train_iterator`.

  Returns:
    A finite GlimpseIterator of batch dicts.
  """
  return GlimpseIterator(iter(make_eval_dataset(
      config, data_source=data_source, shard_options=shard_options,
      **overrides)))


def release_shared_memory() -> None:
  """Lets Grain unlink the workers' last batches before the process exits.

  A trainer's last batches can sit in reference cycles (threads, closures)
  that only the collector frees, and Grain unlinks freed batches on a
  one-thread pool (FIFO): a no-op submitted after the collection returns
  once every queued free is done. Without both, a process that exits right
  after training reports those batches as leaked shared memory.
  """
  gc.collect()
  if shared_memory_array is None:
    return
  pool = getattr(shared_memory_array.SharedMemoryArray, "_del_thread_pool", None)
  if pool is not None:
    pool.apply_async(int).wait(timeout=10)
