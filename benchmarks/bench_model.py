r"""Whole-model throughput: MambaEye training and inference steps on one device.

    python benchmarks/bench_model.py                 # every case, one table
    python benchmarks/bench_model.py --variant tiny --batch 64 --train_len 1024 \
        --infer_len 4096 --impls chunked,pallas --dtypes float32,bfloat16
    python benchmarks/bench_model.py --dp            # + data parallel over all GPUs

Training case: the real training step of mambaeye_jax.train_lib (forward,
step-wise loss, backward, clipped AdamW; state donated) at batch b and T
glimpses, on random uint8 patches and random positions (--canvas S: on
random S x S canvases, the patches gathered inside the step as with
`DataConfig.ship="canvas"`). Each case runs in its
own subprocess so that its peak device memory (`memory_stats()
["peak_bytes_in_use"]`, parameters and optimizer state included) is its own.

Inference cases (all in one subprocess, so no per-case peak memory): the
parallel forward at T = --infer_len, logits of every step (b, T, 1000) f32,
as the official evaluation computes them.

Timing: 3 warm-up calls (compilation excluded), then --iters calls each
followed by `block_until_ready`; the median call time is reported and
images/s = batch / median.

--dp: the training step with batch b per device on every local device
(global batch b * n) against one device; the ratio of images/s (ideal: n).
--devices 1,2,4 --global_batch 1024: strong scaling at the recipe's fixed
global batch (each device gets 1024 / n rows).

Reference (DESIGN.md section 4, official PyTorch on one H100, Tiny, batch 64):
training T=1024 bf16 704 img/s (91 ms, 8.4 GB), inference T=4096 bf16 866 img/s.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

from absl import flags

from mambaeye_jax import cli

import timing  # benchmarks/timing.py: benchmarks/ is sys.path[0].


def _random_batch(batch: int, length: int, num_classes: int, seed: int = 0,
                  canvas: int = 0):
  """Host arrays of the batch contract: (batch, length, ...); canvas S > 0:
  "canvas" (batch, S, S, 3) instead of "patches" (DataConfig.ship "canvas")."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, size=(batch, 1), dtype=np.int32)
  pixels = ({"canvas": rng.integers(0, 256, size=(batch, canvas, canvas, 3), dtype=np.uint8)}
            if canvas else
            {"patches": rng.integers(0, 256, size=(batch, length, 768), dtype=np.uint8)})
  return {
      **pixels,
      "positions": rng.integers(0, (canvas or 1024) - 16, size=(batch, length, 2),
                                dtype=np.int32),
      "ratio": np.sort(rng.random((batch, length), dtype=np.float32), axis=1),
      "labels": np.repeat(labels, length, axis=1),
      "mask": np.ones((batch, length), bool),
      "segment_ids": np.ones((batch, length), np.int32),
  }


def _time_calls(fn, iters: int) -> list[float]:
  import jax  # pylint: disable=g-import-not-at-top
  return timing.call_times(fn, repeats=iters, warmup=3, sync=jax.block_until_ready)


def where() -> str:
  import jax  # pylint: disable=g-import-not-at-top
  return f"{jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}"


def _peak_gb(device) -> float | None:
  stats = device.memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 1e9


def make_train_call(variant: str, dtype: str, impl: str, *, remat: bool, padded: bool,
                    batch: int, length: int, num_devices: int = 1, scan_layers: bool = False,
                    canvas: int = 0):
  """The real training step on a random batch of `batch` rows per device.

  Returns:
    call: () -> loss, one training step (the state is donated and kept).
    lower: () -> the jax `Lowered` step, for its HLO.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from mambaeye_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  from mambaeye_jax import optim, sharding  # pylint: disable=g-import-not-at-top
  from mambaeye_jax import train_step as train_step_lib  # pylint: disable=g-import-not-at-top
  config = model_lib.get_config(variant, dtype=dtype, ssd_impl=impl, remat=remat,
                                scan_layers=scan_layers)
  ocfg = optim.OptimConfig(total_steps=10_000, warmup_steps=100)
  tx = optim.make_optimizer(ocfg)
  mesh = sharding.make_mesh(num_devices)
  state, shardings, _ = train_step_lib.create_train_state(config, tx, 0, mesh)
  train_step = train_step_lib.make_train_step(
      train_step_lib.model_graphdef(config), tx, optim.learning_rate_schedule(ocfg), (16, 64, 256),
      packed=not padded)
  step = train_step_lib.compile_train_step(train_step, shardings, mesh)
  global_batch = sharding.global_batch(
      _random_batch(batch * num_devices, length, config.num_classes, canvas=canvas), mesh)
  holder = {"state": state}

  def call():
    holder["state"], metrics = step(holder["state"], global_batch)
    return metrics["loss"]

  def lower():
    with jax.set_mesh(mesh):
      return step.jitted.lower(holder["state"], global_batch)

  return call, lower


def run_train(args, dtype: str, impl: str, num_devices: int = 1) -> dict:
  """One training case; returns images/s, median ms, peak GB."""
  import jax  # pylint: disable=g-import-not-at-top
  call, _ = make_train_call(args.variant, dtype, impl, remat=args.remat, padded=args.padded,
                            batch=args.batch, length=args.train_len, num_devices=num_devices,
                            scan_layers=args.scan_layers, canvas=args.canvas)
  times = _time_calls(call, args.iters)
  median = statistics.median(times)
  global_batch = args.batch * num_devices
  return {"case": "train", "dtype": dtype, "impl": impl, "devices": num_devices,
          "remat": args.remat, "canvas": args.canvas,
          "batch": global_batch, "length": args.train_len, "ms": 1000 * median,
          "images_per_sec": global_batch / median,
          "peak_gb": _peak_gb(jax.local_devices()[0]), "device": where()}


def make_infer_call(variant: str, dtype: str, impl: str, *, batch: int, length: int,
                    scan_layers: bool = False):
  """The parallel forward (logits of every step) on a random batch.

  Returns:
    call: () -> logits (batch, length, classes) float32.
    lower: () -> the jax `Lowered` forward, for its HLO.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from mambaeye_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  config = model_lib.get_config(variant, dtype=dtype, ssd_impl=impl, scan_layers=scan_layers)
  model = model_lib.MambaEye(config, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  host = _random_batch(batch, length, config.num_classes)
  patches, positions = jax.device_put(host["patches"]), jax.device_put(host["positions"])

  @jax.jit
  def forward(params, patches, positions):
    return nnx.merge(graphdef, params)(patches, positions)

  return (lambda: forward(params, patches, positions),
          lambda: forward.lower(params, patches, positions))


def run_infer(args, dtype: str, impl: str) -> dict:
  call, _ = make_infer_call(args.variant, dtype, impl, batch=args.batch, length=args.infer_len,
                            scan_layers=args.scan_layers)
  times = _time_calls(call, args.iters)
  median = statistics.median(times)
  return {"case": "infer", "dtype": dtype, "impl": impl, "devices": 1, "batch": args.batch,
          "length": args.infer_len, "ms": 1000 * median,
          "images_per_sec": args.batch / median, "peak_gb": None, "device": where()}


def _available_impls(requested: list[str]) -> list[str]:
  out = []
  for impl in requested:
    if impl == "pallas":
      try:
        from kernels import ssd_pallas  # pylint: disable=g-import-not-at-top,unused-import
      except ImportError as e:
        print(f"# skipping ssd_impl=pallas: kernels/ssd_pallas.py does not import ({e})",
              flush=True)
        continue
    out.append(impl)
  return out


def _case_batch(args, case: str) -> int:
  """Per-device batch of a case: --batch, or --global_batch over its devices."""
  parts = case.split(":")
  if args.global_batch and parts[0] == "train" and len(parts) > 3 and parts[3] != "all":
    devices = int(parts[3])
    if args.global_batch % devices:
      raise ValueError(f"--global_batch={args.global_batch} does not split over {devices} devices")
    return args.global_batch // devices
  return args.batch


def _subprocess_case(args, case: str) -> list[dict]:
  cmd = [sys.executable, os.path.abspath(__file__), "--case", case,
         f"--variant={args.variant}", f"--batch={_case_batch(args, case)}",
         f"--train_len={args.train_len}", f"--infer_len={args.infer_len}",
         f"--iters={args.iters}"]
  cmd += (["--remat"] if args.remat else []) + (["--padded"] if args.padded else [])
  cmd += ["--scan_layers"] if args.scan_layers else []
  cmd += [f"--canvas={args.canvas}"]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.case_timeout)
  # A library may print on the same line before the JSON (no newline).
  lines = [l[l.index('{"case"'):] for l in proc.stdout.splitlines() if '{"case"' in l]
  if proc.returncode != 0 or not lines:
    tail = (proc.stderr or proc.stdout)[-1500:]
    print(f"# case {case} failed (rc {proc.returncode}):\n{tail}", flush=True)
    return [{"case": case, "error": f"rc {proc.returncode}"}] + [json.loads(l) for l in lines]
  return [json.loads(l) for l in lines]


def _fmt(value, spec):
  return "-" if value is None else format(value, spec)


def print_table(rows: list[dict], args) -> None:
  where = next((r["device"] for r in rows if "device" in r), "?")
  per = (f"global batch {args.global_batch}" if args.global_batch
         else f"batch {args.batch} per device")
  print(f"\nMambaEye-{args.variant.capitalize()}, {per}, {where}")
  print("| workload | dtype | ssd_impl | devices | step ms (median) | images/s | "
        "peak GB |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    if "error" in r:
      print(f"| {r['case']} | failed: {r['error']} | | | | | |")
      continue
    name = f"{r['case']} T={r['length']}" + (" remat" if r.get("remat") else "")
    name += " scan" if args.scan_layers else ""
    name += " padded" if args.padded and r["case"] == "train" else ""
    name += f" canvas {r['canvas']}" if r.get("canvas") else ""
    print(f"| {name} | {r['dtype']} | {r['impl']} | {r['devices']} | {r['ms']:.2f} | "
          f"{r['images_per_sec']:.0f} | {_fmt(r['peak_gb'], '.2f')} |")
  dp = [r for r in rows if r.get("case") == "train" and r.get("devices", 1) > 1]
  for r in dp:
    base = [b for b in rows if b.get("case") == "train" and b.get("devices") == 1
            and b["dtype"] == r["dtype"] and b["impl"] == r["impl"]]
    if base:
      ratio = r["images_per_sec"] / base[0]["images_per_sec"]
      print(f"data parallel {r['dtype']} {r['impl']}: {r['devices']} devices "
            f"{r['images_per_sec']:.0f} img/s = {ratio:.2f}x one device "
            f"({100 * ratio / r['devices']:.0f}% scaling efficiency)")


# Flags of this script only (mambaeye_jax.cli says why not absl's global FLAGS).
FLAGS = flags.FlagValues()
flags.DEFINE_string("variant", "tiny", "model size", flag_values=FLAGS)
flags.DEFINE_integer("batch", 64, "batch (per device)", flag_values=FLAGS)
flags.DEFINE_integer("train_len", 1024, "glimpses of a training row", flag_values=FLAGS)
flags.DEFINE_integer("infer_len", 4096, "glimpses of an inference row", flag_values=FLAGS)
flags.DEFINE_integer("iters", 20, "timed calls per case", flag_values=FLAGS)
flags.DEFINE_string("dtypes", "float32,bfloat16", "compute dtypes, comma-separated", flag_values=FLAGS)
flags.DEFINE_string("impls", "chunked,pallas", "SSD implementations, comma-separated", flag_values=FLAGS)
flags.DEFINE_bool("remat", False, "rematerialise the blocks", flag_values=FLAGS)
flags.DEFINE_bool("padded", False, "train on padded rows (no segment ids), as configs "
                  "without packing do; default: segment ids, as packed rows need", flag_values=FLAGS)
flags.DEFINE_bool("scan_layers", False, "ModelConfig.scan_layers=True: the blocks under "
                  "lax.scan, not unrolled", flag_values=FLAGS)
flags.DEFINE_integer("canvas", 0, "training batches of S x S canvases, the patches gathered "
                     "in the step (DataConfig.ship 'canvas'); 0: patches", flag_values=FLAGS)
flags.DEFINE_bool("dp", False, "also data parallel on all devices", flag_values=FLAGS)
flags.DEFINE_string("devices", "", "device counts for training cases, e.g. 1,2,4 "
                    "(replaces the single-device cases)", flag_values=FLAGS)
flags.DEFINE_integer("global_batch", 0, "fixed global batch split over the devices "
                     "(strong scaling); 0: --batch per device", flag_values=FLAGS)
flags.DEFINE_bool("no_infer", False, "skip the inference cases", flag_values=FLAGS)
flags.DEFINE_integer("case_timeout", 300, "seconds per case subprocess", flag_values=FLAGS)
# The driver's own call into a case subprocess: train:dtype:impl[:n] or
# infer:dtypes:impls (argparse hid it from --help; absl cannot).
flags.DEFINE_string("case", "", "internal: the one case this subprocess runs", flag_values=FLAGS)


def main():
  args = cli.parse_args(FLAGS, None, prog="bench_model.py",
                        usage="python benchmarks/bench_model.py [--flag=value ...]",
                        description=__doc__)

  if args.case:
    kind, dtype, impl, *n = args.case.split(":")
    if kind == "train":
      import jax  # pylint: disable=g-import-not-at-top
      devices = jax.local_device_count() if n == ["all"] else int(n[0]) if n else 1
      print(json.dumps(run_train(args, dtype, impl, devices)), flush=True)
    else:  # Every inference case in this one process (no per-case memory).
      for impl in impl.split("+"):
        for dtype in dtype.split("+"):
          print(json.dumps(run_infer(args, dtype, impl)), flush=True)
    return

  impls = _available_impls(args.impls.split(","))
  dtypes = args.dtypes.split(",")
  counts = [int(n) for n in args.devices.split(",")] if args.devices else [1]
  cases = [f"train:{dtype}:{impl}:{n}" for impl in impls for dtype in dtypes for n in counts]
  if args.dp:  # The driver never starts JAX: the GPU stays free for the cases.
    cases += [f"train:bfloat16:{impl}:all" for impl in impls]
  if not args.no_infer:
    cases.append(f"infer:{'+'.join(dtypes)}:{'+'.join(impls)}")
  rows = []
  for case in cases:
    new = _subprocess_case(args, case)
    for row in new:
      print("#", json.dumps(row), flush=True)
    rows += new
  print_table(rows, args)


if __name__ == "__main__":
  main()
