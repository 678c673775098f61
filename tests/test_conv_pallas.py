"""The conv + SiLU Pallas kernel against its references (interpret mode on CPU)."""

import jax
import jax.numpy as jnp
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


@pytest.mark.parametrize("two_pass", [True, False])
@pytest.mark.parametrize("segments", sorted(SEGMENTS))
@pytest.mark.parametrize("taps", [4, 2])
def test_kernel_matches_oracle_values_and_gradients(segments, taps, two_pass):
  x, kernel, bias, cot = _problem(taps=taps)
  seg = SEGMENTS[segments]
  cfg = conv_pallas_gpu.ConvGpuConfig(block_t=16, block_c=32, bwd_block_t=16, bwd_block_c=32,
                                       bwd_two_pass=two_pass)  # Several tiles each way.
  fused = lambda x, k, b: conv_pallas_gpu.causal_conv_silu(x, k, b, seg, jnp.float32, cfg=cfg,
                                                           interpret=True)
  plain = lambda x, k, b: _plain(x, k, b, seg)
  out, vjp = jax.vjp(fused, x, kernel, bias)
  want, vjp_want = jax.vjp(plain, x, kernel, bias)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  for got, ref, name in zip(vjp(cot), vjp_want(cot), ("dx", "dkernel", "dbias")):
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("dpre_f32", [True, False])
def test_kernel_bf16_close_to_xla_reference(dpre_f32):
  x, kernel, bias, cot = _problem(t=64, c=128)
  x16, cot16 = x.astype(jnp.bfloat16), cot.astype(jnp.bfloat16)
  cfg = conv_pallas_gpu.ConvGpuConfig(bwd_dpre_f32=dpre_f32)
  fused = lambda x, k, b: conv_pallas_gpu.causal_conv_silu(x, k, b, None, jnp.bfloat16,
                                                           cfg=cfg, interpret=True)
  xla = lambda x, k, b: conv_reference.causal_conv_silu_reference(x, k, b, None, jnp.bfloat16)
  out, vjp = jax.vjp(fused, x16, kernel, bias)
  want, vjp_want = jax.vjp(xla, x16, kernel, bias)
  assert out.dtype == jnp.bfloat16
  # Both compute in float32 from the same bf16 inputs: equal up to rounding.
  np.testing.assert_allclose(out.astype(jnp.float32), want.astype(jnp.float32),
                             rtol=1e-2, atol=1e-2)
  for got, ref in zip(vjp(cot16), vjp_want(cot16)):
    assert got.dtype == ref.dtype
    np.testing.assert_allclose(got.astype(jnp.float32), ref.astype(jnp.float32),
                               rtol=2e-2, atol=2e-2)


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


@pytest.mark.gpu
def test_compiled_kernel_matches_xla_on_gpu():
  if jax.default_backend() != "gpu":
    pytest.skip("needs a GPU")
  x, kernel, bias, cot = _problem(b=4, t=1024, c=640)
  fused = jax.jit(lambda x, k, b: conv_pallas_gpu.causal_conv_silu(x, k, b, None, jnp.float32))
  plain = jax.jit(lambda x, k, b: _plain(x, k, b, None))
  out, vjp = jax.vjp(fused, x, kernel, bias)
  want, vjp_want = jax.vjp(plain, x, kernel, bias)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  for got, ref in zip(vjp(cot), vjp_want(cot)):
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3)
