"""The conv + SiLU Pallas kernel against its references.

The case set runs in both modes of `kernel_cases` (interpreted on any
backend, compiled on a GPU); the rest checks tiling, dispatch and lowering.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import kernel_cases
import numpy as np
import pytest

from kernels import conv as conv_lib
from kernels import conv_pallas_gpu
from kernels import conv_reference


def _plain(x, kernel, bias, segment_ids):
  """Autodiff of the plain definition: the oracle for values and gradients."""
  return jax.nn.silu(conv_reference.causal_depthwise_conv(x, kernel, bias, segment_ids=segment_ids))


def _problem(b=2, t=48, c=64, taps=4, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  return (jax.random.normal(keys[0], (b, t, c)), jax.random.normal(keys[1], (taps, c)),
          jax.random.normal(keys[2], (c,)), jax.random.normal(keys[3], (b, t, c)))


SEGMENTS = {
    "none": None,
    # Runs crossing tile edges (16-token tiles at t = 48), a one-token segment
    # and a reused id (1 again) that must start a new segment.
    "packed": jnp.array([[1] * 14 + [2] * 3 + [3] + [1] * 30, [5] * 20 + [0] * 28]),
}


@dataclasses.dataclass(frozen=True)
class Case:
  """One conv problem; `reference` None: autodiff of the plain definition."""
  shape: tuple[int, int, int]  # (b, t, c)
  dtype: Any
  taps: int = 4
  segments: str = "none"
  cfg: conv_pallas_gpu.ConvGpuConfig = conv_pallas_gpu.ConvGpuConfig()
  # Against causal_conv_silu_reference, the XLA form of the same custom VJP
  # (bf16: both compute in float32 from the same bf16 inputs).
  xla_reference: bool = False
  tols: kernel_cases.Tols | None = None  # None: TOLS by dtype


TOLS = {
    jnp.float32: kernel_cases.Tols(out=kernel_cases.Close(1e-5, 1e-5),
                                   grad=kernel_cases.Close(1e-4, 1e-4)),
    # Equal up to bf16 rounding of the output and the incoming gradient.
    jnp.bfloat16: kernel_cases.Tols(out=kernel_cases.Close(1e-2, 1e-2),
                                    grad=kernel_cases.Close(2e-2, 2e-2)),
}

# Several tiles each way at t = 48, c = 64.
_SMALL = dict(block_t=16, block_c=32, bwd_block_t=16, bwd_block_c=32)
CASES = {
    f"f32_taps{taps}_{seg}_{'two' if two else 'one'}pass": Case(
        (2, 48, 64), jnp.float32, taps=taps, segments=seg,
        cfg=conv_pallas_gpu.ConvGpuConfig(**_SMALL, bwd_two_pass=two))
    for taps in (4, 2) for seg in sorted(SEGMENTS) for two in (True, False)
}
CASES.update({
    f"bf16_dpre_{'f32' if f32 else 'bf16'}": Case(
        (2, 64, 128), jnp.bfloat16, cfg=conv_pallas_gpu.ConvGpuConfig(bwd_dpre_f32=f32),
        xla_reference=True)
    for f32 in (True, False)
})
COMPILED_ONLY = {
    # Default tiles at MambaEye's width; sums over 4k tokens in dkernel, dbias.
    "f32_mambaeye": Case((4, 1024, 640), jnp.float32, tols=kernel_cases.Tols(
        out=kernel_cases.Close(1e-5, 1e-5), grad=kernel_cases.Close(1e-3, 1e-3))),
}


@kernel_cases.parametrize(CASES, COMPILED_ONLY)
def test_kernel_matches_reference(mode, case):
  b, t, c = case.shape
  x, kernel, bias, _ = _problem(b=b, t=t, c=c, taps=case.taps)
  seg = SEGMENTS[case.segments]

  def fused(x, kernel, bias):
    return conv_pallas_gpu.causal_conv_silu(x, kernel, bias, seg, case.dtype, cfg=case.cfg,
                                            interpret=kernel_cases.interpret(mode))

  def reference(x, kernel, bias):
    if case.xla_reference:
      return conv_reference.causal_conv_silu_reference(x, kernel, bias, seg, case.dtype)
    return _plain(x, kernel, bias, seg)

  kernel_cases.check_outputs_and_grads(
      fused, reference, dict(x=x.astype(case.dtype), kernel=kernel, bias=bias),
      case.tols or kernel_cases.tols_for(TOLS, case.dtype))


def test_tiles_and_unsupported_shapes():
  assert conv_pallas_gpu.tiles(1024, 640) == (64, 64)
  assert conv_pallas_gpu.tiles(1024, 640, 32, 128) == (32, 128)
  assert conv_pallas_gpu.tiles(48, 96) == (16, 32)
  assert conv_pallas_gpu.tiles(50, 640) is None
  x, kernel, bias, _ = _problem(t=50)
  with pytest.raises(ValueError, match="length % 16 == 0"):
    conv_pallas_gpu.forward(x, kernel, bias, None, jnp.float32, interpret=True)


def test_dispatch_falls_back_to_xla_for_odd_lengths():
  x, kernel, bias, _ = _problem(t=50)
  assert not conv_lib.uses_kernel("pallas_interpret", x.shape)
  assert conv_lib.uses_kernel("pallas_interpret", (2, 48, 64))
  assert not conv_lib.uses_kernel("chunked", (2, 48, 64))
  got = conv_lib.causal_conv_silu(x, kernel, bias, None, jnp.float32, impl="pallas_interpret")
  np.testing.assert_allclose(got, _plain(x, kernel, bias, None), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_segments", [False, True])
def test_kernels_lower_for_cuda(with_segments, cuda_lowering):
  """The Triton lowering of forward and backward succeeds (no GPU needed)."""
  x = jnp.zeros((2, 96, 640), jnp.bfloat16)
  kernel, bias = jnp.zeros((4, 640)), jnp.zeros((640,))
  seg = jnp.ones((2, 96), jnp.int32) if with_segments else None

  def loss(x, k, b):
    return conv_pallas_gpu.causal_conv_silu(x, k, b, seg, jnp.bfloat16).astype(jnp.float32).sum()

  text = cuda_lowering(jax.value_and_grad(loss, argnums=(0, 1, 2)), x, kernel, bias)
  assert "conv_silu_fwd" in text and "conv_silu_bwd" in text
