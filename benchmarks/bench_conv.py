r"""The block's small kernels against XLA: causal conv + SiLU, gated RMSNorm.

    python benchmarks/bench_conv.py                 # MambaEye shapes, default tiles
    python benchmarks/bench_conv.py --sweep         # + other tiles of each kernel

Shapes are (batch, tokens, channels) of one Mamba2 layer of MambaEye-Tiny:
the x part (512 channels) and a B or C part (64) at training size (64 x
1024) and the x part at inference size (64 x 4096). Times are medians over
--reps batches of --inner back-to-back calls, in ms per call; "fwd" is the
forward alone, "bwd" the backward alone (from saved inputs), as a training
step runs them. The byte floor counts reading x (and the output gradient)
and writing the output (or dx) once, in bf16. The gated norm's rows are
(64 x 1024) and (64 x 4096) tokens of 512 features, forward and backward.
"""

from __future__ import annotations

import dataclasses

from absl import flags

from mambaeye_jax import cli
import jax
import jax.numpy as jnp

from kernels import conv_pallas_gpu
from kernels import conv_reference
from kernels import gated_norm_pallas_gpu
from kernels import norms

import timing  # benchmarks/timing.py: benchmarks/ is sys.path[0].

SHAPES = ((64, 1024, 512), (64, 1024, 128), (64, 4096, 512))  # Tiny: x, BC (g n = 64)
FWD_TILES = ((64, 128, 4), (32, 128, 4), (64, 64, 4), (32, 64, 2), (128, 64, 4), (16, 128, 2))
BWD_TILES = ((32, 64, 4), (16, 128, 4), (32, 32, 2), (16, 64, 2), (64, 64, 4), (32, 128, 4), (64, 32, 2),
             (64, 32, 4))


def _median_ms(fn, reps: int, inner: int) -> float:
  return timing.median_ms(fn, repeats=reps, inner=inner, sync=jax.block_until_ready)


def bench_shape(shape, cfgs, reps, inner):
  """Rows (name, fwd ms, bwd ms, max errors vs XLA) for one shape."""
  b, t, c = shape
  keys = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(keys[0], shape, jnp.bfloat16)
  kernel = jax.random.normal(keys[1], (4, c)) * 0.5
  bias = jax.random.normal(keys[2], (c,)) * 0.1
  d_out = jax.random.normal(keys[3], shape, jnp.bfloat16)
  xla_fwd = jax.jit(lambda x, k, b: conv_reference.causal_conv_silu_reference(x, k, b, None, jnp.bfloat16))
  xla_bwd = jax.jit(lambda x, k, b, g: jax.vjp(
      lambda x, k, b: conv_reference.causal_conv_silu_reference(x, k, b, None, jnp.bfloat16), x, k, b)[1](g))
  ref_out, ref_grads = xla_fwd(x, kernel, bias), xla_bwd(x, kernel, bias, d_out)
  rows = [("xla (custom vjp)", _median_ms(lambda: xla_fwd(x, kernel, bias), reps, inner),
           _median_ms(lambda: xla_bwd(x, kernel, bias, d_out), reps, inner), 0.0, 0.0)]
  for name, cfg in cfgs:
    fwd = jax.jit(lambda x, k, b, cfg=cfg: conv_pallas_gpu.forward(x, k, b, None, jnp.bfloat16,
                                                                    cfg=cfg))
    bwd = jax.jit(lambda x, k, b, g, cfg=cfg: conv_pallas_gpu.backward(x, k, b, None, g,
                                                                        cfg=cfg))
    out, grads = fwd(x, kernel, bias), bwd(x, kernel, bias, d_out)
    err_out = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref_out.astype(jnp.float32))))
    err_grad = max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - r.astype(jnp.float32))))
                   for g, r in zip(grads, ref_grads))
    rows.append((name, _median_ms(lambda: fwd(x, kernel, bias), reps, inner),
                 _median_ms(lambda: bwd(x, kernel, bias, d_out), reps, inner),
                 err_out, err_grad))
  return rows


NORM_CFGS = ((8, 8), (8, 4), (16, 8), (16, 4), (32, 8))


def bench_gated_norm(rows, cfgs, reps, inner):
  """Rows (name, fwd ms, bwd ms, max error vs XLA) at (rows, 512) bf16."""
  keys = jax.random.split(jax.random.key(1), 3)
  y = jax.random.normal(keys[0], (rows, 512), jnp.bfloat16)
  z = jax.random.normal(keys[1], (rows, 512), jnp.bfloat16)
  d_out = jax.random.normal(keys[2], (rows, 512), jnp.bfloat16)
  weight = jnp.ones((512,))
  xla = jax.jit(lambda y, z, w: norms.gated_rms_norm(y, z, w, 1e-5, 512, jnp.bfloat16))
  xla_bwd = jax.jit(lambda y, z, w, g: jax.vjp(
      lambda y, z, w: norms.gated_rms_norm(y, z, w, 1e-5, 512, jnp.bfloat16), y, z, w)[1](g))
  want = xla(y, z, weight).astype(jnp.float32)
  out = [("xla (reduce + elementwise)", _median_ms(lambda: xla(y, z, weight), reps, inner),
          _median_ms(lambda: xla_bwd(y, z, weight, d_out), reps, inner), 0.0)]
  rstd = gated_norm_pallas_gpu.forward(y, z, weight, 1e-5, jnp.bfloat16)[1]
  for bt, warps in cfgs:
    cfg = gated_norm_pallas_gpu.GatedNormGpuConfig(bt, warps, bt, warps)
    fn = jax.jit(lambda y, z, w, cfg=cfg: gated_norm_pallas_gpu.forward(
        y, z, w, 1e-5, jnp.bfloat16, cfg=cfg)[0])
    bwd = jax.jit(lambda y, z, r, w, g, cfg=cfg: gated_norm_pallas_gpu.backward(
        y, z, r, w, g, cfg=cfg))
    err = float(jnp.max(jnp.abs(fn(y, z, weight).astype(jnp.float32) - want)))
    name = "pallas[default]" if cfg == gated_norm_pallas_gpu.GatedNormGpuConfig() else ""
    out.append((name or f"pallas rows {bt} w{warps}", _median_ms(lambda: fn(y, z, weight), reps, inner),
                _median_ms(lambda: bwd(y, z, rstd, weight, d_out), reps, inner), err))
  return out


# Flags of this script only (mambaeye_jax.cli says why not absl's global FLAGS).
FLAGS = flags.FlagValues()
flags.DEFINE_bool("sweep", False, "also time other tiles of each kernel", flag_values=FLAGS)
flags.DEFINE_integer("reps", 7, "timed repetitions", flag_values=FLAGS)
flags.DEFINE_integer("inner", 10, "calls per repetition", flag_values=FLAGS)


def main():
  args = cli.parse_args(FLAGS, None, prog="bench_conv.py",
                        usage="python benchmarks/bench_conv.py [--sweep] [--reps N] [--inner N]",
                        description=__doc__)
  default = conv_pallas_gpu.ConvGpuConfig()
  cfgs = [("pallas[default]", default),
          ("pallas, float32 d(pre-act)", dataclasses.replace(default, bwd_dpre_f32=True)),
          ("pallas, one-pass backward", dataclasses.replace(default, bwd_two_pass=False))]
  if args.sweep:
    n = max(len(FWD_TILES), len(BWD_TILES))
    for i in range(n):
      f = FWD_TILES[i % len(FWD_TILES)]
      g = BWD_TILES[i % len(BWD_TILES)]
      cfgs.append((f"fwd {f[0]}x{f[1]} w{f[2]} / bwd {g[0]}x{g[1]} w{g[2]}",
                   conv_pallas_gpu.ConvGpuConfig(*f, *g)))
  print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}")
  print(f"{'shape':<18} {'impl':<34} {'fwd ms':>8} {'bwd ms':>8} {'floor f/b':>12} "
        f"{'err out':>8} {'err grad':>8}")
  for shape in SHAPES:
    elems = shape[0] * shape[1] * shape[2]
    floor = (2 * elems * 2 / 3.0e12 * 1e3, 3 * elems * 2 / 3.0e12 * 1e3)  # bf16 at 3 TB/s
    for name, fwd, bwd, e1, e2 in bench_shape(shape, cfgs, args.reps, args.inner):
      print(f"{'x'.join(map(str, shape)):<18} {name:<34} {fwd:8.3f} {bwd:8.3f} "
            f"{floor[0]:5.3f}/{floor[1]:5.3f} {e1:8.1e} {e2:8.1e}", flush=True)
  print(f"\n{'gated norm rows':<18} {'impl':<34} {'fwd ms':>8} {'bwd ms':>8} {'floor f/b':>12} "
        f"{'err out':>8}")
  for rows in (64 * 1024, 64 * 4096):
    # Forward: read y, z, write out; backward: read y, z, d_out, write dy, dz (bf16).
    floor = tuple(rows * 512 * 2 * k / 3.0e12 * 1e3 for k in (3, 5))
    cfgs = NORM_CFGS if args.sweep else NORM_CFGS[:1]
    for name, fwd, bwd, err in bench_gated_norm(rows, cfgs, args.reps, args.inner):
      print(f"{rows:<18} {name:<34} {fwd:8.3f} {bwd:8.3f} {floor[0]:5.3f}/{floor[1]:5.3f} "
            f"{err:8.1e}", flush=True)


if __name__ == "__main__":
  main()
