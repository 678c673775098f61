"""Tests of the Pallas SSD kernels against the sequential oracle.

One case set, run in both modes of `kernel_cases`: compiled on a GPU
(skipped without one) and with `interpret=True`, which runs the same kernel
logic on the CPU; each case compares outputs and gradients w.r.t. every
input. The CPU run is kept small: blocks of 16 tokens, so that short
sequences still span several chunks and splits.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import conftest
import kernel_cases
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from kernels import ssd_pallas as ssd_pallas_mod
from kernels import ssd_pallas_gpu
from kernels import ssd_pallas_tpu
from kernels.ssd_reference import ssd_sequential

SSDGpuConfig = ssd_pallas_gpu.SSDGpuConfig

# Relative L2 error bounds (||out - ref|| / ||ref||), outputs and gradients.
# float32 kernels use IEEE float32 products and agree to ~1e-6; bf16
# operands round inputs of the products to 8 bits (~4e-3 per rounding).
TOLS = {
    jnp.float32: kernel_cases.Tols(out=kernel_cases.RelL2(2e-5), grad=kernel_cases.RelL2(2e-5)),
    jnp.bfloat16: kernel_cases.Tols(out=kernel_cases.RelL2(1.5e-2),
                                    grad=kernel_cases.RelL2(1.5e-2)),
}


def _inputs(seed, b, l, h, p, g, n, dtype, *, seg, init):
  """Random SSD inputs; dt before the bias / softplus."""
  ks = jax.random.split(jax.random.PRNGKey(seed), 9)
  x = jax.random.normal(ks[0], (b, l, h, p)).astype(dtype)
  # Step sizes ~0.1 after the softplus: decays over a chunk stay visible.
  dt = jax.random.normal(ks[1], (b, l, h)) * 0.5 - 2.5
  A = -jnp.exp(jax.random.uniform(ks[2], (h,), minval=-1.0, maxval=1.5))
  B = jax.random.normal(ks[3], (b, l, g, n)).astype(dtype)
  C = jax.random.normal(ks[4], (b, l, g, n)).astype(dtype)
  D = jax.random.normal(ks[5], (h,))
  dt_bias = jax.random.normal(ks[6], (h,)) * 0.3
  s0 = jax.random.normal(ks[7], (b, h, p, n)) if init else None
  sid = None
  if seg:
    # A few resets per row, one of them right at a chunk start (token 16).
    flips = jax.random.bernoulli(ks[8], 0.06, (b, l)).at[:, 16].set(True)
    sid = jnp.cumsum(flips.astype(jnp.int32), axis=1) * 7 - 3
  return (x, dt, A, B, C, D, dt_bias, s0), sid


@dataclasses.dataclass(frozen=True)
class Case:
  """One SSD problem; shape is (b, l, h, p, g, n)."""
  shape: tuple[int, int, int, int, int, int]
  dtype: Any
  cfg: SSDGpuConfig = SSDGpuConfig(block_q=16, bwd_block_q=16)
  seg: bool = False  # segment ids, resets at random and at token 16
  init: bool = False  # an initial state
  final: bool = False  # return the final state too
  # D, dt_bias and the softplus: all optional; without them the kernels
  # drop the skip connection and the gradient flows to the raw dt.
  skip_bias_softplus: bool = True
  seed: int = 0


CASES = {
    "odd_length_f32": Case((2, 37, 2, 16, 1, 16), jnp.float32),
    "split_groups_segments_bf16": Case(
        (2, 100, 4, 16, 2, 32), jnp.bfloat16, seg=True, init=True, final=True,
        cfg=SSDGpuConfig(block_q=16, bwd_block_q=16, split_chunks=2)),
    # headdim 24 and d_state 8 are padded inside to 32 and 16.
    "unpadded_dims_f32": Case((1, 33, 2, 24, 1, 8), jnp.float32, init=True, final=True),
    "segments_final_f32": Case((1, 70, 2, 32, 1, 16), jnp.float32, seg=True, final=True,
                               seed=1),
    "split_groups_initial_f32": Case(
        (2, 53, 4, 16, 2, 16), jnp.float32, seg=True, init=True, final=True, seed=1,
        cfg=SSDGpuConfig(block_q=16, bwd_block_q=16, split_chunks=1)),
    "bf16": Case((1, 75, 2, 16, 1, 32), jnp.bfloat16, init=True, seed=1,
                 cfg=SSDGpuConfig(block_q=32, bwd_block_q=16, split_chunks=1)),
    "no_skip_no_bias_no_softplus_f32": Case((1, 40, 2, 16, 1, 16), jnp.float32,
                                            skip_bias_softplus=False, seed=3),
}
COMPILED_ONLY = {
    # Default tiles (64-token chunks), MambaEye head sizes, several chunks.
    "default_config_mambaeye_like": Case((2, 300, 8, 64, 1, 64), jnp.bfloat16, seg=True,
                                         init=True, final=True, cfg=SSDGpuConfig(), seed=1),
    # d_state 128: the backward resolves to 32-token chunks, no pipelining.
    "default_config_lm_state_bf16": Case((1, 300, 4, 64, 1, 128), jnp.bfloat16, seg=True,
                                         init=True, final=True, cfg=SSDGpuConfig(), seed=1),
    "default_config_long_split_f32": Case((1, 2000, 2, 64, 1, 128), jnp.float32, final=True,
                                          cfg=SSDGpuConfig()),
}


@kernel_cases.parametrize(CASES, COMPILED_ONLY)
def test_kernel_matches_oracle(mode, case):
  (x, dt, A, B, C, D, dt_bias, s0), sid = _inputs(case.seed, *case.shape, case.dtype,
                                                  seg=case.seg, init=case.init)
  args = dict(x=x, dt=dt, A=A, B=B, C=C)
  if case.skip_bias_softplus:
    args.update(D=D, dt_bias=dt_bias)
  else:
    args["dt"] = jax.nn.softplus(dt)
  if case.init:
    args["initial_state"] = s0
  kw = dict(dt_softplus=case.skip_bias_softplus, segment_ids=sid,
            return_final_state=case.final)

  def named(out):
    return dict(y=out[0], final=out[1]) if case.final else dict(y=out)

  def kernel(x, dt, A, B, C, D=None, **opt):
    return named(ssd_pallas_mod.ssd_pallas(x, dt, A, B, C, D, **opt, **kw, config=case.cfg,
                                           interpret=kernel_cases.interpret(mode)))

  def oracle(x, dt, A, B, C, D=None, **opt):
    return named(ssd_sequential(x, dt, A, B, C, D, **opt, **kw))

  kernel_cases.check_outputs_and_grads(kernel, oracle, args,
                                       kernel_cases.tols_for(TOLS, case.dtype),
                                       seed=case.seed + 7)


@pytest.mark.parametrize("mode", kernel_cases.MODES)
def test_packed_bc_matches_separate_b_and_c(mode):
  # B and C in one (b, l, 2 g, n) array, C's groups read at an offset: two
  # groups of two heads, a split length and segments, so every index map
  # and the gradient's packing are exercised.
  cfg = SSDGpuConfig(block_q=16, bwd_block_q=16, split_chunks=1)
  args, sid = _inputs(4, 2, 53, 4, 16, 2, 16, jnp.float32, seg=True, init=False)
  x, dt, A, B, C, D, dt_bias, _ = args
  kw = dict(dt_bias=dt_bias, dt_softplus=True, segment_ids=sid,
            interpret=kernel_cases.interpret(mode), config=cfg)
  separate = lambda x, dt, B, C: ssd_pallas_mod.ssd_pallas(x, dt, A, B, C, D, **kw)
  packed = lambda x, dt, bc: ssd_pallas_mod.ssd_pallas(x, dt, A, bc, None, D, **kw)
  y, vjp = jax.vjp(separate, x, dt, B, C)
  y_packed, vjp_packed = jax.vjp(packed, x, dt, jnp.concatenate([B, C], axis=2))
  np.testing.assert_allclose(y_packed, y, rtol=1e-6, atol=1e-6)
  cot = jax.random.normal(jax.random.PRNGKey(5), y.shape)
  dx, ddt, dB, dC = vjp(cot)
  dx_p, ddt_p, dbc = vjp_packed(cot)
  assert dbc.shape == (2, 53, 4, 16)
  for got, want in ((dx_p, dx), (ddt_p, ddt), (dbc, jnp.concatenate([dB, dC], axis=2))):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


# ---- configuration and dispatch (no kernels run) ---------------------------


def test_config_validation_messages():
  with pytest.raises(ValueError, match="block_q=48"):
    SSDGpuConfig(block_q=48)
  with pytest.raises(ValueError, match="num_warps=3"):
    SSDGpuConfig(num_warps=3)
  with pytest.raises(ValueError, match="split_chunks=0"):
    SSDGpuConfig(split_chunks=0)


def test_config_resolved_by_state_size():
  cfg = SSDGpuConfig()
  assert cfg.resolved(64, 64).bwd_block_q == 64
  assert cfg.resolved(64, 64).bwd_num_stages == 2
  assert cfg.resolved(64, 128).bwd_block_q == 32
  assert cfg.resolved(64, 128).bwd_num_stages == 1
  # Explicit values are kept.
  assert SSDGpuConfig(bwd_block_q=16).resolved(64, 128).bwd_block_q == 16


def test_split_plan_by_shape():
  cfg = SSDGpuConfig()
  # Many sequences: one split. Few long ones: split until ~2 programs per SM.
  assert ssd_pallas_gpu.split_plan(256, 8, 256, cfg) == (1, 256)
  s, n = ssd_pallas_gpu.split_plan(4, 8, 16384, cfg)
  assert s > 1 and 4 * 8 * s >= cfg.min_programs and s * n >= 16384
  s, n = ssd_pallas_gpu.split_plan(1, 1, 1000, cfg)
  assert s * n >= 1000 and n % 64 == 0


def test_cpu_without_interpret_raises():
  if jax.default_backend() != "cpu":
    pytest.skip("checks the CPU dispatch")
  args, _ = _inputs(0, 1, 8, 1, 16, 1, 16, jnp.float32, seg=False, init=False)
  with pytest.raises(ValueError, match="interpret=True"):
    ssd_pallas_mod.ssd_pallas(*args[:6])


def test_tpu_dispatch(monkeypatch):
  """On TPU, ssd_pallas hands everything to kernels.ssd_pallas_tpu."""
  monkeypatch.setattr(ssd_pallas_mod.jax, "default_backend", lambda: "tpu")
  args, _ = _inputs(0, 1, 8, 1, 16, 1, 16, jnp.float32, seg=False, init=False)
  calls = []

  def fake(*a, **kw):
    calls.append((a, kw))
    return "from-tpu"

  monkeypatch.setattr(ssd_pallas_tpu, "ssd_pallas_tpu", fake)
  out = ssd_pallas_mod.ssd_pallas(*args[:6], dt_softplus=True, chunk_size=64,
                                  return_final_state=True)
  assert out == "from-tpu" and len(calls) == 1
  assert calls[0][0][0] is args[0]
  assert calls[0][1]["dt_softplus"] and calls[0][1]["chunk_size"] == 64
  assert calls[0][1]["return_final_state"]


def test_bench_smoke_runs_and_checks():
  """`python benchmarks/bench_ssd.py --smoke` checks the kernel and times it."""
  bench_ssd = conftest.load_benchmark("bench_ssd")
  rows = bench_ssd.main(["--smoke", "--impls", "pallas,chunked",
                         "--modes", "fwdbwd"])
  pallas = [r for r in rows if r["impl"].startswith("pallas")]
  assert len(pallas) == 2 and all("error" not in r for r in rows)
  for r in pallas:
    assert r["err_y"] < 1e-2 and r["err_g"] < 1.5e-2 and r["fwdbwd"] > 0


def test_bench_flags_parse_lists_and_repeated_configs():
  """bench_ssd's absl flags: comma lists, a repeated --configs (each one a
  comma list itself), and a clear exit 2 on an unknown implementation."""
  bench_ssd = conftest.load_benchmark("bench_ssd")
  args = bench_ssd.cli.parse_args(
      bench_ssd.FLAGS, ["--lengths", "256,1024", "--impls", "pallas,chunked",
                        "--configs", "block_q=64", "--configs", "block_q=128,num_warps=8"],
      prog="bench_ssd.py", usage="", description="")
  assert args.lengths == (256, 1024) and args.impls == ("pallas", "chunked")
  assert args.configs == ["block_q=64", "block_q=128,num_warps=8"]
  assert [s.l for s in bench_ssd.shapes_for("mambaeye", args.lengths, 65536)] == [256, 1024]
  with pytest.raises(SystemExit) as exit_info:
    bench_ssd.main(["--impls", "pallas,triton"])
  assert exit_info.value.code == 2
