"""Multiply-accumulate counts of traced JAX functions (compute per image).

`jaxpr_macs` counts the products of every `dot_general` and
`conv_general_dilated` of a jaxpr, nested jaxprs included (scans, remat,
custom derivatives): the work that dominates both MambaEye (projections,
the chunked SSD's matmuls) and MambaOut (convolutions, MLPs). Elementwise
work (norms, activations, the SSD's decays) is left out, as published
"MACs" figures leave it out. A `lax.scan` body counts once per iteration.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.extend
import numpy as np


def jaxpr_macs(jaxpr) -> int:
  """Multiply-accumulates of every dot and conv of a (closed or open) jaxpr.

  Args:
    jaxpr: a `jax.core.Jaxpr` or `ClosedJaxpr` (e.g. `jax.make_jaxpr(f)(*args)`).

  Returns:
    The number of multiply-accumulates, nested jaxprs included.
  """
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  macs = 0
  for eqn in jaxpr.eqns:
    out = eqn.outvars[0].aval.shape
    inner = 0
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      inner += jaxpr_macs(sub)
    if eqn.primitive.name == "scan":
      inner *= int(eqn.params["length"])
    macs += inner
    if eqn.primitive.name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      macs += int(np.prod(out)) * int(np.prod([lhs[d] for d in contract]))
    elif eqn.primitive.name == "conv_general_dilated":
      # rhs (kh, kw, in / groups, out) in the layouts flax uses; the product
      # of its spatial and input sizes is what each output element sums.
      rhs = eqn.invars[1].aval.shape
      spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, spatial...)
      per_output = int(np.prod([rhs[d] for d in spec[1:]]))
      macs += int(np.prod(out)) * per_output
  return macs


def traced_macs(fn: Callable[..., Any], *args: Any) -> int:
  """`jaxpr_macs` of `fn` traced on `args` (arrays or `jax.ShapeDtypeStruct`s)."""
  return jaxpr_macs(jax.make_jaxpr(fn)(*args))
