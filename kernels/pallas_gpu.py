"""What the block's Pallas GPU kernels share: the Triton launch, SiLU.

`kernels.conv_pallas_gpu`, `kernels.gated_norm_pallas_gpu` and
`kernels.add_norm_pallas_gpu` launch through `launch`; interpret mode runs
the same kernels on any backend. `silu_and_grad` is also the XLA references'
(`mambaeye_jax.layers`), so kernel and reference share the formula.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
from jax.experimental import pallas as pl

try:  # The Triton compiler params exist wherever the GPU lowering does.
  from jax.experimental.pallas import triton as pltriton
except ImportError:  # pragma: no cover
  pltriton = None


def launch(kernel: Callable[..., None], name: str, grid: tuple[int, ...],
           inputs: Sequence[tuple[Any, pl.BlockSpec]],
           outputs: Sequence[tuple[Any, pl.BlockSpec]], num_warps: int,
           interpret: bool, num_stages: int = 1) -> list:
  """pallas_call with the Triton lowering.

  Args:
    kernel: the kernel body, refs in the order of inputs then outputs.
    name: the kernel's name (shows in profiles).
    grid: program grid.
    inputs: (array or None, BlockSpec) pairs; None entries are left out.
    outputs: (jax.ShapeDtypeStruct, BlockSpec) pairs.
    num_warps, num_stages: Triton launch parameters.
    interpret: run in the Pallas interpreter.

  Returns:
    The outputs, a list in the order given.
  """
  inputs = [(a, s) for a, s in inputs if a is not None]
  params = None if pltriton is None else pltriton.CompilerParams(num_warps=num_warps,
                                                                 num_stages=num_stages)
  return pl.pallas_call(
      kernel, grid=grid, in_specs=[s for _, s in inputs],
      out_specs=[s for _, s in outputs], out_shape=[o for o, _ in outputs],
      compiler_params=params, interpret=interpret, name=name,
  )(*[a for a, _ in inputs])


def silu_and_grad(z):
  """silu(z) and its derivative (elementwise; float32 in, float32 out)."""
  sig = jax.nn.sigmoid(z)
  return z * sig, sig * (1.0 + z * (1.0 - sig))
