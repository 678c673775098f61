"""Benchmark of the training transform: per-core throughput and stage times.

    python -m mambaeye_jax.data.bench --images ../shared/data/imagenet_sample_100.tar.gz
    python -m mambaeye_jax.data.bench --preset cifar10 \
        --images ~/data/cifar10/train --max_images 5000 --workers 2

Extracts the archive (or reads a directory) into a temporary directory,
pins the process to one CPU core, and runs the full official training
transform (T = 1024, canvas 256..1024 by default; `--preset cifar10`: T =
128, canvas 32..64, batch 256 as configs/cifar10.py) over the images:

  1. stage by stage (file read, header + plan, decode, transform, positions,
     patch gather, information ratio), timing each, the canvas that
     `DataConfig.ship="canvas"` builds instead of the gather, and what
     ship="source" does instead of the transform and the gather (the erase
     box, the plan vector, the padded decoded image), once per
     transform backend (`DataConfig.transform_backend`: "opencv", the fast
     default, beside "pil", the reference path), on the same samples, the
     backends taking turns on blocks of them (STAGE_ROUNDS); then the
     per-batch stages per sample in every ship mode: batching
     (`rows_to_batch`) and the worker -> main process transfer (Grain's copy
     into shared memory and its opening);
  2. the same work in the official order and sizes (`apply_reference`, the
     full canvas, geometry.py's ratio), for comparison on the same machine;
  3. end to end through the Grain pipeline (`make_train_iterator`,
     in-process, one thread, --transform_backend), batches included, in
     every ship mode; what it
     costs beyond the stages is Grain's own per-record overhead;
  4. with --workers N, wall-clock throughput with N worker processes, and
     the CPU time of all of them (main process and workers) per sample,
     which does not depend on what else runs on the machine (every mode).

Ship "source" is timed only when every image fits --source_side (CIFAR).
In "canvas" mode the patches are gathered on the accelerator inside the
train step (`train_step.batch_patches`), and in "source" mode the canvases
rendered there too, which this host benchmark does not time
(benchmarks/bench_device_augment.py does).

Prints ms/sample and samples/s for one core. Nothing is written outside the
temporary directory. Times are CPU time of this process (see `_clock`).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import tarfile
import tempfile
import time

import numpy as np
from absl import flags

from mambaeye_jax import cli
from mambaeye_jax.data import augment
from mambaeye_jax.data import batching
from mambaeye_jax.data import geometry
from mambaeye_jax.data import glimpses
from mambaeye_jax.data import pipeline
from mambaeye_jax.data import scan_patterns
from mambaeye_jax.data import source_plan
from mambaeye_jax.data import sources

# configs/cifar10.py's data settings.
PRESETS = {
    "imagenet": dict(num_glimpses=1024, canvas_min=256, canvas_max=1024,
                     batch_size=16),
    "cifar10": dict(num_glimpses=128, canvas_min=32, canvas_max=64,
                    batch_size=256),
}


def _clock() -> float:
  # CPU time, not wall time: "ms of one core" per sample, and robust to
  # other processes sharing the machine. Counts every thread of the process
  # (the Grain pipeline's reader thread included).
  return time.process_time()


def _image_files(root: str) -> list[str]:
  """Every image under `root`, at any depth (`sources.list_images`' rule)."""
  files = []
  for folder, _, _ in os.walk(root):
    files.extend(os.path.join(folder, n) for n in sources.list_images(folder)[0])
  return sorted(files)


class _MemorySource:
  """Records of image files, read once into memory (label 0: labels do not
  affect the cost). In memory, the pipeline's read-ahead never touches the
  temporary directory after it is removed."""

  def __init__(self, files):
    self._records = [sources.file_record(f, 0) for f in files]

  def __len__(self):
    return len(self._records)

  def __getitem__(self, index):
    return self._records[index]


# The stage that replaces "patch gather" with ship="canvas".
CANVAS_STAGE = "canvas (ship=canvas)"
# The stage that replaces "transform" and "patch gather" with ship="source".
SOURCE_STAGE = "erase + plan + source (ship=source)"


def bench_stages(files, cfg: pipeline.DataConfig, samples: int, seed: int,
                 first: int = 0):
  """Times each stage of TrainTransform on `samples` records (sample i
  reads file i and draws from default_rng([seed, i]), i from `first`), with
  `cfg.transform_backend`.

  Returns:
    (totals: stage -> seconds, path_times: path -> list of transform
    seconds, n). totals[CANVAS_STAGE] is the padded canvas of ship="canvas",
    which replaces "patch gather" (not both in one sample's cost);
    totals[SOURCE_STAGE] is what ship="source" does instead of "transform"
    and "patch gather" (timed when the image fits cfg.source_side).
  """
  aug = cfg.augment_config()
  totals = collections.defaultdict(float)
  paths = collections.defaultdict(list)
  for i in range(first, first + samples):
    rng = np.random.default_rng([seed, i])
    path = files[i % len(files)]
    t0 = _clock()
    with open(path, "rb") as f:
      data = f.read()
    t1 = _clock()
    params = {}
    marks = {}

    def draft(width, height):
      marks["plan0"] = _clock()
      params.update(augment.plan(rng, width, height, aug))
      marks["plan1"] = _clock()
      return params["fit"]

    image = sources.decode_image(data, path, draft_size=draft)
    t2 = _clock()
    before_erase = rng.bit_generator.state  # ship="source" draws the box again below.
    pixels = augment.apply(image, params, rng, aug, cfg.transform_backend)
    t3 = _clock()
    canvas = params["canvas"]
    box = augment.centred_box(canvas, pixels.shape[:2])
    positions = scan_patterns.generate("train", rng, (canvas, canvas), box,
                                       cfg.num_glimpses)
    t4 = _clock()
    geometry.gather_patches(pixels, (canvas, canvas), box, positions)
    t5 = _clock()
    geometry.information_ratio(positions, box)
    t6 = _clock()
    glimpses.padded_canvas(pixels, box, cfg.canvas_max)  # ship="canvas"'s.
    t7 = _clock()
    source_s = None
    if max(image.size) <= cfg.source_side:  # ship="source"'s, from the same draws.
      erase_rng = np.random.default_rng()
      erase_rng.bit_generator.state = before_erase
      t8 = _clock()
      rw, rh = params["out_size"]
      erase = augment.erase_box(erase_rng, rh, rw, aug) if params["erase"] else None
      glimpses.padded_canvas(np.asarray(image), geometry.ImageBox(0, 0, *image.size[::-1]),
                             cfg.source_side)
      source_plan.encode_plan(params, erase, image.size[::-1])
      source_s = _clock() - t8
    plan_s = marks["plan1"] - marks["plan0"]
    totals["read file"] += t1 - t0
    totals["header + plan"] += plan_s
    totals["decode"] += t2 - t1 - plan_s
    totals["transform"] += t3 - t2
    totals["positions"] += t4 - t3
    totals["patch gather"] += t5 - t4
    totals["information ratio"] += t6 - t5
    totals[CANVAS_STAGE] += t7 - t6
    if source_s is not None:
      totals[SOURCE_STAGE] += source_s
    if params["perspective"] is not None:
      paths["with perspective"].append(t3 - t2)
    elif params["blur_sigma"] is not None:
      paths["with blur, no perspective"].append(t3 - t2)
    else:
      paths["neither (one resize)"].append(t3 - t2)
    if params["jitter"] is not None:
      paths["any, with colour jitter"].append(t3 - t2)
    if params["gray"]:
      paths["any, with grayscale"].append(t3 - t2)
  return totals, paths, samples


def bench_reference(files, cfg: pipeline.DataConfig, samples: int,
                    seed: int) -> float:
  """CPU seconds per sample of the official order of work, same machine.

  Full decode, `augment.apply_reference` (every step at the official sizes),
  the full zero canvas, `geometry.extract_patches` on it and geometry.py's
  coverage ratio: the official loader's work without its PyTorch overheads
  (so a lower bound on what the official loader costs here).
  """
  aug = cfg.augment_config()
  t0 = _clock()
  for i in range(samples):
    rng = np.random.default_rng([seed, i])
    with open(files[i % len(files)], "rb") as f:
      image = sources.decode_image(f.read())
    params = augment.plan(rng, *image.size, aug)
    pixels = augment.apply_reference(image, params, rng, aug)
    side = params["canvas"]
    box = augment.centred_box(side, pixels.shape[:2])
    canvas = np.zeros((side, side, 3), np.uint8)
    canvas[box.top:box.top + box.height, box.left:box.left + box.width] = (
        pixels)
    positions = scan_patterns.generate("train", rng, (side, side), box,
                                       cfg.num_glimpses)
    geometry.extract_patches(canvas, positions)
    geometry.information_ratio(positions, box, method="paint")
  return (_clock() - t0) / samples


def bench_batches(files, cfg: pipeline.DataConfig, seed: int,
                  repeats: int = 5) -> dict[str, float]:
  """CPU seconds per sample of the per-batch stages, on one batch.

  "batching": `rows_to_batch` of `cfg.batch_size` examples (padded rows; of
  patches or, with cfg.ship "canvas" or "source", of canvases or of decoded
  images and plans).
  "transfer to main process": with worker processes, each batch is copied
  into new shared memory by the worker (`copy_to_shm`) and opened by the
  main process (`open_from_shm`); timed here in one process, with the main
  process's first read of the pages (which the device transfer does).
  """
  # Deferred: the Grain internals only matter to this measurement.
  from grain._src.python.ipc import shared_memory_array  # pylint: disable=g-import-not-at-top
  transform = pipeline.TrainTransform(cfg)
  examples = []
  for i in range(cfg.batch_size):
    ex = transform.random_map(sources.file_record(files[i % len(files)], 0),
                              np.random.default_rng([seed, i]))
    if batching.SKIP_KEY not in ex:
      examples.append(ex)
  rows = [[ex] for ex in examples]
  row_arrays = pipeline.row_arrays(cfg)
  times = collections.defaultdict(float)
  for _ in range(repeats):
    t0 = _clock()
    batch = batching.rows_to_batch(rows, cfg.batch_size, cfg.row_length,
                                   row_arrays=row_arrays)
    t1 = _clock()
    metadata = shared_memory_array.copy_to_shm(batch)
    opened = shared_memory_array.open_from_shm(metadata)
    for value in opened.values():
      value.sum()  # Reads every page, as the transfer to the device does.
    t2 = _clock()
    del opened  # Unlinks the shared memory.
    times["batching"] += t1 - t0
    times["transfer to main process"] += t2 - t1
  return {k: v / (repeats * cfg.batch_size) for k, v in times.items()}


def bench_pipeline(data_source, cfg: pipeline.DataConfig, batches: int):
  """Seconds per sample through the Grain iterator (after one warm batch)."""
  it = pipeline.make_train_iterator(cfg, data_source=data_source)
  next(it)
  t0 = _clock()
  for _ in range(batches):
    next(it)
  elapsed = _clock() - t0
  it.close()
  return elapsed / (batches * cfg.batch_size)


def _process_tree_cpu() -> float:
  """CPU seconds (user + system) of this process and its live children.

  Grain's workers are children of this process; /proc gives their time
  while they run (getrusage counts children only once they have exited).
  """
  tick = os.sysconf("SC_CLK_TCK")
  me = str(os.getpid())
  total = time.process_time()
  for pid in os.listdir("/proc"):
    if not pid.isdigit():
      continue
    try:
      with open(f"/proc/{pid}/stat") as f:
        # Fields after the parenthesised command: state, ppid, ...
        fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
      continue
    if fields[1] == me:
      total += (int(fields[11]) + int(fields[12])) / tick
  return total


def bench_workers(data_source, cfg: pipeline.DataConfig, workers: int,
                  batches: int) -> tuple[float, float]:
  """Throughput with `workers` worker processes (after warm-up).

  Returns:
    (wall-clock samples/s: what this machine's cores deliver together,
    depending on what else runs on it; CPU seconds per sample of the main
    process and the workers together, the cost of the whole pipeline per
    sample, independent of the machine's load).
  """
  cfg = dataclasses.replace(cfg, worker_count=workers)
  it = pipeline.make_train_iterator(cfg, data_source=data_source)
  for _ in range(2 * workers):  # Start every worker and fill its buffer.
    next(it)
  t0, cpu0 = time.perf_counter(), _process_tree_cpu()
  for _ in range(batches):
    next(it)
  elapsed = time.perf_counter() - t0
  cpu = _process_tree_cpu() - cpu0
  it.close()
  samples = batches * cfg.batch_size
  return samples / elapsed, cpu / samples


_NAMES = {"opencv": "opencv (fast)", "pil": "pil (reference)"}

# Turns the backends take in the stage table (see main).
STAGE_ROUNDS = 8


def _ship_totals(stages) -> dict[str, float]:
  """Host seconds of each ship mode, summed over the samples: the canvas
  replaces the gather, the source stage both the transform and the gather
  (a sample costs one of them)."""
  every = sum(stages.values()) - stages.get(SOURCE_STAGE, 0.0)
  totals = {"patches": every - stages[CANVAS_STAGE], "canvas": every - stages["patch gather"]}
  if SOURCE_STAGE in stages:
    totals["source"] = (every - stages[CANVAS_STAGE] - stages["patch gather"]
                        - stages["transform"] + stages[SOURCE_STAGE])
  return totals


def _print_stages(stages, paths, n: int) -> None:
  """One table of the stage times, a column per backend, the total of each
  ship mode, then the transform by path.

  Args:
    stages: backend -> (stage -> seconds), from `bench_stages`.
    paths: backend -> (path -> transform seconds of each sample).
    n: samples per backend.
  """
  backends = list(stages)
  totals = {b: _ship_totals(stages[b]) for b in backends}
  print(f"\nstage by stage, {n} samples, one core, ms/sample (share of ship=patches):")
  print(f"  {'stage':<36}" + "".join(f"  {_NAMES[b]:>19}" for b in backends))
  for stage in stages[backends[0]]:
    print(f"  {stage:<36}" + "".join(
        f"  {stages[b][stage] / n * 1e3:11.2f} ({stages[b][stage] / totals[b]['patches']:5.1%})"
        for b in backends))
  for ship in totals[backends[0]]:
    print(f"  {'total, ship=' + ship:<36}" + "".join(
        f"  {totals[b][ship] / n * 1e3:11.2f}{'':8}" for b in backends))
    print(f"  {'samples/s per core, ship=' + ship:<36}" + "".join(
        f"  {n / totals[b][ship]:11.1f}{'':8}" for b in backends))
  print("transform by path, mean ms (share of samples):")
  for path in sorted(paths[backends[0]]):
    print(f"  {path:<36}" + "".join(
        f"  {np.mean(paths[b][path]) * 1e3:11.2f} ({len(paths[b][path]) / n:5.1%})"
        for b in backends))


# Flags of this script only (mambaeye_jax.cli says why not absl's global FLAGS).
FLAGS = flags.FlagValues()
flags.DEFINE_string("images", None, "a .tar.gz of images or a directory (required)",
                    flag_values=FLAGS)
flags.DEFINE_enum("preset", "imagenet", sorted(PRESETS),
                  "defaults of T, canvas and batch (flags below override them): "
                  "imagenet (T 1024, canvas 256..1024, batch 16) or cifar10 "
                  "(configs/cifar10.py: T 128, canvas 32..64, batch 256)",
                  flag_values=FLAGS)
flags.DEFINE_integer("samples", 400, "samples timed", flag_values=FLAGS)
flags.DEFINE_integer("num_glimpses", None, "T (default: the preset's)", flag_values=FLAGS)
flags.DEFINE_integer("canvas_min", None, "smallest canvas (default: the preset's)",
                     flag_values=FLAGS)
flags.DEFINE_integer("canvas_max", None, "largest canvas (default: the preset's)",
                     flag_values=FLAGS)
flags.DEFINE_integer("batch_size", None, "batch (default: the preset's)",
                     flag_values=FLAGS)
flags.DEFINE_integer("max_images", 0, "use N images spread over the set only (0: all)",
                     flag_values=FLAGS)
flags.DEFINE_bool("cache_decoded", False, "the pipeline runs read images decoded once "
                  "(sources.DecodedImageCache, DataConfig.cache_decoded)", flag_values=FLAGS)
flags.DEFINE_integer("pipeline_batches", 10, "batches for the end-to-end Grain timings "
                     "(0 skips them)", flag_values=FLAGS)
flags.DEFINE_enum("transform_backend", "opencv", augment.BACKENDS,
                  "the transform backend of the end-to-end Grain timings (the stage "
                  "table times every backend)", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "random seed", flag_values=FLAGS)
flags.DEFINE_integer("source_side", 32, "DataConfig.source_side: ship='source' is timed "
                     "when every image fits it", flag_values=FLAGS)
flags.DEFINE_integer("reference_samples", 100, "samples for the step-by-step reference "
                     "timing (0 skips it)", flag_values=FLAGS)
flags.DEFINE_bool("all_cores", False, "do not pin the process to one core",
                  flag_values=FLAGS)
flags.DEFINE_integer("workers", 0, "also measure wall-clock throughput with this many "
                     "worker processes (implies --all_cores)", flag_values=FLAGS)


def main(argv=None):
  args = cli.parse_args(FLAGS, argv, prog="bench_data.py",
                        usage="python -m mambaeye_jax.data.bench --images PATH "
                        "[--flag=value ...]", description=__doc__,
                        required=("images",))
  for name, value in PRESETS[args.preset].items():
    if getattr(args, name) is None:
      setattr(args, name, value)

  if not (args.all_cores or args.workers) and hasattr(os,
                                                     "sched_setaffinity"):
    core = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    print(f"pinned to CPU core {core}")
  cfg = pipeline.DataConfig(
      num_glimpses=args.num_glimpses, canvas_min=args.canvas_min,
      canvas_max=args.canvas_max, batch_size=args.batch_size, seed=args.seed,
      read_threads=1, read_buffer_size=1,
      transform_backend=args.transform_backend, source_side=args.source_side)
  with tempfile.TemporaryDirectory() as tmp:
    if os.path.isdir(args.images):
      root = args.images
    else:
      with tarfile.open(args.images) as tar:
        tar.extractall(tmp, filter="data")
      root = tmp
    files = _image_files(root)
    if args.max_images:
      files = files[::max(1, len(files) // args.max_images)][:args.max_images]
    readable = []
    largest = 0
    for f in files:  # The stage timings decode directly: no bad files.
      try:
        largest = max(largest, *sources.decode_image(sources.file_record(f, 0)["image"],
                                                     f).size)
        readable.append(f)
      except sources.BadImageError as e:
        print(f"leaving out {e}")
    files = readable
    if not files:
      raise SystemExit(f"no readable images in {args.images}")
    print(f"{len(files)} images; T={args.num_glimpses}, canvas "
          f"{args.canvas_min}..{args.canvas_max}, full training transform")
    ship_modes = [m for m in pipeline.SHIP_MODES
                  if m != "source" or largest <= args.source_side]
    if "source" not in ship_modes:
      print(f"ship=source not timed: images up to {largest} pixels a side, "
            f"source_side={args.source_side}")
    backends = {b: dataclasses.replace(cfg, transform_backend=b) for b in augment.BACKENDS}
    stages = {b: collections.defaultdict(float) for b in backends}
    paths = {b: collections.defaultdict(list) for b in backends}
    for cfg_b in backends.values():
      bench_stages(files, cfg_b, min(20, args.samples), args.seed + 1)  # Warm.
    # The backends take turns on blocks of the same samples, so that a change
    # of the machine's load in the run weighs on both alike.
    block = max(1, -(-args.samples // STAGE_ROUNDS))
    n = args.samples
    for first in range(0, n, block):
      for backend, cfg_b in backends.items():
        totals_b, paths_b, _ = bench_stages(files, cfg_b, min(block, n - first), args.seed,
                                            first)
        for stage, seconds in totals_b.items():
          stages[backend][stage] += seconds
        for path, times in paths_b.items():
          paths[backend][path].extend(times)
    _print_stages(stages, paths, n)
    total = _ship_totals(stages[args.transform_backend])
    per_batch = {ship: bench_batches(files, dataclasses.replace(cfg, ship=ship), args.seed)
                 for ship in ship_modes}
    print(f"per-batch stages (batch {args.batch_size}), per sample:")
    for ship, stages in per_batch.items():
      for stage, seconds in stages.items():
        print(f"  {stage + ', ship=' + ship:<40} {seconds * 1e3:7.3f} ms/sample")
    if args.reference_samples:
      per_sample = bench_reference(files, cfg, args.reference_samples,
                                   args.seed)
      print(f"official order of work, step by step (apply_reference, full "
            f"canvas, geometry.py ratio), {args.reference_samples} samples: "
            f"{per_sample * 1e3:.2f} ms/sample = {1 / per_sample:.1f} "
            "samples/s per core")
    if args.pipeline_batches <= 0:
      return
    source = _MemorySource(files)
    if args.cache_decoded:
      source = sources.DecodedImageCache(source)
    cached = ", decoded images cached" if args.cache_decoded else ""
    print(f"\nGrain pipeline end to end (batch {args.batch_size}, in-process,"
          f" 1 thread{cached}):")
    for ship in ship_modes:
      ship_cfg = dataclasses.replace(cfg, ship=ship)
      per_sample = bench_pipeline(source, ship_cfg, args.pipeline_batches)
      rest = per_sample - total[ship] / n - per_batch[ship]["batching"]
      print(f"  ship={ship:<8} {per_sample * 1e3:.2f} ms/sample = "
            f"{1 / per_sample:.1f} samples/s per core; Grain's per-record overhead "
            f"(end to end less the stages and batching): {rest * 1e3:.2f} ms/sample")
    if args.workers:
      for ship in ship_modes:
        rate, cpu = bench_workers(source, dataclasses.replace(cfg, ship=ship), args.workers,
                                  args.pipeline_batches)
        print(f"Grain pipeline, ship={ship}, {args.workers} worker processes, "
              f"{os.cpu_count()} CPUs: {rate:.1f} samples/s wall clock; "
              f"{cpu * 1e3:.2f} ms/sample of CPU (main process and workers) = "
              f"{1 / cpu:.1f} samples/s per core")

if __name__ == "__main__":
  main()
