"""The gated RMSNorm Pallas kernels against their references.

The case set runs in both modes of `kernel_cases` (interpreted on any
backend, compiled on a GPU) through the layer's custom VJP; the rest checks
the saved 1/rms, the XLA fallback and the CUDA lowering.
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import kernel_cases
import numpy as np
import pytest

from kernels import gated_norm_pallas_gpu
from kernels import norms


def _inputs(shape, dtype=jnp.float32):
  ky, kz, kw, kc = jax.random.split(jax.random.key(0), 4)
  return (jax.random.normal(ky, shape, dtype), jax.random.normal(kz, shape, dtype),
          1.0 + 0.1 * jax.random.normal(kw, shape[-1:]), jax.random.normal(kc, shape, dtype))


def _plain(y, z, weight, out_dtype):
  """Autodiff of the plain definition: the oracle for values and gradients."""
  gated = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
  return norms.rms_normalize(gated, weight).astype(out_dtype)


@dataclasses.dataclass(frozen=True)
class Case:
  """One norm problem; rows per example (shape[1]) a multiple of 16, so the
  kernel takes it."""
  shape: tuple[int, int, int]
  dtype: Any
  # Against the layer's XLA custom VJP instead of plain autodiff.
  xla_reference: bool = False
  tols: kernel_cases.Tols | None = None  # None: TOLS by dtype


TOLS = {
    jnp.float32: kernel_cases.Tols(out=kernel_cases.Close(1e-5, 1e-5),
                                   grad=kernel_cases.Close(1e-4, 1e-4)),
    # bf16 inputs, output and incoming gradient; float32 inside both.
    jnp.bfloat16: kernel_cases.Tols(out=kernel_cases.Close(1e-2, 1e-2),
                                    grad=kernel_cases.Close(3e-2, 3e-2)),
}
CASES = {
    "f32_64x128": Case((1, 64, 128), jnp.float32),
    "bf16_64x128": Case((1, 64, 128), jnp.bfloat16),
    "f32_48x64": Case((1, 48, 64), jnp.float32),
    "bf16_48x64": Case((1, 48, 64), jnp.bfloat16),
    # The same custom VJP with and without the kernels: equal to float32
    # rounding, so a tighter gradient bound than against autodiff.
    "f32_batch2_vs_xla": Case((2, 32, 64), jnp.float32, xla_reference=True,
                              tols=kernel_cases.Tols(out=kernel_cases.Close(1e-5, 1e-5),
                                                     grad=kernel_cases.Close(1e-5, 1e-5))),
}
COMPILED_ONLY = {
    # dweight sums 4k rows: an absolute bound of its size.
    "f32_mambaeye_vs_xla": Case((4, 1024, 512), jnp.float32, xla_reference=True,
                                tols=kernel_cases.Tols(out=kernel_cases.Close(1e-5, 1e-5),
                                                       grad=kernel_cases.Close(1e-4, 1e-3))),
}


@kernel_cases.parametrize(CASES, COMPILED_ONLY)
def test_kernels_match_reference(mode, case):
  y, z, weight, _ = _inputs(case.shape, case.dtype)
  d = case.shape[-1]
  layer = lambda impl: lambda y, z, weight: norms.gated_rms_norm(y, z, weight, 1e-5, d,
                                                                 case.dtype, impl)
  reference = layer(None) if case.xla_reference else functools.partial(_plain,
                                                                        out_dtype=case.dtype)
  kernel_cases.check_outputs_and_grads(layer(mode), reference, dict(y=y, z=z, weight=weight),
                                       case.tols or kernel_cases.tols_for(TOLS, case.dtype))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("mode", kernel_cases.MODES)
def test_forward_saves_rstd(mode, dtype):
  """The 1/rms per row that the backward reads."""
  y, z, weight, _ = _inputs((64, 128), dtype)
  _, rstd = gated_norm_pallas_gpu.forward(y, z, weight, 1e-5, dtype,
                                          interpret=kernel_cases.interpret(mode))
  gated = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
  np.testing.assert_allclose(rstd, jax.lax.rsqrt(jnp.mean(gated ** 2, -1) + 1e-5), rtol=1e-5)


def test_unsupported_shapes_use_xla_or_fail_clearly():
  assert not gated_norm_pallas_gpu.supported(64, 96, 96)   # not a power of two
  assert not gated_norm_pallas_gpu.supported(64, 128, 64)  # several groups
  assert not gated_norm_pallas_gpu.supported(20, 128, 128)  # rows not a multiple of 16
  y, z, weight, _ = _inputs((2, 32, 96))
  got = norms.gated_rms_norm(y, z, weight, 1e-5, 96, jnp.float32, "pallas_interpret")  # XLA
  np.testing.assert_allclose(got, norms.gated_rms_norm(y, z, weight, 1e-5, 96, jnp.float32))
  with pytest.raises(ValueError, match="power-of-two"):
    gated_norm_pallas_gpu.forward(y.reshape(-1, 96), z.reshape(-1, 96), weight, 1e-5,
                                  jnp.float32, interpret=True)


def test_kernel_lowers_for_cuda(cuda_lowering):
  y = jnp.zeros((4096, 512), jnp.bfloat16)

  def both(y, z, w):
    out, rstd = gated_norm_pallas_gpu.forward(y, z, w, 1e-5, jnp.bfloat16)
    return out, gated_norm_pallas_gpu.backward(y, z, rstd, w, out)

  text = cuda_lowering(both, y, y, jnp.ones((512,)))
  assert "gated_norm_fwd" in text and "gated_norm_bwd" in text
