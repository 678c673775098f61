"""Small layers of the Mamba2 block: RMS norms and the causal depthwise conv.

Dimension letters: b batch, t time (glimpses), d features, k conv taps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kernels import ssd_reference

RMS_EPS = 1e-5


def torch_default_init():
  """PyTorch's default Linear/Conv1d weight init, U(+-1/sqrt(fan_in)).

  kaiming_uniform(a=sqrt(5)) has bound sqrt(6 / ((1 + 5) fan_in)).
  """
  return jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


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


class RMSNorm(nnx.Module):
  """Weight-only RMSNorm (mamba_ssm's), computed in float32."""

  def __init__(self, dim: int, eps: float = RMS_EPS):
    self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (..., dim) -> (..., dim) float32."""
    return rms_normalize(x, self.weight[...], self.eps)


class GatedRMSNorm(nnx.Module):
  """mamba_ssm's RMSNormGated with norm_before_gate=False: norm(y * silu(z))."""

  def __init__(self, dim: int, group_size: int, eps: float = RMS_EPS):
    if dim % group_size:
      raise ValueError(f"{dim=} must be a multiple of {group_size=}")
    self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.group_size = group_size
    self.eps = eps

  def __call__(self, y: jax.Array, z: jax.Array) -> jax.Array:
    """y, z: (..., dim) -> (..., dim) float32."""
    gated = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
    return rms_normalize(gated, self.weight[...], self.eps, self.group_size)


def causal_depthwise_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array,
                          segment_ids: jax.Array | None = None,
                          history: jax.Array | None = None) -> jax.Array:
  """Causal depthwise 1-D convolution (PyTorch Conv1d, groups = channels).

  out_t = bias + sum_k kernel[k] * x_{t - (K - 1) + k}, with x before the
  start (or before the token's segment start) taken as zero, or from
  `history` when given.

  Args:
    x: (b, t, d).
    kernel: (K, d) taps, kernel[K - 1] multiplies the current token.
    bias: (d,).
    segment_ids: (b, t) or None; taps never reach into another segment.
    history: (b, K - 1, d) inputs preceding x (streaming), or None for zeros.

  Returns:
    (b, t, d) in float32.
  """
  taps = kernel.shape[0]
  b, t, d = x.shape
  x32 = x.astype(jnp.float32)
  if history is None:
    history = jnp.zeros((b, taps - 1, d), jnp.float32)
  padded = jnp.concatenate([history.astype(jnp.float32), x32], axis=1)
  if segment_ids is not None:
    segment_ids = ssd_reference.renumber_segments(segment_ids)
    seg_pad = jnp.concatenate(
        [jnp.broadcast_to(segment_ids[:, :1], (b, taps - 1)), segment_ids], axis=1)
  out = jnp.broadcast_to(bias.astype(jnp.float32), (b, t, d))
  for k in range(taps):
    lag = taps - 1 - k
    window = padded[:, k:k + t]
    if segment_ids is not None and lag:
      # Before the row's start the window already holds history (or zeros).
      same = seg_pad[:, k:k + t] == segment_ids
      window = jnp.where(same[..., None], window, 0.0)
    out = out + window * kernel[k].astype(jnp.float32)
  return out
