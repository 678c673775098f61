"""The block's RMS norms in XLA and on the Pallas GPU kernels.

Dimension letters: b batch, d features.

Two memory-bound steps of a Mamba2 block, written with custom VJPs that
save only what their backward needs, in the inputs' dtypes: the residual add
+ RMSNorm (`add_rms_norm`) and the gated RMSNorm (`gated_rms_norm`). Their
XLA forms here are the references of `kernels.add_norm_pallas_gpu` and
`kernels.gated_norm_pallas_gpu`; which one runs follows the block's SSD
implementation (`impl`, resolved by `kernels.dispatch.gpu_kernel_mode`).
`rms_normalize` is the plain definition.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels import add_norm_pallas_gpu
from kernels import gated_norm_pallas_gpu
from kernels import pallas_gpu
from kernels.dispatch import SSDImpl
from kernels.dispatch import as_batch_rows
from kernels.dispatch import batch_sharded_call
from kernels.dispatch import gpu_kernel_mode

RMS_EPS = 1e-5


def rms_normalize(x: jax.Array, weight: jax.Array, eps: float = RMS_EPS,
                  group_size: int | None = None) -> jax.Array:
  """RMS normalisation in float32, optionally over groups of features.

  Args:
    x: (..., d) any float dtype.
    weight: (d,) scale.
    eps: added to the mean square.
    group_size: normalise each consecutive group of this many features
      separately (gated RMSNorm with ngroups > 1); None: all d at once.

  Returns:
    (..., d) float32.
  """
  x = x.astype(jnp.float32)
  d = x.shape[-1]
  group_size = group_size or d
  xg = x.reshape(*x.shape[:-1], d // group_size, group_size)
  xg = xg * jax.lax.rsqrt(jnp.mean(xg * xg, axis=-1, keepdims=True) + eps)
  return xg.reshape(x.shape) * weight.astype(jnp.float32)


def add_rms_norm(hidden: jax.Array, residual: jax.Array, weight: jax.Array, eps: float,
                 out_dtype, impl: "SSDImpl | str | None" = None, copies: int = 1):
  """The pre-norm step: s = hidden + residual (float32) and RMSNorm(s) * weight.

  A custom VJP that saves s and one 1/rms per token and returns the same
  gradient to hidden and residual, so the backward reads the residual stream
  once (autodiff of the plain form re-read it for each of its terms).

  With copies > 1 the normalised output is returned that many times (the
  same array), one per consumer, so that their gradients reach the backward
  separately and are added inside its single pass. Given one output, autodiff
  would first add them into one more array (the Mamba2 block's four input
  projections, on an H100 at 65k tokens: XLA's sum took ~60 us a layer; read
  in the kernel's pass instead, the Tiny training step gained 0.16 ms).

  Args:
    hidden: (..., d) the previous block's output (compute dtype).
    residual: (..., d) float32 residual stream.
    weight: (d,) norm scale.
    eps: added to the mean square.
    out_dtype: dtype of the normalised output (the next matmul's).
    impl: the block's SSD implementation: where `gpu_kernel_mode` gives a
      mode, both directions run on `kernels.add_norm_pallas_gpu` where it
      takes the shape; None: XLA.
    copies: how many consumers get normed (see above).

  Returns:
    s (..., d) float32 (the new residual), and normed (..., d) out_dtype, or
    with copies > 1 a tuple of `copies` normed.
  """
  if copies < 1:
    raise ValueError(f"copies must be >= 1, got {copies}")
  kernel = gpu_kernel_mode(impl)
  s, normed = _add_rms_norm(hidden, residual, weight, eps, out_dtype, kernel,
                            (jnp.dtype(hidden.dtype), jnp.dtype(residual.dtype)), copies)
  return s, normed if copies > 1 else normed[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _add_rms_norm(hidden, residual, weight, eps, out_dtype, kernel, in_dtypes, copies):
  # Without differentiation XLA's form is used even where the kernel could
  # run: XLA folds the add into the previous matmul's epilogue, which the
  # kernel cannot (measured on an H100, inference at 262k tokens: 0.21 ms a
  # layer against the kernel's 0.29). Under jax.grad the fwd rule runs.
  del kernel
  return _add_rms_norm_fwd(hidden, residual, weight, eps, out_dtype, None, in_dtypes,
                           copies)[0]


def _rows_per_example(x: jax.Array) -> int | None:
  """Rows a norm kernel sees per example of x (b, ..., d); None for x (b, d).

  The kernels' row blocks must divide the rows of each device's share of the
  batch; any block dividing one example's rows does, however it is split.
  """
  return None if x.ndim < 3 else x.size // (x.shape[0] * x.shape[-1])


def _add_norm_kernel_takes(x: jax.Array) -> bool:
  """Whether the kernels take x (b, ..., d), also split over the batch."""
  rows = _rows_per_example(x)
  return rows is not None and add_norm_pallas_gpu.supported(rows, x.shape[-1])


def _add_rms_norm_fwd(hidden, residual, weight, eps, out_dtype, kernel, in_dtypes, copies):
  del in_dtypes  # The backward's: gradients in the inputs' dtypes.
  if kernel is not None and _add_norm_kernel_takes(hidden):
    def local(rows, params):
      shape = rows["hidden"].shape
      s, normed, rstd = add_norm_pallas_gpu.forward(
          _flat(rows["hidden"]), _flat(rows["residual"]), params["weight"], eps, out_dtype,
          interpret=kernel == "interpret")
      return s.reshape(shape), normed.reshape(shape), rstd.reshape(*shape[:-1], 1)

    s, normed, rstd = batch_sharded_call(
        local, dict(hidden=hidden, residual=residual), dict(weight=weight), 3)
  else:
    s = hidden.astype(jnp.float32) + residual.astype(jnp.float32)
    rstd = jax.lax.rsqrt(jnp.mean(s * s, axis=-1, keepdims=True) + eps)
    normed = (s * rstd * weight.astype(jnp.float32)).astype(out_dtype)
  return (s, (normed,) * copies), (s, rstd, weight)


def _add_rms_norm_bwd(eps, out_dtype, kernel, in_dtypes, copies, residuals, cotangents):
  del eps, out_dtype, copies
  s, rstd, weight = residuals
  hidden_dtype, residual_dtype = in_dtypes
  d_s, d_normed_copies = cotangents
  if kernel is not None and _add_norm_kernel_takes(s):
    def local(rows, params):
      shape = rows["s"].shape
      dh, dr, dw = add_norm_pallas_gpu.backward(
          _flat(rows["s"]), rows["rstd"].reshape(-1), params["weight"], _flat(rows["d_s"]),
          [_flat(d) for d in rows["d_normed"]], hidden_dtype, residual_dtype,
          interpret=kernel == "interpret")
      return dh.reshape(shape), dr.reshape(shape), as_batch_rows(dw, shape[0])

    dh, dr, dw = batch_sharded_call(
        local, dict(s=s, rstd=rstd, d_s=d_s, d_normed=tuple(d_normed_copies)),
        dict(weight=weight), 3)
    return dh, dr, dw.sum(0).astype(weight.dtype)
  normed = s * rstd
  d_normed = sum(d.astype(jnp.float32) for d in d_normed_copies)
  g = d_normed * weight.astype(jnp.float32)
  ds = d_s.astype(jnp.float32) + rstd * (g - normed * jnp.mean(g * normed, axis=-1,
                                                                 keepdims=True))
  d_weight = jnp.sum((d_normed * normed).reshape(-1, s.shape[-1]), axis=0)
  return ds.astype(hidden_dtype), ds.astype(residual_dtype), d_weight.astype(weight.dtype)


_add_rms_norm.defvjp(_add_rms_norm_fwd, _add_rms_norm_bwd)


def gated_rms_norm(y: jax.Array, z: jax.Array, weight: jax.Array, eps: float,
                   group_size: int, out_dtype,
                   impl: "SSDImpl | str | None" = None) -> jax.Array:
  """norm(y * silu(z)) * weight, computed in float32, returned in out_dtype.

  A custom VJP so that the backward pass reads y and z in their own (bf16)
  dtype plus one float32 scale per row and group, instead of autodiff's saved
  float32 copies of y * silu(z) (measured: the float32 intermediates of this
  norm were a tenth of the training step on an H100).

  Args:
    y: (..., d) SSD output.
    z: (..., d) gate.
    weight: (d,) scale.
    eps: added to the mean square.
    group_size: features per normalised group (d // ngroups).
    out_dtype: dtype of the result (the compute dtype of the next matmul).
    impl: the block's SSD implementation: where `gpu_kernel_mode` gives a
      mode, the forward and the backward run on
      `kernels.gated_norm_pallas_gpu` where it takes the shape; None: XLA.

  Returns:
    (..., d) in out_dtype.
  """
  return _gated_rms_norm(y, z, weight, eps, group_size, out_dtype, gpu_kernel_mode(impl))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _gated_rms_norm(y, z, weight, eps, group_size, out_dtype, kernel):
  return _gated_rms_norm_fwd(y, z, weight, eps, group_size, out_dtype, kernel)[0]


def _grouped(x: jax.Array, group_size: int) -> jax.Array:
  return x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)


def _flat(v):
  return v.reshape(-1, v.shape[-1])


def _gated_rms_norm_kernel_fwd(y, z, weight, eps, out_dtype, kernel):
  """The Pallas forward on (rows, d), split over the batch under a mesh."""

  def local(rows, params):
    r = rows["y"]
    out, rstd = gated_norm_pallas_gpu.forward(
        _flat(r), _flat(rows["z"]), params["weight"], eps, out_dtype,
        interpret=kernel == "interpret")
    return out.reshape(r.shape), rstd.reshape(*r.shape[:-1], 1, 1)

  return batch_sharded_call(local, dict(y=y, z=z), dict(weight=weight), 2)


def _gated_rms_norm_kernel_bwd(y, z, weight, rstd, d_out, kernel):
  """The Pallas backward; the weight gradient is summed over devices."""

  def local(rows, params):
    r = rows["y"]
    dy, dz, dw = gated_norm_pallas_gpu.backward(
        _flat(r), _flat(rows["z"]), rows["rstd"].reshape(-1), params["weight"],
        _flat(rows["d_out"]), interpret=kernel == "interpret")
    return dy.reshape(r.shape), dz.reshape(r.shape), as_batch_rows(dw, r.shape[0])

  dy, dz, dw = batch_sharded_call(
      local, dict(y=y, z=z, rstd=rstd, d_out=d_out), dict(weight=weight), 3)
  return dy, dz, dw.sum(0).astype(weight.dtype)


def _gated_rms_norm_fwd(y, z, weight, eps, group_size, out_dtype, kernel):
  if kernel is not None and _gated_norm_kernel_takes(y, group_size):
    out, rstd = _gated_rms_norm_kernel_fwd(y, z, weight, eps, out_dtype, kernel)
    return out, (y, z, weight, rstd)
  gated = _grouped(y.astype(jnp.float32) * pallas_gpu.silu_and_grad(z.astype(jnp.float32))[0], group_size)
  rstd = jax.lax.rsqrt(jnp.mean(gated * gated, axis=-1, keepdims=True) + eps)
  # The barrier keeps XLA's GPU normalisation fusion from taking this norm:
  # that fusion cannot absorb the gating product, so it wrote y * silu(z) in
  # float32 and read it back (measured: 0.64 ms a layer at 262k tokens, against
  # one reduction pass and one elementwise pass over the bf16 inputs).
  rstd = jax.lax.optimization_barrier(rstd)
  out = (gated * rstd).reshape(y.shape) * weight.astype(jnp.float32)
  return out.astype(out_dtype), (y, z, weight, rstd)


def _gated_norm_kernel_takes(y, group_size):
  """Whether the kernels take y (b, ..., d), also split over the batch."""
  rows = _rows_per_example(y)
  return rows is not None and gated_norm_pallas_gpu.supported(rows, y.shape[-1], group_size)


def _gated_rms_norm_bwd(eps, group_size, out_dtype, kernel, residuals, d_out):
  del eps, out_dtype
  y, z, weight, rstd = residuals
  if kernel is not None and _gated_norm_kernel_takes(y, group_size):
    return _gated_rms_norm_kernel_bwd(y, z, weight, rstd, d_out, kernel)
  silu_z, dsilu_z = pallas_gpu.silu_and_grad(z.astype(jnp.float32))
  y32 = y.astype(jnp.float32)
  normed = _grouped(y32 * silu_z, group_size) * rstd  # (..., groups, group_size)
  d_out = d_out.astype(jnp.float32)
  d_weight = jnp.sum((d_out * normed.reshape(y.shape)).reshape(-1, y.shape[-1]), axis=0)
  d_normed = _grouped(d_out * weight.astype(jnp.float32), group_size)
  # d gated = rstd * (d_normed - normed * mean(d_normed * normed)) per group.
  d_gated = rstd * (d_normed - normed * jnp.mean(d_normed * normed, axis=-1, keepdims=True))
  d_gated = d_gated.reshape(y.shape)
  return ((d_gated * silu_z).astype(y.dtype), (d_gated * y32 * dsilu_z).astype(z.dtype),
          d_weight.astype(weight.dtype))


_gated_rms_norm.defvjp(_gated_rms_norm_fwd, _gated_rms_norm_bwd)
