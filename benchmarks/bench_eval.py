"""End-to-end throughput of the evaluator, with a stage breakdown.

    python -m mambaeye_jax.bench_eval --images ../shared/data/imagenet_sample_100.tar.gz

Measures, for one setting (default: canvas 512, resize fit, random scan,
T = 4096, as the official evaluation):

  host     decode + resize + scan order in the worker pool alone, per
           resampler path (--paths: "fast", OpenCV, the default of eval.py;
           "reference", PIL LANCZOS, eval.py --reference);
  copy     host -> device transfer of one batch of uint8 canvases + corners;
  device   patch gather + forward + scoring on a batch already on the device
           (one line per --variants entry: SSD implementation and chunk);
  e2e      `eval_lib.evaluate_setting` over the whole (repeated) image list,
           everything overlapped, compilation excluded (done before), per
           path, with the fastest device variant.

A last table gives, per path, host, device and end-to-end images/s, the
worker-milliseconds per image (workers / host rate: a core's milliseconds
where each worker has a core) and end to end as a percentage of
device-only throughput (the target is >= 90%).

Without --checkpoint the model is a randomly initialised MambaEye of the
named size: the throughput does not depend on the weights, the accuracy is
meaningless and is not printed. The image list is the given photographs
repeated `--repeat` times, so JPEG decoding is real but the files are in
the page cache.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import jax
import numpy as np
from absl import flags
from flax import nnx

from mambaeye_jax import cli
from mambaeye_jax import eval_data
from mambaeye_jax import eval_lib
from mambaeye_jax import eval_workers
from mambaeye_jax import model as model_lib
from mambaeye_jax import progress as progress_lib
from mambaeye_jax.data import eval_transforms

import timing  # benchmarks/timing.py: benchmarks/ is sys.path[0].


def _model(args, ssd_impl: str | None, chunk: int | None):
  """The model to time: a checkpoint, or random weights of `args.size`."""
  if args.checkpoint:
    return eval_lib.load_eval_model(checkpoint_path=args.checkpoint, dtype=args.dtype,
                                    ssd_impl=ssd_impl, chunk_size=chunk)
  overrides = {"dtype": eval_lib.resolve_dtype(args.dtype)}
  if ssd_impl:
    overrides["ssd_impl"] = ssd_impl
  if chunk:
    overrides["chunk_size"] = chunk
  return model_lib.MambaEye(model_lib.get_config(args.size, **overrides),
                            rngs=nnx.Rngs(0))


def _host_stage(pool, source, setting, config, num_images) -> tuple[float, tuple]:
  """Images/s of the worker pool filling batch slots, nothing else, and the
  first slot's (canvases (b, S, S, 3), positions (b, T, 2), labels (b,))."""
  batches = eval_workers.HostBatches.create(
      config.slots, config.batch_size, setting, shared=pool.num_workers > 0)
  try:
    b = config.batch_size
    starts = list(range(0, num_images, b))
    start = time.perf_counter()
    in_flight = []
    for i, lo in enumerate(starts):
      if len(in_flight) == config.slots:
        for f in in_flight.pop(0):
          f.result()
      in_flight.append(pool.submit(batches, setting, config.seed, i % config.slots,
                                   range(lo, min(lo + b, num_images)), False))
    for futures in in_flight:
      for f in futures:
        f.result()
    seconds = time.perf_counter() - start
    sample = (batches.canvases[0].copy(), batches.positions[0].copy(),
              batches.labels[0].copy())
  finally:
    batches.close()
  return num_images / seconds, sample


def _time(fn, repeats: int) -> float:
  """Median seconds of fn() (which must block)."""
  return timing.median_ms(fn, repeats=repeats, warmup=0) / 1e3


# Flags of this script only (mambaeye_jax.cli says why not absl's global FLAGS).
FLAGS = flags.FlagValues()
flags.DEFINE_string("images", None, "dataset spec for eval_data.open_source (required)",
                    flag_values=FLAGS)
flags.DEFINE_string("checkpoint", None, "real weights (default: random)", flag_values=FLAGS)
flags.DEFINE_enum("size", "tiny", sorted(model_lib.VARIANTS), "model size",
                  flag_values=FLAGS)
flags.DEFINE_integer("canvas", 512, "canvas side", flag_values=FLAGS)
flags.DEFINE_string("resize", "fit", "resize mode", flag_values=FLAGS)
flags.DEFINE_string("scan", "random", "scan pattern", flag_values=FLAGS)
flags.DEFINE_integer("glimpses", 4096, "glimpses per image", flag_values=FLAGS)
flags.DEFINE_integer("batch-size", 64, "images per device step", flag_values=FLAGS)
flags.DEFINE_integer("workers", os.cpu_count() or 1, "decode/resize worker processes",
                     flag_values=FLAGS)
flags.DEFINE_integer("repeat", 30, "passes over the images", flag_values=FLAGS)
flags.DEFINE_string("dtype", "auto", "compute dtype", flag_values=FLAGS)
flags.DEFINE_string("variants", "auto", "comma list of SSD_IMPL[:CHUNK] for the device "
                    "stage; the first is used end to end", flag_values=FLAGS)
flags.DEFINE_integer("device-repeats", 10, "timed repeats of the device stage",
                     flag_values=FLAGS)
cli.define_name_list("paths", eval_transforms.RESAMPLERS, "resampler paths to time (host "
                     "and end to end): fast (OpenCV), reference (PIL LANCZOS)",
                     flag_values=FLAGS, choices=eval_transforms.RESAMPLERS)
flags.DEFINE_bool("reference", False, "time the reference path only (--paths reference)",
                  flag_values=FLAGS)


def _paths(args) -> list[str]:
  """The resampler paths to time (the flag checked their names)."""
  paths = ["reference"] if args.reference else list(args.paths)
  if not paths:
    raise ValueError("--paths is empty")
  return paths


def main(argv=None) -> int:
  args = cli.parse_args(FLAGS, argv, prog="bench_eval.py",
                        usage="python -m mambaeye_jax.bench_eval --images SPEC [--flag=value ...]",
                        description=__doc__, required=("images",))

  paths = _paths(args)
  source = eval_data.open_source(args.images, unknown_synsets="sorted")
  source = eval_data.RepeatSource(source, args.repeat)
  num = len(source)
  config = eval_lib.EvalConfig(
      canvas_sizes=(args.canvas,), resize_modes=(args.resize,),
      scan_patterns=(args.scan,), glimpse_counts=(args.glimpses,),
      batch_size=args.batch_size, num_workers=args.workers)
  settings = {path: dataclasses.replace(config.settings()[0], resampler=path)
              for path in paths}
  setting = settings[paths[0]]
  device = jax.devices()[0]
  weights = args.checkpoint or f"random {args.size} weights (throughput only)"
  print(f"device: {device.device_kind} x{jax.local_device_count()}, "
        f"{os.cpu_count()} CPUs, jax {jax.__version__}")
  print(f"setting: canvas {args.canvas}, resize {args.resize}, scan {args.scan}, "
        f"T={args.glimpses}, batch {args.batch_size}, {args.workers} workers, "
        f"{weights}, images: {source.description} = {num}, paths {','.join(paths)}")
  rows = []
  host_rates, e2e_rates = {}, {}

  start = time.perf_counter()
  with eval_workers.WorkerPool(source, args.workers) as pool:
    # Warm the pool (process start, imports) on a few images, untimed.
    _host_stage(pool, source, setting, config, min(num, 2 * args.batch_size))
    pool_start = time.perf_counter() - start
    samples = {}
    for path in paths:
      host_rates[path], samples[path] = _host_stage(pool, source, settings[path], config,
                                                    min(num, 20 * args.batch_size))
      rows.append((f"host: decode+resize+scan, {path} ({args.workers} workers)",
                   host_rates[path], ""))
    sample = samples[paths[0]]

    variants = [v.split(":") for v in args.variants.split(",") if v]
    best = None  # (img/s, runner): the fastest variant runs end to end.
    for variant in variants:
      impl = variant[0]
      chunk = int(variant[1]) if len(variant) > 1 and variant[1] else None
      try:
        model = _model(args, impl, chunk)
        runner = eval_lib.DeviceRunner(model, args.batch_size, model.config.num_classes)
        compile_s = runner.warm_up(setting)
        canvases, positions, labels = sample
        labels = labels % model.config.num_classes
        valid = np.ones(args.batch_size, bool)
        arrays = runner.put(canvases, positions, labels, valid)
        if best is None:
          copy_s = _time(lambda: runner.put(canvases, positions, labels, valid), 5)
          rows.append(("host->device copy (uint8 canvases + corners)",
                       args.batch_size / copy_s,
                       f"{canvases.nbytes / copy_s / 1e9:.1f} GB/s"))
        step_s = _time(lambda: jax.block_until_ready(runner.run(arrays)),
                       args.device_repeats)
      except Exception as e:  # A variant that fails must not stop the others.
        print(f"  variant {':'.join(variant)} failed: {type(e).__name__}: "
              f"{str(e)[:300]}", flush=True)
        continue
      from mambaeye_jax import ssd  # pylint: disable=g-import-not-at-top
      resolved = ssd.resolve_impl(model.config.ssd_impl).value
      tokens = args.batch_size * args.glimpses / step_s
      rate = args.batch_size / step_s
      rows.append((f"device: gather+forward+score ({resolved}, chunk "
                   f"{model.config.chunk_size}, {model.config.dtype})", rate,
                   f"{tokens / 1e6:.2f} M tokens/s, compile {compile_s:.0f} s"))
      print(f"  {rows[-1][0]}: {rate:.1f} img/s", flush=True)
      if best is None or rate > best[0]:
        best = (rate, runner, rows[-1][0])
    if best is None:
      print("no device variant ran")
      return 1
    device_rate, e2e_runner = best[0], best[1]
    print(f"end to end with the fastest: {best[2]}", flush=True)

    for path in paths:
      e2e = eval_lib.evaluate_setting(e2e_runner, pool, source, settings[path], config,
                                      progress_lib.Progress(num, interval=5.0))
      e2e_rates[path] = e2e.num_examples / e2e.seconds
      rows.append((f"end to end, {path} (decode ... device, overlapped)", e2e_rates[path],
                   f"{e2e.num_examples} images in {e2e.seconds:.1f} s"))

  print()
  print(f"{'stage':62s} {'images/s':>10s}  notes")
  for name, rate, note in rows:
    print(f"{name:62s} {rate:10.1f}  {note}")
  print(f"worker pool start: {pool_start:.1f} s (not counted)")
  print()
  workers = max(args.workers, 1)
  print(f"{'path':10s} {'host img/s':>11s} {'worker-ms/img':>14s} {'device img/s':>13s} "
        f"{'e2e img/s':>10s} {'e2e % of device':>16s}")
  for path in paths:
    print(f"{path:10s} {host_rates[path]:11.1f} {1e3 * workers / host_rates[path]:14.2f} "
          f"{device_rate:13.1f} {e2e_rates[path]:10.1f} "
          f"{100 * e2e_rates[path] / device_rate:15.1f}%")
  for path in paths:
    print(f"END-TO-END {path}: {e2e_rates[path]:.1f} images/s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
