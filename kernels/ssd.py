"""One entry point for Mamba2's SSD scan, with the implementation chosen here.

Every implementation shares the signature of `kernels.ssd_reference`:

    ssd(x, dt, A, B, C, D=None, *, dt_bias=None, dt_softplus=False,
        initial_state=None, segment_ids=None, return_final_state=False,
        chunk_size=256, impl=SSDImpl.AUTO)

    x: (batch, length, heads, headdim)       dt: (batch, length, heads)
    A, D, dt_bias: (heads,)                  B, C: (batch, length, groups, d_state)
    C may be None with B (batch, length, 2 * groups, d_state) holding B's
    groups then C's: the GPU kernels read both from that one array (no
    copies), the other implementations split it.
    initial_state: (batch, heads, headdim, d_state)
    segment_ids: (batch, length) int; the state resets where it changes.
    -> y: (batch, length, heads, headdim) [, final_state (b, h, p, n) f32]

`SSDImpl.AUTO` is resolved by `kernels.dispatch.resolve_impl`, and only
there: the Pallas kernel on GPU and TPU, the plain-XLA chunked form on CPU
(where Pallas would run only in its slow interpreter). Under `jax.set_mesh(mesh)` the kernel runs
per device on its rows of the batch (`shard_over_batch`).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax

from kernels import ssd_pallas
from kernels import ssd_reference
from kernels.dispatch import SSDImpl
from kernels.dispatch import batch_sharded_call
from kernels.dispatch import resolve_impl


def get_ssd_fn(impl: "SSDImpl | str" = SSDImpl.AUTO) -> Callable[..., jax.Array]:
  """Returns the SSD function for `impl` (AUTO resolved for the default backend)."""
  impl = resolve_impl(impl)
  if impl is SSDImpl.SEQUENTIAL:
    return ssd_reference.ssd_sequential
  if impl is SSDImpl.CHUNKED:
    return ssd_reference.ssd_chunked
  if impl is SSDImpl.ASSOCIATIVE:
    return ssd_reference.ssd_associative
  if impl is SSDImpl.PALLAS_INTERPRET:
    return functools.partial(ssd_pallas.ssd_pallas, interpret=True)
  return ssd_pallas.ssd_pallas


def shard_over_batch(fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
  """An SSD function run on each device's rows when a mesh is set.

  See `batch_sharded_call`; the per-head parameters (A, D, dt_bias) are the
  shared ones.

  Args:
    fn: an SSD function with the signature of `kernels.ssd_reference`.

  Returns:
    A function with the same signature.
  """
  def wrapped(x, dt, A, B, C, D=None, *, dt_bias=None, initial_state=None,
              segment_ids=None, **kwargs):
    def local(rows, heads):
      return fn(rows["x"], rows["dt"], heads["A"], rows["B"], rows["C"], heads["D"],
                dt_bias=heads["dt_bias"], initial_state=rows["initial_state"],
                segment_ids=rows["segment_ids"], **kwargs)

    rows = dict(x=x, dt=dt, B=B, C=C, initial_state=initial_state, segment_ids=segment_ids)
    return batch_sharded_call(local, rows, dict(A=A, D=D, dt_bias=dt_bias),
                              2 if kwargs.get("return_final_state") else 1)

  return wrapped


def ssd(x, dt, A, B, C, D=None, *, impl: "SSDImpl | str" = SSDImpl.AUTO, **kwargs):
  """Runs the SSD scan with the chosen implementation (see module docstring).

  Kernel implementations are split over the batch when a mesh is set (see
  `shard_over_batch`); XLA implementations are left to XLA's partitioner.
  """
  impl = resolve_impl(impl)
  fn = get_ssd_fn(impl)
  if impl in (SSDImpl.PALLAS, SSDImpl.PALLAS_INTERPRET):
    fn = shard_over_batch(fn)
  elif C is None:  # Packed B and C (see the module docstring).
    B, C = ssd_reference.split_packed_bc(B)
  return fn(x, dt, A, B, C, D, **kwargs)
