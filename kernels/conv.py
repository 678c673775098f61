"""Mamba2's causal conv + SiLU, on the Pallas kernel or in XLA.

The choice follows the block's SSD implementation (`kernels.dispatch`), so
one setting picks the kernels: PALLAS uses `kernels.conv_pallas_gpu` on GPUs
(TPUs have no conv kernel and use XLA), PALLAS_INTERPRET runs the kernel's
logic anywhere (tests on the CPU), the XLA implementations (and None) use
`kernels.conv_reference`. Shapes the kernel's tiles do not divide (length
not a multiple of 16, channels not of 32) also use XLA.
"""

from __future__ import annotations

import jax

from kernels import conv_pallas_gpu
from kernels import conv_reference
from kernels.dispatch import SSDImpl
from kernels.dispatch import batch_sharded_call
from kernels.dispatch import gpu_kernel_mode


def uses_kernel(impl: "SSDImpl | str | None", shape: tuple[int, ...]) -> bool:
  """Whether `causal_conv_silu` runs the Pallas kernel for impl and x's shape."""
  fits = conv_pallas_gpu.tiles(shape[1], shape[2]) is not None
  return gpu_kernel_mode(impl) is not None and fits


def causal_conv_silu(x: jax.Array, kernel: jax.Array, bias: jax.Array,
                     segment_ids: jax.Array | None, out_dtype,
                     impl: "SSDImpl | str | None" = None) -> jax.Array:
  """silu(causal depthwise conv(x)) in out_dtype.

  Args:
    x: (b, t, c) conv input.
    kernel: (K, c) taps, kernel[K - 1] multiplies the current token.
    bias: (c,).
    segment_ids: (b, t) int or None; taps never reach into another segment.
    out_dtype: the result's dtype.
    impl: the block's SSD implementation (see the module docstring); None:
      XLA.

  Returns:
    (b, t, c) in out_dtype.
  """
  if not uses_kernel(impl, x.shape):
    return conv_reference.causal_conv_silu_reference(x, kernel, bias, segment_ids, out_dtype)
  interpret = gpu_kernel_mode(impl) == "interpret"

  def local(rows, params):
    return conv_pallas_gpu.causal_conv_silu(rows["x"], params["kernel"], params["bias"],
                                            rows["segment_ids"], out_dtype,
                                            interpret=interpret)

  return batch_sharded_call(local, dict(x=x, segment_ids=segment_ids),
                                    dict(kernel=kernel, bias=bias))
