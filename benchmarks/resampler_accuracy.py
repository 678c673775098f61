"""Accuracy of the fast evaluation resampler (OpenCV) against the reference
(PIL LANCZOS, eval.py --reference) on the same images and glimpses.

    python benchmarks/resampler_accuracy.py --checkpoint DIR --data SPEC \
        --canvas-sizes 48,96 --glimpses 64 --max-examples 500

Evaluates every canvas size with each resampler (the same class-stratified
subset, seed and so the same scan orders) and prints, per canvas: top-1 of
each path after the last glimpse, their difference, and the fraction of
images whose final prediction agrees.
"""

from __future__ import annotations

import os
import sys

import numpy as np
from absl import flags

from mambaeye_jax import cli
from mambaeye_jax import eval_data
from mambaeye_jax import eval_lib

FLAGS = flags.FlagValues()
flags.DEFINE_string("checkpoint", None, "model directory or official checkpoint (required)",
                    flag_values=FLAGS)
flags.DEFINE_string("data", None, "dataset spec for eval_data.open_source (required)",
                    flag_values=FLAGS)
cli.define_int_list("canvas-sizes", "512", "canvas sides, comma-separated", flag_values=FLAGS)
flags.DEFINE_string("resize", "fit", "resize mode", flag_values=FLAGS)
flags.DEFINE_string("scan", "random", "scan pattern", flag_values=FLAGS)
flags.DEFINE_integer("glimpses", 64, "glimpses per image (T)", flag_values=FLAGS)
flags.DEFINE_integer("max-examples", None, "class-stratified subset size", flag_values=FLAGS)
flags.DEFINE_integer("batch-size", 50, "images per device step", flag_values=FLAGS)
flags.DEFINE_integer("workers", os.cpu_count() or 1, "decode/resize worker processes",
                     flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "subset and scan-order seed", flag_values=FLAGS)
flags.DEFINE_string("dtype", "auto", "compute dtype", flag_values=FLAGS)


def main(argv=None) -> int:
  args = cli.parse_args(FLAGS, argv, prog="resampler_accuracy.py",
                        usage="python benchmarks/resampler_accuracy.py --checkpoint DIR "
                        "--data SPEC [--flag=value ...]",
                        description=__doc__, required=("checkpoint", "data"))
  model = eval_lib.load_eval_model(checkpoint_path=args.checkpoint, dtype=args.dtype)
  source = eval_data.open_source(args.data)
  results = {}
  for resampler in ("fast", "reference"):
    config = eval_lib.EvalConfig(
        canvas_sizes=tuple(args.canvas_sizes), resize_modes=(args.resize,),
        scan_patterns=(args.scan,), glimpse_counts=(args.glimpses,),
        batch_size=args.batch_size, num_workers=args.workers, seed=args.seed,
        max_examples=args.max_examples, resampler=resampler)
    results[resampler] = eval_lib.evaluate(model, source, config)
  print(f"{args.checkpoint} on {args.data}: {args.resize}, {args.scan}, T={args.glimpses}, "
        f"seed {args.seed}, dtype {model.config.dtype}")
  print(f"{'canvas':>6s} {'images':>7s} {'top1 fast':>10s} {'top1 ref':>9s} "
        f"{'diff (pp)':>10s} {'agree':>7s}")
  for fast, ref in zip(results["fast"], results["reference"]):
    valid = (fast.predictions >= 0) & (ref.predictions >= 0)
    agree = float(np.mean(fast.predictions[valid] == ref.predictions[valid]))
    top1_fast, top1_ref = fast.top1_at(args.glimpses), ref.top1_at(args.glimpses)
    print(f"{fast.setting.canvas_size:6d} {fast.num_examples:7d} {100 * top1_fast:9.2f}% "
          f"{100 * top1_ref:8.2f}% {100 * (top1_fast - top1_ref):+10.2f} "
          f"{100 * agree:6.2f}%")
  return 0


if __name__ == "__main__":
  sys.exit(main())
