"""The fused layers' custom VJPs against autodiff of their plain definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import conv_reference
from kernels import norms
from mambaeye_jax import layers


def _plain_gated_norm(y, z, weight, eps, group_size):
  gated = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
  return norms.rms_normalize(gated, weight, eps, group_size)


def _plain_conv_silu(x, kernel, bias, segment_ids):
  return jax.nn.silu(conv_reference.causal_depthwise_conv(x, kernel, bias, segment_ids=segment_ids))


def _inputs(shape, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  return [jax.random.normal(k, shape, jnp.float32) for k in keys]


@pytest.mark.parametrize("group_size", [16, 64])
def test_gated_rms_norm_matches_autodiff(group_size):
  y, z, cot, _ = _inputs((2, 5, 64))
  weight = 1.0 + 0.1 * jax.random.normal(jax.random.key(7), (64,))
  fused = lambda y, z, w: norms.gated_rms_norm(y, z, w, 1e-5, group_size, jnp.float32)
  plain = lambda y, z, w: _plain_gated_norm(y, z, w, 1e-5, group_size)
  np.testing.assert_allclose(fused(y, z, weight), plain(y, z, weight), rtol=1e-5, atol=1e-5)
  _, vjp_fused = jax.vjp(fused, y, z, weight)
  _, vjp_plain = jax.vjp(plain, y, z, weight)
  for got, want, name in zip(vjp_fused(cot), vjp_plain(cot), ("dy", "dz", "dweight")):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=name)


def test_gated_rms_norm_keeps_input_dtypes():
  y, z, cot, _ = (v.astype(jnp.bfloat16) for v in _inputs((2, 3, 32)))
  weight = jnp.ones((32,))
  fn = lambda y, z, w: norms.gated_rms_norm(y, z, w, 1e-5, 32, jnp.bfloat16)
  out, vjp = jax.vjp(fn, y, z, weight)
  dy, dz, dw = vjp(cot)
  assert out.dtype == jnp.bfloat16
  assert (dy.dtype, dz.dtype, dw.dtype) == (jnp.bfloat16, jnp.bfloat16, jnp.float32)
  want = _plain_gated_norm(y, z, weight, 1e-5, 32)
  np.testing.assert_allclose(out.astype(jnp.float32), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("with_segments", [False, True])
def test_causal_conv_silu_matches_autodiff(with_segments):
  x, cot, _, _ = _inputs((2, 11, 6))
  kernel, bias = jax.random.normal(jax.random.key(3), (4, 6)), jnp.linspace(-1, 1, 6)
  # Segments of lengths 3, 1, 4, 3 and a reused id (1 again) that must restart.
  segment_ids = (jnp.array([[1, 1, 1, 2, 3, 3, 3, 3, 1, 1, 1]] * 2) if with_segments else None)
  fused = lambda x, k, b: conv_reference.causal_conv_silu_reference(x, k, b, segment_ids, jnp.float32)
  plain = lambda x, k, b: _plain_conv_silu(x, k, b, segment_ids)
  np.testing.assert_allclose(fused(x, kernel, bias), plain(x, kernel, bias),
                             rtol=1e-5, atol=1e-6)
  _, vjp_fused = jax.vjp(fused, x, kernel, bias)
  _, vjp_plain = jax.vjp(plain, x, kernel, bias)
  for got, want, name in zip(vjp_fused(cot), vjp_plain(cot), ("dx", "dkernel", "dbias")):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=name)


def test_causal_conv_silu_segments_are_separate():
  """A token's output never depends on another segment's inputs."""
  x, _, _, _ = _inputs((1, 8, 3))
  kernel, bias = jax.random.normal(jax.random.key(1), (4, 3)), jnp.zeros(3)
  segment_ids = jnp.array([[1, 1, 1, 1, 2, 2, 2, 2]])
  jac = jax.jacobian(lambda x: conv_reference.causal_conv_silu_reference(x, kernel, bias, segment_ids,
                                                        jnp.float32))(x)
  # d out[t] / d x[s] for t in the second segment and s in the first is zero.
  np.testing.assert_array_equal(jac[0, 4:, :, 0, :4, :], 0.0)
  assert np.abs(jac[0, 4:, :, 0, 4:, :]).max() > 0


def test_causal_conv_silu_under_jit_with_bf16():
  x, cot, _, _ = _inputs((2, 9, 8))
  kernel, bias = jax.random.normal(jax.random.key(3), (4, 8)), jnp.zeros(8)
  x16 = x.astype(jnp.bfloat16)
  fn = jax.jit(lambda x, k, b: conv_reference.causal_conv_silu_reference(x, k, b, None, jnp.bfloat16))
  out, vjp = jax.vjp(fn, x16, kernel, bias)
  dx, dk, db = vjp(cot.astype(jnp.bfloat16))
  assert out.dtype == dx.dtype == jnp.bfloat16 and dk.dtype == db.dtype == jnp.float32
  _, vjp_plain = jax.vjp(lambda x, k, b: _plain_conv_silu(x, k, b, None), x16, kernel, bias)
  want_dx, want_dk, _ = vjp_plain(cot)
  np.testing.assert_allclose(dx.astype(jnp.float32), want_dx, rtol=2e-2, atol=2e-2)
  np.testing.assert_allclose(dk, want_dk, rtol=2e-2, atol=2e-2)


def test_dense_matches_autodiff_in_float32():
  keys = jax.random.split(jax.random.key(3), 4)
  x = jax.random.normal(keys[0], (2, 5, 8))
  kernel, bias = jax.random.normal(keys[1], (8, 3)), jax.random.normal(keys[2], (3,))
  cot = jax.random.normal(keys[3], (2, 5, 3))
  out, vjp = jax.vjp(lambda x, k, b: layers.dense(x, k, b, jnp.float32), x, kernel, bias)
  want, vjp_want = jax.vjp(lambda x, k, b: x @ k + b, x, kernel, bias)
  np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)
  for got, ref in zip(vjp(cot), vjp_want(cot)):
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  assert vjp(cot)[2] is not None
  _, vjp_nobias = jax.vjp(lambda x, k: layers.dense(x, k, None, jnp.float32), x, kernel)
  np.testing.assert_allclose(vjp_nobias(cot)[1], vjp_want(cot)[1], rtol=1e-5, atol=1e-5)


def test_dense_bf16_weight_gradient_is_a_float32_product():
  # The weight's gradient leaves its product in float32 (so a data-parallel
  # sum of it is float32): exact against float32 math on the bf16 operands,
  # where autodiff of the plain bf16 product rounds it to bf16 first.
  keys = jax.random.split(jax.random.key(4), 3)
  x = jax.random.normal(keys[0], (64, 32))
  kernel = jax.random.normal(keys[1], (32, 16))
  cot = jax.random.normal(keys[2], (64, 16)).astype(jnp.bfloat16)
  out, vjp = jax.vjp(lambda x, k: layers.dense(x, k, None, jnp.bfloat16), x, kernel)
  assert out.dtype == jnp.bfloat16
  dx, dk = vjp(cot)
  assert dx.dtype == jnp.float32 and dk.dtype == jnp.float32
  x16 = x.astype(jnp.bfloat16).astype(jnp.float32)
  exact = np.asarray(x16).T @ np.asarray(cot.astype(jnp.float32))
  np.testing.assert_allclose(dk, exact, rtol=1e-5, atol=1e-4)
  plain = jax.vjp(lambda x, k: x.astype(jnp.bfloat16) @ k.astype(jnp.bfloat16), x, kernel)[1]
  assert float(jnp.max(jnp.abs(plain(cot)[1] - exact))) > 1e-3  # bf16-rounded
  jaxpr = str(jax.make_jaxpr(lambda k: vjp(cot)[1])(kernel))
  assert "preferred_element_type=float32" in jaxpr
