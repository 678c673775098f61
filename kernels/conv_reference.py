"""Mamba2's causal depthwise conv + SiLU in XLA: the reference of the conv kernel.

Dimension letters: b batch, t time, d channels, k taps.

`causal_depthwise_conv` is the definition (also the streaming step's conv,
with `history`); `causal_conv_silu_reference` is the block's XLA form, with a
custom VJP that saves only x and computes the taps' gradients in one
reduction. `kernels.conv_pallas_gpu` is tested against both.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kernels import pallas_gpu
from kernels import segments


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
    segment_ids = segments.renumber_segments(segment_ids)
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


def _shift_back(x: jax.Array, lag: int) -> jax.Array:
  """x_{t - lag} along axis 1 with zeros before the start: (b, t, d)."""
  if not lag:
    return x
  return jnp.pad(x, ((0, 0), (lag, 0), (0, 0)))[:, :x.shape[1]]


def _shift_forward(x: jax.Array, lag: int) -> jax.Array:
  """x_{t + lag} along axis 1 with zeros past the end: (b, t, d)."""
  if not lag:
    return x
  return jnp.pad(x, ((0, 0), (0, lag), (0, 0)))[:, lag:]


def _same_segment(segment_ids: jax.Array | None, lag: int) -> jax.Array | None:
  """(b, t, 1) bool: token t and token t - lag share a segment (None: always)."""
  if segment_ids is None or not lag:
    return None
  earlier = jnp.pad(segment_ids, ((0, 0), (lag, 0)), mode="edge")[:, :segment_ids.shape[1]]
  return (earlier == segment_ids)[..., None]


def _conv_taps(x: jax.Array, segment_ids: jax.Array | None, taps: int):
  """The K causal windows of x: [(k, x_{t - (K-1-k)} masked to t's segment)], f32."""
  x32 = x.astype(jnp.float32)
  out = []
  for k in range(taps):
    lag = taps - 1 - k
    window = _shift_back(x32, lag)
    same = _same_segment(segment_ids, lag)
    out.append(window if same is None else jnp.where(same, window, 0.0))
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def causal_conv_silu_reference(x: jax.Array, kernel: jax.Array, bias: jax.Array,
                     segment_ids: jax.Array | None, out_dtype) -> jax.Array:
  """silu(causal_depthwise_conv(x)), computed in float32, returned in out_dtype.

  The parallel form used in training and evaluation (no history). A custom
  VJP recomputes the convolution from x in the backward pass and takes the
  kernel's gradient for all taps in one reduction; autodiff of the plain
  form saved a float32 copy of the conv input's gradient and read it once per
  tap (measured on an H100: ~0.5 ms a layer at 65k tokens).

  Args:
    x: (b, t, d) conv input, any float dtype.
    kernel: (K, d) taps, kernel[K - 1] multiplies the current token.
    bias: (d,).
    segment_ids: (b, t) int or None; taps never reach into another segment.
    out_dtype: dtype of the result.

  Returns:
    (b, t, d) in out_dtype.
  """
  return _causal_conv_silu_fwd(x, kernel, bias, segment_ids, out_dtype)[0]


def _conv_pre_activation(windows, kernel, bias):
  """bias + sum_k windows[k] * kernel[k], float32 (b, t, d)."""
  out = bias.astype(jnp.float32)
  for k, window in enumerate(windows):
    out = out + window * kernel[k].astype(jnp.float32)
  return out


def _causal_conv_silu_fwd(x, kernel, bias, segment_ids, out_dtype):
  if segment_ids is not None:
    segment_ids = segments.renumber_segments(segment_ids)
  pre = _conv_pre_activation(_conv_taps(x, segment_ids, kernel.shape[0]), kernel, bias)
  return pallas_gpu.silu_and_grad(pre)[0].astype(out_dtype), (x, kernel, bias, segment_ids)


def _causal_conv_silu_bwd(out_dtype, residuals, d_out):
  del out_dtype
  x, kernel, bias, segment_ids = residuals
  taps = kernel.shape[0]
  windows = _conv_taps(x, segment_ids, taps)
  pre = _conv_pre_activation(windows, kernel, bias)
  d_pre = d_out.astype(jnp.float32) * pallas_gpu.silu_and_grad(pre)[1]
  # One reduction over (b, t) for every tap and the bias.
  stacked = jnp.stack(windows + [jnp.ones_like(d_pre)], axis=-2)  # (b, t, K + 1, d)
  d_params = jnp.sum(d_pre[..., None, :] * stacked, axis=(0, 1))
  d_x = 0.0
  for k in range(taps):
    lag = taps - 1 - k
    same = _same_segment(segment_ids, lag)
    contrib = d_pre if same is None else jnp.where(same, d_pre, 0.0)
    d_x = d_x + _shift_forward(contrib, lag) * kernel[k].astype(jnp.float32)
  d_segments = None if segment_ids is None else np.zeros(segment_ids.shape, jax.dtypes.float0)
  return (d_x.astype(x.dtype), d_params[:taps].astype(kernel.dtype),
          d_params[taps].astype(bias.dtype), d_segments)


causal_conv_silu_reference.defvjp(_causal_conv_silu_fwd, _causal_conv_silu_bwd)
