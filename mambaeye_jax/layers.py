"""Small layers of the model: dense products, the RMS norm modules, inits.

Dimension letters: b batch, t time (glimpses), d features.

`dense` is every matrix product of the model (the block's in_proj and
out_proj, the embedding and the head): computed in the compute dtype, with
the weight's gradient produced in float32 (see its docstring).

The norms' computations (XLA references and Pallas kernels) are ops in
`kernels.norms`; the modules here hold their weights.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from kernels import norms
from kernels.norms import RMS_EPS


def torch_default_init():
  """PyTorch's default Linear/Conv1d weight init, U(+-1/sqrt(fan_in)).

  kaiming_uniform(a=sqrt(5)) has bound sqrt(6 / ((1 + 5) fan_in)).
  """
  return jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias_init(fan_in: int):
  """PyTorch's default Linear bias init, U(+-1/sqrt(fan_in)).

  The official MambaEye keeps it for `init_fc` and the classification head:
  mamba_ssm's `_init_weights`, which zeroes Linear biases, is applied to the
  Mamba2 backbone only.
  """
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def dense(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, dtype) -> jax.Array:
  """x @ kernel (+ bias), computed in dtype; kernel and bias gradients in float32.

  Autodiff of the plain product in bf16 gives the weight gradient as a bf16
  product that is then converted to the float32 parameter's dtype; under data
  parallelism XLA sums the per-device partial gradients before that
  conversion, so every addition of the all-reduce rounds to bf16. Here the
  weight gradient's product accumulates and returns float32 (bf16 operands,
  tensor cores alike), so the cross-device sum is float32 too; the input
  gradient stays in dtype.

  Args:
    x: (..., d_in) input, any float dtype.
    kernel: (d_in, d_out) weight (float32 parameters).
    bias: (d_out,) or None.
    dtype: compute dtype of the product (and of the result).

  Returns:
    (..., d_out) in dtype.
  """
  return _dense(x, kernel, bias, jnp.dtype(dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _dense(x, kernel, bias, dtype):
  return _dense_fwd(x, kernel, bias, dtype)[0]


def _dense_fwd(x, kernel, bias, dtype):
  xc, kc = x.astype(dtype), kernel.astype(dtype)
  y = jnp.dot(xc, kc)
  if bias is not None:
    y = y + bias.astype(dtype)
  # Empty arrays carry the gradients' dtypes (residuals must be arrays).
  dtypes = tuple(None if v is None else jnp.zeros((0,), v.dtype) for v in (x, kernel, bias))
  return y, (xc, kc, dtypes)


def _dense_bwd(dtype, residuals, g):
  xc, kc, (x_dtype, kernel_dtype, bias_dtype) = residuals
  g = g.astype(dtype)
  dx = jnp.dot(g, kc.T).astype(x_dtype.dtype)
  rows = xc.reshape(-1, xc.shape[-1])
  g_rows = g.reshape(-1, g.shape[-1])
  dk = jax.lax.dot_general(rows, g_rows, (((0,), (0,)), ((), ())),
                           preferred_element_type=jnp.float32)
  db = None
  if bias_dtype is not None:
    db = jnp.sum(g_rows.astype(jnp.float32), axis=0).astype(bias_dtype.dtype)
  return dx, dk.astype(kernel_dtype.dtype), db


_dense.defvjp(_dense_fwd, _dense_bwd)


class RMSNorm(nnx.Module):
  """Weight-only RMSNorm (mamba_ssm's), computed in float32."""

  def __init__(self, dim: int, eps: float = RMS_EPS):
    self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (..., dim) -> (..., dim) float32."""
    return norms.rms_normalize(x, self.weight[...], self.eps)


class GatedRMSNorm(nnx.Module):
  """mamba_ssm's RMSNormGated with norm_before_gate=False: norm(y * silu(z))."""

  def __init__(self, dim: int, group_size: int, eps: float = RMS_EPS):
    if dim % group_size:
      raise ValueError(f"{dim=} must be a multiple of {group_size=}")
    self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.group_size = group_size
    self.eps = eps

  def __call__(self, y: jax.Array, z: jax.Array, out_dtype=jnp.float32,
               impl=None) -> jax.Array:
    """y, z: (..., dim) -> (..., dim) in out_dtype (computed in float32).

    impl: see `kernels.norms.gated_rms_norm`.
    """
    return norms.gated_rms_norm(y, z, self.weight[...], self.eps, self.group_size,
                                out_dtype, impl)
