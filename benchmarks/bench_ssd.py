"""Checks and times SSD implementations side by side: `python benchmarks/bench_ssd.py`.

Implementations: the Pallas kernel (`ssd_pallas`, one row per tile config),
XLA chunked (`ssd_chunked`), associative (`ssd_associative`) and, when it
imports, mamba_ssm's `mamba_chunk_scan_combined` (PyTorch + Triton; its
package needs Mamba-1's CUDA extension, which is stubbed out).

Per shape and implementation it prints forward and forward+backward
milliseconds (median over repeats of a batch of back-to-back calls, so
dispatch overlaps the device work), the bandwidth those times give for the
minimal bytes (every input read once, every output written once), the peak
device memory of the step (XLA: arguments + outputs + temporaries of the
compiled forward+backward; torch: max allocated), and the relative error
against `ssd_chunked` (forward y, then the largest over the gradients).

Shapes: MambaEye (heads 8, headdim 64, d_state 64, groups 1) with
batch * length = 65,536 at lengths 256, 1024, 4096, 16384, and Mamba2 LM
(heads 24, headdim 64, d_state 128) at lengths 2048 and 8192; bf16 x / B / C,
float32 dt with dt_bias and softplus, as in the model.

Examples:
  python benchmarks/bench_ssd.py                       # everything on the GPU
  python benchmarks/bench_ssd.py --shapes mambaeye --lengths 4096,16384
  python benchmarks/bench_ssd.py --impls pallas,mamba_ssm --modes fwd
  python benchmarks/bench_ssd.py --configs block_q=64 --configs block_q=128,num_warps=8
  python benchmarks/bench_ssd.py --smoke               # tiny, CPU, interpret
"""

from __future__ import annotations

import dataclasses
import os
import sys
import types

import numpy as np
from absl import flags

from mambaeye_jax import cli

import timing  # benchmarks/timing.py: benchmarks/ is sys.path[0].

IMPLS = ("pallas", "chunked", "associative", "mamba_ssm")


@dataclasses.dataclass(frozen=True)
class Shape:
  """One benchmark problem: x (b, l, h, p), B / C (b, l, g, n)."""
  name: str
  b: int
  l: int
  h: int
  p: int
  g: int
  n: int


def shapes_for(which, lengths, tokens):
  out = []
  if which in ("mambaeye", "all"):
    for l in lengths or (256, 1024, 4096, 16384):
      out.append(Shape("mambaeye", max(1, tokens // l), l, 8, 64, 1, 64))
  if which in ("lm", "all"):
    for l in lengths or (2048, 8192):
      out.append(Shape("mamba2-lm", max(1, tokens // l), l, 24, 64, 1, 128))
  return out


def min_bytes(s: Shape, x_bytes=2, with_bwd=False):
  """Fewest bytes a forward (or forward+backward) must move."""
  tok = s.b * s.l
  x = tok * s.h * s.p * x_bytes
  bc = 2 * tok * s.g * s.n * x_bytes
  dt = tok * s.h * 4
  fwd = x + bc + dt + x  # read x, B, C, dt; write y
  if not with_bwd:
    return fwd
  # Backward: read x, B, C, dt, dy; write dx, dB, dC, ddt.
  return fwd + (x + bc + dt + x) + (x + bc + dt)


def parse_config(text):
  """'block_q=128,num_warps=8' -> SSDGpuConfig; '' or 'default' -> default."""
  from kernels.ssd_pallas_gpu import SSDGpuConfig  # pylint: disable=g-import-not-at-top
  kw = {}
  if text and text != "default":
    for item in text.split(","):
      k, v = item.split("=")
      kw[k.strip()] = None if v.strip() == "None" else int(v)
  return SSDGpuConfig(**kw)


def make_inputs(s: Shape, seed=0, dtype="bfloat16"):
  """Random Mamba2-like inputs (numpy, so every framework gets the same)."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((s.b, s.l, s.h, s.p), np.float32)
  dt = rng.standard_normal((s.b, s.l, s.h), np.float32) * 0.5
  A = -rng.uniform(1.0, 16.0, (s.h,)).astype(np.float32)
  B = rng.standard_normal((s.b, s.l, s.g, s.n), np.float32)
  C = rng.standard_normal((s.b, s.l, s.g, s.n), np.float32)
  D = rng.standard_normal((s.h,), np.float32)
  dt0 = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), (s.h,)))
  dt_bias = (dt0 + np.log(-np.expm1(-dt0))).astype(np.float32)
  dy = rng.standard_normal((s.b, s.l, s.h, s.p), np.float32)
  return dict(x=x, dt=dt, A=A, B=B, C=C, D=D, dt_bias=dt_bias, dy=dy,
              dtype=dtype)


def _median_ms(fn, sync, reps, inner):
  """Median ms per call over `reps` batches of `inner` back-to-back calls."""
  return timing.median_ms(fn, repeats=reps, inner=inner, sync=sync)


def _rel(a, b):
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / (np.linalg.norm(b) + 1e-30))


class JaxRunner:
  """Jitted forward and forward+backward of one JAX implementation."""

  def __init__(self, fn, inp, modes, interpret=False):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    self.jax = jax
    dtype = jnp.dtype(inp["dtype"])
    self.args = dict(
        x=jnp.asarray(inp["x"], dtype), dt=jnp.asarray(inp["dt"]),
        A=jnp.asarray(inp["A"]), B=jnp.asarray(inp["B"], dtype),
        C=jnp.asarray(inp["C"], dtype), D=jnp.asarray(inp["D"]),
        dt_bias=jnp.asarray(inp["dt_bias"]))
    self.dy = jnp.asarray(inp["dy"], dtype)

    def fwd(x, dt, A, B, C, D, dt_bias):
      return fn(x, dt, A, B, C, D, dt_bias=dt_bias, dt_softplus=True,
                chunk_size=256)

    def fwd_bwd(x, dt, A, B, C, D, dt_bias, dy):
      y, vjp = jax.vjp(fwd, x, dt, A, B, C, D, dt_bias)
      return y, vjp(dy)

    self.fwd = jax.jit(fwd)
    self.fwd_bwd = jax.jit(fwd_bwd)
    self.modes = modes

  def outputs(self):
    y, grads = self.fwd_bwd(**self.args, dy=self.dy)
    return np.asarray(y, np.float32), [np.asarray(g, np.float32) for g in grads]

  def time(self, reps, inner):
    sync = self.jax.block_until_ready
    res = {}
    if "fwd" in self.modes:
      res["fwd"] = _median_ms(lambda: self.fwd(**self.args), sync, reps, inner)
    if "fwdbwd" in self.modes:
      res["fwdbwd"] = _median_ms(lambda: self.fwd_bwd(**self.args, dy=self.dy),
                                 sync, reps, inner)
      mem = self.fwd_bwd.lower(**self.args, dy=self.dy).compile().memory_analysis()
      if mem is not None:
        res["peak_mb"] = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                          + mem.temp_size_in_bytes) / 1e6
    return res


def pallas_breakdown(runner, cfg, reps, inner, interpret=False):
  """Times the Pallas pieces alone: training forward and backward kernels."""
  import jax  # pylint: disable=g-import-not-at-top
  from kernels import ssd_pallas_gpu  # pylint: disable=g-import-not-at-top
  from kernels import ssd_reference  # pylint: disable=g-import-not-at-top
  a = runner.args
  dt = ssd_reference.effective_dt(a["dt"], a["dt_bias"], True)
  fwd_train = jax.jit(lambda x, dt, A, B, C, D: ssd_pallas_gpu.forward(
      x, dt, A, B, C, D, None, None, cfg=cfg, interpret=interpret,
      for_backward=True))
  ops = (a["x"], dt, a["A"], a["B"], a["C"], a["D"])
  _, _, states = fwd_train(*ops)
  bwd = jax.jit(lambda x, dt, A, B, C, D, st, dy: ssd_pallas_gpu.backward(
      x, dt, A, B, C, D, None, None, st, dy, None, cfg=cfg,
      interpret=interpret))
  sync = jax.block_until_ready
  return dict(
      fwd_train=_median_ms(lambda: fwd_train(*ops), sync, reps, inner),
      bwd_only=_median_ms(lambda: bwd(*ops, states, runner.dy), sync, reps,
                          inner))


def import_mamba_ssm():
  """mamba_chunk_scan_combined, or None (prints why)."""
  try:
    sys.modules.setdefault("selective_scan_cuda",
                           types.ModuleType("selective_scan_cuda"))
    # pylint: disable-next=g-import-not-at-top
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    import torch  # pylint: disable=g-import-not-at-top
    if not torch.cuda.is_available():
      print("mamba_ssm: no CUDA device for torch")
      return None
    return mamba_chunk_scan_combined
  except Exception as e:  # pylint: disable=broad-except
    print(f"mamba_ssm not importable: {type(e).__name__}: {e}")
    return None


class TorchRunner:
  """mamba_ssm's chunked scan, forward and forward+backward, in torch."""

  def __init__(self, fn, inp, modes):
    import torch  # pylint: disable=g-import-not-at-top
    self.torch = torch
    dev = "cuda"
    dtype = getattr(torch, inp["dtype"])
    def t(a, d=torch.float32):
      return torch.tensor(a, device=dev, dtype=d)
    self.x, self.B, self.C = (t(inp[k], dtype) for k in ("x", "B", "C"))
    self.dt, self.A, self.D = t(inp["dt"]), t(inp["A"]), t(inp["D"])
    self.dt_bias = t(inp["dt_bias"])
    self.dy = t(inp["dy"], dtype)
    self.fn = fn
    self.modes = modes
    self.leaves = [self.x, self.dt, self.A, self.B, self.C, self.D, self.dt_bias]

  def _fwd(self, *a):
    x, dt, A, B, C, D, dt_bias = a if a else self.leaves
    return self.fn(x, dt, A, B, C, chunk_size=256, D=D, dt_bias=dt_bias,
                   dt_softplus=True)

  def _fwd_bwd(self):
    leaves = [v.detach().requires_grad_(True) for v in self.leaves]
    y = self._fwd(*leaves)
    grads = self.torch.autograd.grad(y, leaves, self.dy)
    return y, grads

  def outputs(self):
    y, grads = self._fwd_bwd()
    f = lambda v: v.detach().float().cpu().numpy()  # pylint: disable=unnecessary-lambda-assignment
    return f(y), [f(g) for g in grads]

  def time(self, reps, inner):
    sync = lambda _: self.torch.cuda.synchronize()  # pylint: disable=unnecessary-lambda-assignment
    res = {}
    if "fwd" in self.modes:
      with self.torch.no_grad():
        res["fwd"] = _median_ms(self._fwd, sync, reps, inner)
    if "fwdbwd" in self.modes:
      self.torch.cuda.reset_peak_memory_stats()
      res["fwdbwd"] = _median_ms(self._fwd_bwd, sync, reps, inner)
      res["peak_mb"] = self.torch.cuda.max_memory_allocated() / 1e6
    return res


def run(args):
  """Runs the benchmark described by parsed `args`; returns the table rows."""
  if args.smoke:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  # Torch and JAX share the GPU: keep XLA from taking 75% of it up front.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  import jax  # pylint: disable=g-import-not-at-top
  from kernels import ssd_pallas as ssd_pallas_mod  # pylint: disable=g-import-not-at-top
  from kernels import ssd_reference  # pylint: disable=g-import-not-at-top

  print(f"jax {jax.__version__}, backend {jax.default_backend()}, "
        f"devices {jax.devices()}")
  try:
    import flax  # pylint: disable=g-import-not-at-top
    print(f"flax {flax.__version__}")
  except ImportError:
    print("flax not installed")

  if args.smoke:
    shapes = [Shape("smoke", 2, 48, 2, 16, 1, 16),
              Shape("smoke", 1, 100, 4, 16, 2, 32)]
    configs = [parse_config("block_q=16,bwd_block_q=16,split_chunks=2")]
  else:
    shapes = shapes_for(args.shapes, args.lengths, args.tokens)
    configs = [parse_config(c) for c in args.configs]
  impls = [i for i in args.impls if not (args.smoke and i == "mamba_ssm")]
  mamba = import_mamba_ssm() if "mamba_ssm" in impls else None

  rows = []
  for s in shapes:
    inp = make_inputs(s, seed=s.l, dtype=args.dtype)
    ref = JaxRunner(ssd_reference.ssd_chunked, inp, args.modes)
    ref_y, ref_g = ref.outputs() if args.check else (None, None)
    runners = []
    for impl in impls:
      if impl == "pallas":
        for cfg, text in zip(configs, args.configs if not args.smoke else ["smoke"]):
          fn = _pallas_fn(ssd_pallas_mod.ssd_pallas, cfg, args.smoke)
          runners.append((f"pallas[{text}]",
                          lambda fn=fn, cfg=cfg: _with_cfg(
                              JaxRunner(fn, inp, args.modes), cfg)))
      elif impl == "chunked":
        runners.append(("xla_chunked", lambda: ref))
      elif impl == "associative":
        runners.append(("associative", lambda: JaxRunner(
            ssd_reference.ssd_associative, inp, args.modes)))
      elif impl == "mamba_ssm" and mamba is not None:
        runners.append(("mamba_ssm", lambda: TorchRunner(mamba, inp, args.modes)))
    for name, make in runners:
      row = dict(shape=f"{s.name} b{s.b} l{s.l} h{s.h} p{s.p} n{s.n}", impl=name)
      try:
        runner = make()
        if args.check:
          y, grads = runner.outputs()
          row["err_y"] = _rel(y, ref_y)
          row["err_g"] = max(_rel(g, r) for g, r in zip(grads, ref_g))
        row.update(runner.time(args.reps, args.inner))
        if args.breakdown and getattr(runner, "cfg", None) is not None:
          row.update(pallas_breakdown(runner, runner.cfg, args.reps,
                                      args.inner, args.smoke))
      except Exception as e:  # pylint: disable=broad-except
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
      xb = 2 if args.dtype in ("bfloat16", "float16") else 4
      if "fwd" in row:
        row["fwd_gbs"] = min_bytes(s, xb) / row["fwd"] / 1e6
      if "fwdbwd" in row:
        row["fwdbwd_gbs"] = min_bytes(s, xb, True) / row["fwdbwd"] / 1e6
      rows.append(row)
      print(_fmt_row(row), flush=True)
      if args.log:
        with open(args.log, "a") as f:
          f.write(repr(row) + "\n")
  return rows


def _with_cfg(runner, cfg):
  runner.cfg = cfg
  return runner


def _pallas_fn(ssd_pallas, cfg, interpret):
  def fn(*a, **kw):
    return ssd_pallas(*a, **kw, config=cfg, interpret=interpret)
  return fn


_COLS = [("shape", 34, "s"), ("impl", 30, "s"), ("fwd", 9, ".3f"),
         ("fwd_gbs", 8, ".0f"), ("fwdbwd", 9, ".3f"), ("fwdbwd_gbs", 8, ".0f"),
         ("peak_mb", 9, ".0f"), ("err_y", 8, ".1e"), ("err_g", 8, ".1e")]
_HEAD = ["shape", "impl", "fwd ms", "GB/s", "f+b ms", "GB/s", "peak MB",
         "err y", "err grad"]


def _fmt_row(row):
  parts = []
  for (key, width, fmt) in _COLS:
    v = row.get(key)
    parts.append(("-" if v is None else format(v, fmt)).rjust(width)
                 if key not in ("shape", "impl") else str(v).ljust(width))
  line = " ".join(parts)
  if "fwd_train" in row:
    line += f"  [train fwd {row['fwd_train']:.3f} bwd {row['bwd_only']:.3f}]"
  if "error" in row:
    line += "  " + row["error"]
  return line


def print_table(rows):
  print()
  print(" ".join(h.ljust(w) if k in ("shape", "impl") else h.rjust(w)
                 for h, (k, w, _) in zip(_HEAD, _COLS)))
  for row in rows:
    print(_fmt_row(row))


# Flags of this script only (mambaeye_jax.cli says why not absl's global FLAGS).
FLAGS = flags.FlagValues()
flags.DEFINE_enum("shapes", "all", ["mambaeye", "lm", "all"], "shape families",
                  flag_values=FLAGS)
cli.define_int_list("lengths", None, "sequence lengths (default: each family's)",
                    flag_values=FLAGS)
flags.DEFINE_integer("tokens", 65536, "batch * length of every shape", flag_values=FLAGS)
cli.define_name_list("impls", IMPLS, "implementations", flag_values=FLAGS, choices=IMPLS)
cli.define_name_list("modes", ("fwd", "fwdbwd"), "what is timed", flag_values=FLAGS,
                     choices=("fwd", "fwdbwd"))
# Repeated, not comma-separated: one tile config is itself a comma list.
flags.DEFINE_multi_string("configs", ["default"], "a Pallas tile config, e.g. "
                          "'block_q=128,num_warps=8'; repeat the flag for more",
                          flag_values=FLAGS)
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "x / B / C dtype",
                  flag_values=FLAGS)
flags.DEFINE_integer("reps", 15, "timed repetitions", flag_values=FLAGS)
flags.DEFINE_integer("inner", 10, "calls per repetition", flag_values=FLAGS)
flags.DEFINE_bool("check", True, "compare every implementation with ssd_chunked "
                  "(--nocheck: time only)", flag_values=FLAGS)
flags.DEFINE_string("log", None, "append raw rows to this file", flag_values=FLAGS)
flags.DEFINE_bool("breakdown", False, "also time the Pallas training forward and "
                  "backward alone", flag_values=FLAGS)
flags.DEFINE_bool("smoke", False, "tiny shapes on CPU, Pallas in interpret mode",
                  flag_values=FLAGS)


def main(argv=None):
  args = cli.parse_args(FLAGS, argv, prog="bench_ssd.py",
                        usage="python benchmarks/bench_ssd.py [--shapes S] [--lengths L,L] "
                              "[--impls I,I] [--configs CFG]... [--smoke]",
                        description=__doc__)
  if args.smoke:
    args.reps, args.inner = 2, 1
  rows = run(args)
  print_table(rows)
  return rows


if __name__ == "__main__":
  main()
