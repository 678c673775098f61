"""Benchmark of the training transform: per-core throughput and stage times.

    python -m mambaeye_jax.data.bench --images ../shared/data/imagenet_sample_100.tar.gz

Extracts the archive (or reads a directory) into a temporary directory,
pins the process to one CPU core, and runs the full official training
transform (T = 1024, canvas 256..1024 by default) over the images:

  1. stage by stage (file read, header + plan, decode, transform, positions,
     patch gather, information ratio), timing each;
  2. the same work in the official order and sizes (`apply_reference`, the
     full canvas, glimpse.py's ratio), for comparison on the same machine;
  3. end to end through the Grain pipeline (`make_train_iterator`,
     in-process, one thread), batches included;
  4. with --workers N, wall-clock throughput with N worker processes.

Prints ms/sample and samples/s for one core. Nothing is written outside the
temporary directory. Times are CPU time of this process (see `_clock`).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import tarfile
import tempfile
import time

import numpy as np

from mambaeye_jax import glimpse
from mambaeye_jax.data import augment
from mambaeye_jax.data import glimpses
from mambaeye_jax.data import pipeline
from mambaeye_jax.data import scan_patterns
from mambaeye_jax.data import sources


def _clock() -> float:
  # CPU time, not wall time: "ms of one core" per sample, and robust to
  # other processes sharing the machine. Counts every thread of the process
  # (the Grain pipeline's reader thread included).
  return time.process_time()


def _image_files(root: str) -> list[str]:
  files = []
  for folder, _, names in os.walk(root):
    files.extend(os.path.join(folder, n) for n in names
                 if n.lower().endswith(sources.IMAGE_EXTENSIONS))
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


def bench_stages(files, cfg: pipeline.DataConfig, samples: int, seed: int):
  """Times each stage of TrainTransform on `samples` records.

  Returns:
    (totals: stage -> seconds, path_times: path -> list of transform
    seconds, n).
  """
  aug = cfg.augment_config()
  totals = collections.defaultdict(float)
  paths = collections.defaultdict(list)
  for i in range(samples):
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
    pixels = augment.apply(image, params, rng, aug)
    t3 = _clock()
    canvas = params["canvas"]
    box = augment.centred_box(canvas, pixels.shape[:2])
    positions = scan_patterns.generate("train", rng, (canvas, canvas), box,
                                       cfg.num_glimpses)
    t4 = _clock()
    glimpses.gather_patches(pixels, (canvas, canvas), box, positions)
    t5 = _clock()
    glimpse.information_ratio(positions, box)
    t6 = _clock()
    plan_s = marks["plan1"] - marks["plan0"]
    totals["read file"] += t1 - t0
    totals["header + plan"] += plan_s
    totals["decode"] += t2 - t1 - plan_s
    totals["transform"] += t3 - t2
    totals["positions"] += t4 - t3
    totals["patch gather"] += t5 - t4
    totals["information ratio"] += t6 - t5
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
  the full zero canvas, `glimpse.extract_patches` on it and glimpse.py's
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
    glimpse.extract_patches(canvas, positions)
    glimpse.information_ratio(positions, box, method="paint")
  return (_clock() - t0) / samples


def bench_pipeline(root_files, cfg: pipeline.DataConfig, batches: int):
  """Seconds per sample through the Grain iterator (after one warm batch)."""
  it = pipeline.make_train_iterator(cfg,
                                   data_source=_MemorySource(root_files))
  next(it)
  t0 = _clock()
  for _ in range(batches):
    next(it)
  elapsed = _clock() - t0
  it.close()
  return elapsed / (batches * cfg.batch_size)


def bench_workers(root_files, cfg: pipeline.DataConfig, workers: int,
                  batches: int) -> float:
  """Wall-clock samples/s with `workers` worker processes (after warm-up).

  Workers run in parallel, so this is wall time, not CPU time: it measures
  what this machine's cores deliver together.
  """
  cfg = dataclasses.replace(cfg, worker_count=workers)
  it = pipeline.make_train_iterator(cfg,
                                   data_source=_MemorySource(root_files))
  for _ in range(2 * workers):  # Start every worker and fill its buffer.
    next(it)
  t0 = time.perf_counter()
  for _ in range(batches):
    next(it)
  elapsed = time.perf_counter() - t0
  it.close()
  return batches * cfg.batch_size / elapsed


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", required=True,
                      help="a .tar.gz of images or a directory")
  parser.add_argument("--samples", type=int, default=400)
  parser.add_argument("--num_glimpses", type=int, default=1024)
  parser.add_argument("--canvas_min", type=int, default=256)
  parser.add_argument("--canvas_max", type=int, default=1024)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--pipeline_batches", type=int, default=10)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--reference_samples", type=int, default=100,
                      help="samples for the step-by-step reference timing "
                      "(0 skips it)")
  parser.add_argument("--all_cores", action="store_true",
                      help="do not pin the process to one core")
  parser.add_argument("--workers", type=int, default=0,
                      help="also measure wall-clock throughput with this "
                      "many worker processes (implies --all_cores)")
  args = parser.parse_args(argv)

  if not (args.all_cores or args.workers) and hasattr(os,
                                                     "sched_setaffinity"):
    core = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    print(f"pinned to CPU core {core}")
  cfg = pipeline.DataConfig(
      num_glimpses=args.num_glimpses, canvas_min=args.canvas_min,
      canvas_max=args.canvas_max, batch_size=args.batch_size, seed=args.seed,
      read_threads=1, read_buffer_size=1)
  with tempfile.TemporaryDirectory() as tmp:
    if os.path.isdir(args.images):
      root = args.images
    else:
      with tarfile.open(args.images) as tar:
        tar.extractall(tmp, filter="data")
      root = tmp
    files = _image_files(root)
    readable = []
    for f in files:  # The stage timings decode directly: no bad files.
      try:
        sources.decode_image(sources.file_record(f, 0)["image"], f)
        readable.append(f)
      except sources.BadImageError as e:
        print(f"leaving out {e}")
    files = readable
    if not files:
      raise SystemExit(f"no readable images in {args.images}")
    print(f"{len(files)} images; T={args.num_glimpses}, canvas "
          f"{args.canvas_min}..{args.canvas_max}, full training transform")
    bench_stages(files, cfg, min(20, args.samples), args.seed + 1)  # Warm.
    totals, paths, n = bench_stages(files, cfg, args.samples, args.seed)
    total = sum(totals.values())
    print(f"\nstage by stage, {n} samples, one core:")
    for stage, seconds in totals.items():
      print(f"  {stage:<22} {seconds / n * 1e3:7.2f} ms/sample "
            f"({seconds / total:5.1%})")
    print(f"  {'total':<22} {total / n * 1e3:7.2f} ms/sample = "
          f"{n / total:6.1f} samples/s per core")
    print("transform by path (mean ms, share of samples):")
    for path, times in sorted(paths.items()):
      print(f"  {path:<36} {np.mean(times) * 1e3:7.2f} ms "
            f"({len(times) / n:5.1%})")
    if args.reference_samples:
      per_sample = bench_reference(files, cfg, args.reference_samples,
                                   args.seed)
      print(f"official order of work, step by step (apply_reference, full "
            f"canvas, glimpse.py ratio), {args.reference_samples} samples: "
            f"{per_sample * 1e3:.2f} ms/sample = {1 / per_sample:.1f} "
            "samples/s per core")
    per_sample = bench_pipeline(files, cfg, args.pipeline_batches)
    print(f"\nGrain pipeline end to end (batch {args.batch_size}, in-process,"
          f" 1 thread): {per_sample * 1e3:.2f} ms/sample = "
          f"{1 / per_sample:.1f} samples/s per core")
    if args.workers:
      rate = bench_workers(files, cfg, args.workers, args.pipeline_batches)
      print(f"Grain pipeline, {args.workers} worker processes, "
            f"{os.cpu_count()} CPUs: {rate:.1f} samples/s wall clock")


if __name__ == "__main__":
  main()
