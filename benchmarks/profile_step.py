r"""Where the time of a MambaEye step goes: a GPU kernel table from a JAX trace.

    python benchmarks/profile_step.py --case train --remat --padded
    python benchmarks/profile_step.py --case infer --length 4096
    python benchmarks/profile_step.py --case train --hlo_out /tmp/step.hlo.txt
    python benchmarks/profile_step.py --case train --padded --devices 2

Runs the real training step (or the inference forward) of
`benchmarks/bench_model.py` a few times under `jax.profiler.trace`, reads the
Perfetto trace back and prints, per step, the device time of each kernel
grouped into categories (matmuls, the SSD kernel, XLA fusions, copies,
collectives), then the longest kernels with the HLO op that launched them.
`--hlo_out` also writes the optimised HLO so that a fusion's name can be
looked up (what it reads, writes and computes). `--devices N` runs the data
parallel step on N devices (batch per device) and tables the first GPU's
kernels, collectives included.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile

from absl import flags

from mambaeye_jax import cli

import bench_model  # benchmarks/ is sys.path[0] when this script runs.

# Kernel name -> category, first match wins.
_CATEGORIES = (
    ("ssd kernel", re.compile(r"ssd|_chunk_", re.I)),
    ("matmul", re.compile(r"gemm|cutlass|xmma|nvjet|sm90|sm80|cublas|dot|matmul", re.I)),
    ("collective", re.compile(r"nccl|all_reduce|all-reduce|allreduce", re.I)),
    ("copy/memset", re.compile(r"memcpy|memset|copy", re.I)),
    ("reduction fusion", re.compile(r"reduce", re.I)),
    ("other fusion", re.compile(r"fusion|loop_|input_|wrapped_", re.I)),
)


def _category(name: str) -> str:
  for label, pattern in _CATEGORIES:
    if pattern.search(name):
      return label
  return "other"


def read_trace(logdir: str) -> list[dict]:
  """The Perfetto trace events written by jax.profiler.trace under logdir."""
  files = glob.glob(os.path.join(logdir, "**", "perfetto_trace.json.gz"), recursive=True)
  if not files:
    raise FileNotFoundError(f"no perfetto_trace.json.gz under {logdir}")
  with gzip.open(sorted(files)[-1]) as f:
    trace = json.load(f)
  return trace["traceEvents"] if isinstance(trace, dict) else trace


def device_kernels(events: list[dict], device: int = 0) -> list[dict]:
  """Complete events on one GPU's streams (not the derived 'XLA Ops' rows)."""
  process = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
  thread = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
            if e.get("ph") == "M" and e.get("name") == "thread_name"}
  gpu_pids = {pid for pid, name in process.items()
              if re.search(rf"/device:GPU:{device}\b", name)}
  out = []
  for e in events:
    if e.get("ph") != "X" or e.get("pid") not in gpu_pids:
      continue
    tname = thread.get((e["pid"], e.get("tid")), "")
    if "Stream" not in tname:
      continue
    out.append(e)
  return out


def print_profile(kernels: list[dict], steps: int, top: int) -> None:
  """Per-step ms by category and the `top` longest kernels."""
  by_name = collections.defaultdict(lambda: [0.0, 0, ""])
  for e in kernels:
    entry = by_name[e["name"]]
    entry[0] += e.get("dur", 0.0) / 1000.0
    entry[1] += 1
    args = e.get("args") or {}
    entry[2] = entry[2] or args.get("hlo_op", "") or args.get("long_name", "")[:60]
  total = sum(v[0] for v in by_name.values()) / steps
  cats = collections.defaultdict(float)
  for name, (ms, _, hlo) in by_name.items():
    cats[_category(name + " " + hlo)] += ms / steps
  print(f"\ndevice time per step: {total:.2f} ms ({len(kernels) // steps} kernels per step)")
  print(f"{'category':<20} {'ms/step':>9} {'share':>7}")
  for label, ms in sorted(cats.items(), key=lambda kv: -kv[1]):
    print(f"{label:<20} {ms:9.3f} {100 * ms / total:6.1f}%")
  print(f"\n{'kernel':<60} {'hlo op':<28} {'calls':>6} {'ms/step':>9} {'share':>7}")
  for name, (ms, calls, hlo) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]:
    print(f"{name[:60]:<60} {hlo[:28]:<28} {calls // steps:6d} {ms / steps:9.3f} "
          f"{100 * ms / steps / total:6.1f}%")


# Flags of this script only (mambaeye_jax.cli says why not absl's global FLAGS).
FLAGS = flags.FlagValues()
flags.DEFINE_enum("case", "train", ("train", "infer"), "step profiled", flag_values=FLAGS)
flags.DEFINE_string("variant", "tiny", "model size", flag_values=FLAGS)
flags.DEFINE_string("dtype", "bfloat16", "compute dtype", flag_values=FLAGS)
flags.DEFINE_string("impl", "pallas", "SSD implementation", flag_values=FLAGS)
flags.DEFINE_integer("batch", 64, "batch (per device)", flag_values=FLAGS)
flags.DEFINE_integer("length", 1024, "glimpses per sequence", flag_values=FLAGS)
flags.DEFINE_bool("remat", False, "rematerialise the blocks", flag_values=FLAGS)
flags.DEFINE_bool("padded", False, "padded model widths", flag_values=FLAGS)
flags.DEFINE_bool("scan_layers", False, "scan over the layers", flag_values=FLAGS)
flags.DEFINE_integer("steps", 3, "steps traced", flag_values=FLAGS)
flags.DEFINE_integer("top", 40, "kernels listed", flag_values=FLAGS)
flags.DEFINE_string("hlo_out", "", "write the optimised HLO text here", flag_values=FLAGS)
flags.DEFINE_integer("devices", 1, "training on this many devices (batch per device)",
                     flag_values=FLAGS)


def main():
  args = cli.parse_args(FLAGS, None, prog="profile_step.py",
                        usage="python benchmarks/profile_step.py [--case train|infer] [--flag=value ...]",
                        description=__doc__)
  if args.devices > 1 and args.case != "train":
    raise SystemExit(cli.print_usage_error("profile_step.py",
                                           "--devices applies to --case train"))

  import jax  # pylint: disable=g-import-not-at-top
  if args.case == "train":
    call, lowered = bench_model.make_train_call(
        args.variant, args.dtype, args.impl, remat=args.remat, padded=args.padded,
        batch=args.batch, length=args.length, scan_layers=args.scan_layers,
        num_devices=args.devices)
  else:
    call, lowered = bench_model.make_infer_call(
        args.variant, args.dtype, args.impl, batch=args.batch, length=args.length,
        scan_layers=args.scan_layers)
  if args.hlo_out:
    with open(args.hlo_out, "w") as f:
      f.write(lowered().compile().as_text())
  for _ in range(3):
    jax.block_until_ready(call())
  logdir = tempfile.mkdtemp(prefix="mambaeye_profile_")
  with jax.profiler.trace(logdir, create_perfetto_trace=True):
    for _ in range(args.steps):
      jax.block_until_ready(call())
  kernels = device_kernels(read_trace(logdir))
  print(f"{args.case} {args.variant} {args.dtype} {args.impl} batch {args.batch} "
        f"T {args.length}{' remat' if args.remat else ''}{' padded' if args.padded else ''}"
        f"{' scan' if args.scan_layers else ''}"
        f"{f', {args.devices} devices (GPU 0 shown)' if args.devices > 1 else ''}, "
        f"{bench_model.where()}")
  if not kernels:
    print("no GPU kernels in the trace (is this a GPU?)")
    return
  print_profile(kernels, args.steps, args.top)


if __name__ == "__main__":
  main()
