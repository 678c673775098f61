"""One entry point for Mamba2's SSD scan, with the implementation chosen here.

Every implementation shares the signature of `kernels.ssd_reference`:

    ssd(x, dt, A, B, C, D=None, *, dt_bias=None, dt_softplus=False,
        initial_state=None, segment_ids=None, return_final_state=False,
        chunk_size=256, impl=SSDImpl.AUTO)

    x: (batch, length, heads, headdim)       dt: (batch, length, heads)
    A, D, dt_bias: (heads,)                  B, C: (batch, length, groups, d_state)
    initial_state: (batch, heads, headdim, d_state)
    segment_ids: (batch, length) int; the state resets where it changes.
    -> y: (batch, length, heads, headdim) [, final_state (b, h, p, n) f32]

`SSDImpl.AUTO` is resolved by `resolve_impl`, and only there: the Pallas
kernel on GPU and TPU, the plain-XLA chunked form on CPU (where Pallas would
run only in its slow interpreter).
"""

from __future__ import annotations

import enum
import functools
from typing import Callable

import jax

from kernels import ssd_reference


class SSDImpl(enum.Enum):
  """Which SSD implementation to run."""
  AUTO = "auto"
  SEQUENTIAL = "sequential"  # lax.scan over tokens: the oracle.
  CHUNKED = "chunked"  # plain XLA chunked SSD.
  ASSOCIATIVE = "associative"  # chunked, associative_scan between chunks.
  PALLAS = "pallas"  # the fused Pallas kernel (GPU: Triton; TPU: Mosaic).
  PALLAS_INTERPRET = "pallas_interpret"  # the kernel's logic on any backend.

  @classmethod
  def parse(cls, value: "SSDImpl | str") -> "SSDImpl":
    if isinstance(value, SSDImpl):
      return value
    try:
      return cls(str(value).lower())
    except ValueError:
      known = ", ".join(m.value for m in cls)
      raise ValueError(f"unknown SSD implementation {value!r}; known: {known}") from None


@functools.lru_cache(maxsize=None)
def _pallas_available() -> bool:
  try:
    from kernels import ssd_pallas  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def resolve_impl(impl: "SSDImpl | str" = SSDImpl.AUTO,
                 backend: str | None = None) -> SSDImpl:
  """Turns AUTO into a concrete implementation for `backend`.

  Args:
    impl: the requested implementation.
    backend: "cpu", "gpu" or "tpu"; the default backend when None.

  Returns:
    A concrete `SSDImpl` (never AUTO).
  """
  impl = SSDImpl.parse(impl)
  if impl is not SSDImpl.AUTO:
    return impl
  backend = backend or jax.default_backend()
  if backend in ("gpu", "cuda", "rocm", "tpu") and _pallas_available():
    return SSDImpl.PALLAS
  return SSDImpl.CHUNKED


def get_ssd_fn(impl: "SSDImpl | str" = SSDImpl.AUTO) -> Callable[..., jax.Array]:
  """Returns the SSD function for `impl` (AUTO resolved for the default backend)."""
  impl = resolve_impl(impl)
  if impl is SSDImpl.SEQUENTIAL:
    return ssd_reference.ssd_sequential
  if impl is SSDImpl.CHUNKED:
    return ssd_reference.ssd_chunked
  if impl is SSDImpl.ASSOCIATIVE:
    return ssd_reference.ssd_associative
  if not _pallas_available():
    raise ImportError("SSDImpl.PALLAS needs kernels/ssd_pallas.py, which failed to import")
  from kernels import ssd_pallas  # pylint: disable=g-import-not-at-top
  if impl is SSDImpl.PALLAS_INTERPRET:
    return functools.partial(ssd_pallas.ssd_pallas, interpret=True)
  return ssd_pallas.ssd_pallas


def ssd(x, dt, A, B, C, D=None, *, impl: "SSDImpl | str" = SSDImpl.AUTO, **kwargs):
  """Runs the SSD scan with the chosen implementation (see module docstring)."""
  return get_ssd_fn(impl)(x, dt, A, B, C, D, **kwargs)
