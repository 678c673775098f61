"""Public entry of the Pallas SSD kernels, dispatched by backend.

`ssd_pallas` shares the signature of the references in
`kernels.ssd_reference` (dimension letters are defined there) and adds
`interpret` and an optional tile config:

* GPU: the Triton-lowered Pallas kernels of `kernels.ssd_pallas_gpu`, with a
  `jax.custom_vjp` whose backward runs the backward kernels.
* TPU: `kernels.ssd_pallas_tpu.ssd_pallas_tpu`.
* `interpret=True` (any backend, typically CPU): the GPU kernels' own logic
  through the Pallas interpreter, so CI tests the kernels without a GPU.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax

from kernels import ssd_pallas_gpu
from kernels import ssd_pallas_tpu
from kernels import ssd_reference

Array = jax.Array
SSDGpuConfig = ssd_pallas_gpu.SSDGpuConfig


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _ssd_gpu(return_final_state, cfg, interpret, x, dt, A, B, C, D,
             initial_state, segment_ids):
  """The differentiable core on effective dt; see `ssd_pallas`."""
  y, final = ssd_pallas_gpu.forward(x, dt, A, B, C, D, initial_state,
                                    segment_ids, cfg=cfg, interpret=interpret)
  return (y, final) if return_final_state else y


def _ssd_gpu_fwd(return_final_state, cfg, interpret, x, dt, A, B, C, D,
                 initial_state, segment_ids):
  # The training forward also keeps the state entering every chunk.
  y, final, states = ssd_pallas_gpu.forward(x, dt, A, B, C, D, initial_state,
                                            segment_ids, cfg=cfg,
                                            interpret=interpret,
                                            for_backward=True)
  res = (x, dt, A, B, C, D, initial_state, segment_ids, states)
  return ((y, final) if return_final_state else y), res


def _ssd_gpu_bwd(return_final_state, cfg, interpret, res, cot):
  x, dt, A, B, C, D, initial_state, segment_ids, states = res
  dy, dfinal = cot if return_final_state else (cot, None)
  dx, ddt, dA, dB, dC, dD, dinit = ssd_pallas_gpu.backward(
      x, dt, A, B, C, D, initial_state, segment_ids, states, dy, dfinal,
      cfg=cfg, interpret=interpret)
  # Integer segment ids get no cotangent (None stands for zero).
  return dx, ddt, dA, dB, dC, dD, dinit, None


_ssd_gpu.defvjp(_ssd_gpu_fwd, _ssd_gpu_bwd)


def ssd_pallas(x, dt, A, B, C, D=None, *, dt_bias=None, dt_softplus=False,
               initial_state=None, segment_ids=None, return_final_state=False,
               chunk_size=256, interpret: bool = False,
               config: Optional[SSDGpuConfig] = None):
  """Mamba2 SSD scan with Pallas kernels; differentiable in every float input.

  Args:
    x: (b, l, h, p) inputs, bfloat16 or float32.
    dt: (b, l, h) step sizes (before dt_bias / softplus if those are given).
    A: (h,) negative decay rates.
    B: (b, l, g, n) input projections.
    C: (b, l, g, n) output projections; or None, with B (b, l, 2 g, n)
      holding B's groups then C's (`ssd_reference.split_packed_bc`). The GPU
      kernels read both from that one array, so a caller that computes them
      together (Mamba2's single BC conv) hands them over without copies;
      the gradient then comes back packed the same way.
    D: (h,) skip connection, or None.
    dt_bias: (h,) or None.
    dt_softplus: apply softplus to dt + dt_bias.
    initial_state: (b, h, p, n) or None (zeros).
    segment_ids: (b, l) int, or None; the state resets where it changes.
    return_final_state: also return the (b, h, p, n) float32 final state.
    chunk_size: accepted for the shared signature; the kernels' own chunk is
      `config.block_q` (the chunked form is exact for any chunk length).
    interpret: run the GPU kernels' logic in the Pallas interpreter (CPU).
    config: GPU tile sizes (`SSDGpuConfig`); defaults tuned for the H100.

  Returns:
    y: (b, l, h, p) in x's dtype, and the float32 final state if asked for.

  Raises:
    ValueError: on a backend with no Pallas kernel (use interpret=True).
  """
  backend = "interpret" if interpret else jax.default_backend()
  if backend == "tpu":
    if C is None:
      B, C = ssd_reference.split_packed_bc(B)
    return ssd_pallas_tpu.ssd_pallas_tpu(
        x, dt, A, B, C, D, dt_bias=dt_bias, dt_softplus=dt_softplus,
        initial_state=initial_state, segment_ids=segment_ids,
        return_final_state=return_final_state, chunk_size=chunk_size)
  if backend not in ("gpu", "cuda", "interpret"):
    raise ValueError(f"no Pallas SSD kernel for {backend=}; pass "
                     "interpret=True or use kernels.ssd_reference.ssd_chunked")
  del chunk_size
  b_in, c_in = (B, C) if C is not None else (ssd_reference.packed_bc_shape(B),) * 2
  ssd_reference.validate_ssd_inputs(x, dt, A, b_in, c_in, D, dt_bias, initial_state,
                                    segment_ids)
  cfg = config if config is not None else SSDGpuConfig()
  # softplus and the bias are plain JAX: autodiff chains them onto the
  # kernel's gradient with respect to the effective dt.
  dt_eff = ssd_reference.effective_dt(dt, dt_bias, dt_softplus)
  return _ssd_gpu(bool(return_final_state), cfg, bool(interpret), x, dt_eff, A,
                  B, C, D, initial_state, segment_ids)
