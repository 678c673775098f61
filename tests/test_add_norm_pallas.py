"""The fused residual add + RMSNorm: XLA custom VJP and Pallas kernels vs autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import add_norm_pallas_gpu
from kernels import norms


def _plain(hidden, residual, weight):
  s = hidden.astype(jnp.float32) + residual
  return s, norms.rms_normalize(s, weight)


def _inputs(shape, hidden_dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(0), 5)
  return (jax.random.normal(keys[0], shape, hidden_dtype), jax.random.normal(keys[1], shape),
          1.0 + 0.1 * jax.random.normal(keys[2], shape[-1:]),
          (jax.random.normal(keys[3], shape), jax.random.normal(keys[4], shape)))


@pytest.mark.parametrize("kernel", [None, "pallas_interpret"])
def test_matches_autodiff_of_the_plain_form(kernel):
  hidden, residual, weight, cot = _inputs((2, 32, 64))
  fused = lambda h, r, w: norms.add_rms_norm(h, r, w, 1e-5, jnp.float32, kernel)
  (s, normed), vjp = jax.vjp(fused, hidden, residual, weight)
  (s0, normed0), vjp0 = jax.vjp(_plain, hidden, residual, weight)
  np.testing.assert_allclose(s, s0, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(normed, normed0, rtol=1e-5, atol=1e-5)
  for got, want, name in zip(vjp(cot), vjp0(cot), ("dhidden", "dresidual", "dweight")):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("kernel", [None, "pallas_interpret"])
def test_copies_take_their_gradients_apart(kernel):
  # Three consumers of normed: their gradients reach the backward separately
  # and must add up to autodiff's through one output.
  hidden, residual, weight, (ds, dn) = _inputs((2, 32, 64))
  parts = (dn, 0.5 * dn[::-1], jnp.cos(dn))
  fused = lambda h, r, w: norms.add_rms_norm(h, r, w, 1e-5, jnp.float32, kernel, copies=3)
  (s, normed), vjp = jax.vjp(fused, hidden, residual, weight)
  assert isinstance(normed, tuple) and len(normed) == 3
  (s0, normed0), vjp0 = jax.vjp(_plain, hidden, residual, weight)
  for n in normed:
    np.testing.assert_allclose(n, normed0, rtol=1e-5, atol=1e-5)
  for got, want, name in zip(vjp((ds, parts)), vjp0((ds, sum(parts))),
                             ("dhidden", "dresidual", "dweight")):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=name)
  with pytest.raises(ValueError, match="copies"):
    norms.add_rms_norm(hidden, residual, weight, 1e-5, jnp.float32, kernel, copies=0)


def test_kernel_keeps_dtypes_and_matches_xla_in_bf16():
  hidden, residual, weight, (ds, dn) = _inputs((2, 64, 128), jnp.bfloat16)
  dn = dn.astype(jnp.bfloat16)
  for kernel in (None, "pallas_interpret"):
    fn = lambda h, r, w, k=kernel: norms.add_rms_norm(h, r, w, 1e-5, jnp.bfloat16, k)
    (s, normed), vjp = jax.vjp(fn, hidden, residual, weight)
    dh, dr, dw = vjp((ds, dn))
    assert (s.dtype, normed.dtype) == (jnp.float32, jnp.bfloat16)
    assert (dh.dtype, dr.dtype, dw.dtype) == (jnp.bfloat16, jnp.float32, jnp.float32)
    if kernel is None:
      want = (normed, dr, dw)
  np.testing.assert_allclose(normed.astype(jnp.float32), want[0].astype(jnp.float32),
                             rtol=1e-2, atol=1e-2)
  np.testing.assert_allclose(dr, want[1], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dw, want[2], rtol=1e-3, atol=1e-3)


def test_unsupported_shapes():
  assert not add_norm_pallas_gpu.supported(64, 96)
  assert not add_norm_pallas_gpu.supported(48, 256)
  hidden, residual, weight, _ = _inputs((2, 48, 96))
  got = norms.add_rms_norm(hidden, residual, weight, 1e-5, jnp.float32, "pallas_interpret")  # XLA
  np.testing.assert_allclose(got[1], _plain(hidden, residual, weight)[1], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="power-of-two"):
    add_norm_pallas_gpu.forward(hidden.reshape(-1, 96), residual.reshape(-1, 96), weight, 1e-5,
                                jnp.float32, interpret=True)


def test_kernels_lower_for_cuda(cuda_lowering):
  x = jnp.zeros((4096, 256), jnp.bfloat16)

  def both(h, r, w):
    s, normed, rstd = add_norm_pallas_gpu.forward(h, r, w, 1e-5, jnp.bfloat16)
    return add_norm_pallas_gpu.backward(s, rstd, w, s, [normed] * 4, jnp.bfloat16, jnp.float32)

  text = cuda_lowering(both, x, x.astype(jnp.float32), jnp.ones((256,)))
  assert "add_norm_fwd" in text and "add_norm_bwd" in text


@pytest.mark.gpu
def test_compiled_kernels_match_xla_on_gpu():
  if jax.default_backend() != "gpu":
    pytest.skip("needs a GPU")
  hidden, residual, weight, cot = _inputs((4, 1024, 256))
  fn = lambda k: jax.jit(lambda h, r, w: norms.add_rms_norm(h, r, w, 1e-5, jnp.float32, k))
  out, vjp = jax.vjp(fn("pallas"), hidden, residual, weight)
  want, vjp_want = jax.vjp(fn(None), hidden, residual, weight)
  for got, ref in zip(out, want):
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  for got, ref in zip(vjp(cot), vjp_want(cot)):
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-3)
