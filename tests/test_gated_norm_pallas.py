"""The gated RMSNorm Pallas kernels against the XLA reference (interpret mode)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import gated_norm_pallas_gpu
from kernels import norms


def _inputs(shape, dtype=jnp.float32):
  ky, kz, kw, kc = jax.random.split(jax.random.key(0), 4)
  return (jax.random.normal(ky, shape, dtype), jax.random.normal(kz, shape, dtype),
          1.0 + 0.1 * jax.random.normal(kw, shape[-1:]), jax.random.normal(kc, shape, dtype))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_forward_matches_xla(dtype):
  y, z, weight, _ = _inputs((64, 128), dtype)
  out, rstd = gated_norm_pallas_gpu.forward(y, z, weight, 1e-5, dtype, interpret=True)
  want = norms.gated_rms_norm(y, z, weight, 1e-5, 128, dtype)
  tol = 1e-5 if dtype == jnp.float32 else 1e-2
  np.testing.assert_allclose(out.astype(jnp.float32), want.astype(jnp.float32),
                             rtol=tol, atol=tol)
  gated = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
  np.testing.assert_allclose(rstd, jax.lax.rsqrt(jnp.mean(gated ** 2, -1) + 1e-5), rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_backward_matches_autodiff(dtype):
  y, z, weight, cot = _inputs((48, 64), dtype)
  _, rstd = gated_norm_pallas_gpu.forward(y, z, weight, 1e-5, dtype, interpret=True)
  got = gated_norm_pallas_gpu.backward(y, z, rstd, weight, cot, interpret=True)

  def plain(y, z, w):
    gated = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
    return norms.rms_normalize(gated, w).astype(dtype)

  want = jax.vjp(plain, y, z, weight)[1](cot)
  tol = 1e-4 if dtype == jnp.float32 else 3e-2
  for g, w, name in zip(got, want, ("dy", "dz", "dweight")):
    assert g.dtype == w.dtype, name
    np.testing.assert_allclose(g.astype(jnp.float32), w.astype(jnp.float32), rtol=tol,
                               atol=tol, err_msg=name)


def test_layer_with_kernel_gives_same_values_and_gradients():
  """Both kernels inside the layer's custom VJP agree with the XLA path."""
  y, z, weight, cot = _inputs((2, 32, 64))
  with_kernel = lambda y, z, w: norms.gated_rms_norm(y, z, w, 1e-5, 64, jnp.float32,
                                                      "pallas_interpret")
  xla = lambda y, z, w: norms.gated_rms_norm(y, z, w, 1e-5, 64, jnp.float32)
  out, vjp = jax.vjp(with_kernel, y, z, weight)
  want, vjp_want = jax.vjp(xla, y, z, weight)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  for got, ref in zip(vjp(cot), vjp_want(cot)):
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


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


@pytest.mark.gpu
def test_compiled_kernels_match_xla_on_gpu():
  if jax.default_backend() != "gpu":
    pytest.skip("needs a GPU")
  y, z, weight, cot = _inputs((4, 1024, 512))
  with_kernel = jax.jit(lambda y, z, w: norms.gated_rms_norm(y, z, w, 1e-5, 512, jnp.float32,
                                                              "pallas"))
  xla = jax.jit(lambda y, z, w: norms.gated_rms_norm(y, z, w, 1e-5, 512, jnp.float32))
  out, vjp = jax.vjp(with_kernel, y, z, weight)
  want, vjp_want = jax.vjp(xla, y, z, weight)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  for got, ref in zip(vjp(cot), vjp_want(cot)):
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-3)
