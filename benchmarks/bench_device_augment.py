r"""Device cost of `DataConfig.ship="source"`: the canvases rendered in the step.

    python benchmarks/bench_device_augment.py --images ~/data/cifar10/train
    python benchmarks/bench_device_augment.py            # random 32x32 images

Builds one training batch of each ship mode from the same stream (the Grain
pipeline, in process, configs/cifar10.py's data settings by default: batch
256, T = 128, canvas 32..64), puts it on the device, and times jitted
`train_step.batch_patches` on it:

  * ship="canvas": the patch gather alone (the canvases come from the host);
  * ship="source": `device_augment.render_canvases` + the same gather;

and reports ms per batch and images/s of each, the render's own cost (the
difference) and the bytes per row each mode moves from host to device.
With --train_step, also the whole training step (configs/cifar10.py's
model: MambaEye-Tiny, bfloat16, chunk 128, padded rows) on each batch, so
the render's share of a real step shows:

    python benchmarks/bench_device_augment.py --images ~/data/cifar10/train --train_step

Timing: `timing.call_times` (warm-up excluded; `--inner` back-to-back calls
per timed batch, then `block_until_ready`); the median is reported.
"""

from __future__ import annotations

import os
import statistics
import sys

import jax
import numpy as np
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import timing  # pylint: disable=g-import-not-at-top,wrong-import-position
from mambaeye_jax import cli  # pylint: disable=wrong-import-position
from mambaeye_jax import device_augment  # pylint: disable=wrong-import-position
from mambaeye_jax import model as model_lib  # pylint: disable=wrong-import-position
from mambaeye_jax import optim  # pylint: disable=wrong-import-position
from mambaeye_jax import sharding  # pylint: disable=wrong-import-position
from mambaeye_jax import train_step  # pylint: disable=wrong-import-position
from mambaeye_jax.data import pipeline  # pylint: disable=wrong-import-position

FLAGS = flags.FlagValues()
flags.DEFINE_string("images", "", "a folder of images in class folders (CIFAR: "
                    "~/data/cifar10/train); empty: random 32x32 images", flag_values=FLAGS)
flags.DEFINE_integer("batch", 256, "batch", flag_values=FLAGS)
flags.DEFINE_integer("num_glimpses", 128, "T", flag_values=FLAGS)
flags.DEFINE_integer("canvas_min", 32, "smallest canvas", flag_values=FLAGS)
flags.DEFINE_integer("canvas_max", 64, "largest canvas", flag_values=FLAGS)
flags.DEFINE_integer("source_side", 32, "DataConfig.source_side", flag_values=FLAGS)
flags.DEFINE_integer("repeats", 7, "timed batches of calls", flag_values=FLAGS)
flags.DEFINE_integer("inner", 10, "calls per timed batch", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "stream seed", flag_values=FLAGS)
flags.DEFINE_bool("train_step", False, "also time the whole training step (MambaEye-Tiny "
                  "bfloat16, as configs/cifar10.py) on each batch", flag_values=FLAGS)
flags.DEFINE_string("variant", "tiny", "model size of --train_step", flag_values=FLAGS)


class _RandomImages:
  """Random 32x32 RGB records: the render's cost does not depend on content."""

  def __init__(self, n: int, side: int):
    rng = np.random.default_rng(0)
    self._images = rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8)

  def __len__(self):
    return len(self._images)

  def __getitem__(self, index):
    return {"image": self._images[index], "label": 0, "key": f"random/{index}"}


def _batch(args, ship: str, source) -> dict:
  config = dict(num_glimpses=args.num_glimpses, canvas_min=args.canvas_min,
                canvas_max=args.canvas_max, batch_size=args.batch, seed=args.seed,
                source_side=args.source_side, ship=ship)
  if args.images:
    config.update(source="folder", path=args.images, cache_decoded=False)
  it = pipeline.make_train_iterator(config, data_source=source)
  batch = next(it)
  it.close()
  return batch


def _train_step_seconds(args, host: dict, render, pixel_keys) -> float:
  """Median seconds of the real training step on one batch (state donated)."""
  config = model_lib.get_config(args.variant, num_classes=10, dtype="bfloat16",
                                chunk_size=128)
  ocfg = optim.OptimConfig(total_steps=10_000, warmup_steps=100)
  tx = optim.make_optimizer(ocfg)
  mesh = sharding.make_mesh(1)
  state, shardings, _ = train_step.create_train_state(config, tx, 0, mesh)
  step = train_step.compile_train_step(
      train_step.make_train_step(train_step.model_graphdef(config), tx,
                                 optim.learning_rate_schedule(ocfg), (16, 64), packed=False,
                                 render=render), shardings, mesh)
  keys = (*pixel_keys, "positions", "ratio", "labels", "mask", "segment_ids")
  batch = sharding.global_batch({k: host[k] for k in keys}, mesh)
  holder = {"state": state}

  def call():
    holder["state"], metrics = step(holder["state"], batch)
    return metrics["loss"]

  return statistics.median(timing.call_times(call, repeats=args.repeats, inner=args.inner,
                                             warmup=3, sync=jax.block_until_ready))


def main(argv=None):
  args = cli.parse_args(FLAGS, argv, prog="bench_device_augment.py",
                        usage="python benchmarks/bench_device_augment.py [--flag=value ...]",
                        description=__doc__)
  source = None if args.images else _RandomImages(max(args.batch, 64), args.source_side)
  keys = ("positions", "mask")
  render = device_augment.renderer(args.canvas_max,
                                   perspective_distortion=pipeline.DataConfig(
                                       canvas_min=args.canvas_min,
                                       canvas_max=args.canvas_max).augment_config()
                                   .perspective_distortion)
  results = {}
  for ship, pixel_keys in (("canvas", ("canvas",)), ("source", ("source", "plan"))):
    host = _batch(args, ship, source)
    batch = jax.device_put({k: host[k] for k in (*pixel_keys, *keys)})
    fn = jax.jit(lambda b: train_step.batch_patches(b, render))
    times = timing.call_times(lambda: fn(batch), repeats=args.repeats, inner=args.inner,
                              warmup=2, sync=jax.block_until_ready)
    row_bytes = sum(host[k][0].nbytes for k in pixel_keys)
    results[ship] = statistics.median(times)
    print(f"ship={ship:<7} {'render + gather' if ship == 'source' else 'gather':<16} "
          f"{results[ship] * 1e3:8.3f} ms/batch = {args.batch / results[ship]:10.0f} img/s; "
          f"pixels host -> device {row_bytes} bytes/row")
    if args.train_step:
      seconds = _train_step_seconds(args, host, render, pixel_keys)
      print(f"ship={ship:<7} training step ({args.variant}, bf16) {seconds * 1e3:8.3f} "
            f"ms/step = {args.batch / seconds:10.0f} img/s")
  render_s = results["source"] - results["canvas"]
  print(f"render alone (difference): {render_s * 1e3:.3f} ms/batch of {args.batch} "
        f"({jax.devices()[0].device_kind}, T={args.num_glimpses}, canvas "
        f"{args.canvas_min}..{args.canvas_max})")


if __name__ == "__main__":
  main()
