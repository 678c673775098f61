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

`SSDImpl.AUTO` is resolved by `resolve_impl`, and only there: the Pallas
kernel on GPU and TPU, the plain-XLA chunked form on CPU (where Pallas would
run only in its slow interpreter). Under `jax.set_mesh(mesh)` the kernel runs
per device on its rows of the batch (`shard_over_batch`).
"""

from __future__ import annotations

import enum
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

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


def gpu_kernel_mode(impl: "SSDImpl | str" = SSDImpl.AUTO) -> str | None:
  """How the block's other GPU Pallas kernels (conv, gated norm) run for impl.

  Returns "gpu" (compiled: PALLAS on a GPU), "interpret" (PALLAS_INTERPRET,
  any backend) or None (XLA: the XLA implementations, and TPUs, which have
  no such kernels).
  """
  impl = resolve_impl(impl)
  if impl is SSDImpl.PALLAS_INTERPRET:
    return "interpret"
  if impl is SSDImpl.PALLAS and jax.default_backend() == "gpu":
    return "gpu"
  return None


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


def batch_sharded_call(fn: Callable[[dict, dict], Any], rows: dict, shared: dict,
                       num_outputs: int = 1):
  """fn(rows, shared) on each device's rows when a mesh is set.

  XLA's partitioner cannot split a Pallas kernel (an opaque custom call):
  under `jax.jit` with a batch-sharded input it gathers the whole batch onto
  every device and computes all of it there, so N devices run no faster than
  one. Under `jax.set_mesh(mesh)` this runs `fn` in `jax.shard_map` over the
  batch axis instead (split over every mesh axis, as in pure data
  parallelism). The `shared` parameters are broadcast to one copy per device
  outside the map, so their gradients are summed over devices by ordinary
  autodiff. Without a mesh, on one device, or when the batch does not split
  evenly, `fn` runs as it is.

  Args:
    fn: (rows, shared) -> one array or a tuple of num_outputs arrays, each
      with the batch as its leading axis.
    rows: name -> (batch, ...) array or None.
    shared: name -> parameter array (no batch axis) or None.
    num_outputs: how many arrays fn returns (1: a single array).

  Returns:
    fn's result over the whole batch.
  """
  mesh = jax.sharding.get_abstract_mesh()
  batch = next(v for v in rows.values() if v is not None).shape[0]
  if mesh.empty or mesh.size == 1 or batch % mesh.size:
    return fn(rows, shared)
  copies = mesh.size
  per_device = {name: None if v is None else jnp.broadcast_to(v, (copies,) + v.shape)
                for name, v in shared.items()}

  def local(rows, per_device):
    return fn(rows, {k: None if v is None else v[0] for k, v in per_device.items()})

  spec = PartitionSpec(tuple(mesh.axis_names))
  out_specs = (spec,) * num_outputs if num_outputs > 1 else spec
  if any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
    # Explicit meshes type every array's sharding; put the rows where the
    # map expects them (a no-op for a batch already split this way).
    rows, per_device = jax.tree.map(lambda v: jax.reshard(v, spec), (rows, per_device))
  # Every input and output is split over the mesh, so no replication needs
  # checking (and the kernels have no varying-axis typing rules to check).
  return jax.shard_map(local, in_specs=(spec, spec), out_specs=out_specs,
                       check_vma=False)(rows, per_device)


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
