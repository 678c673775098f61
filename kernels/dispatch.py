"""How every op picks its implementation, and how a kernel runs per device.

One setting picks every kernel: the block's SSD implementation (`SSDImpl`,
`ModelConfig.ssd_impl`). `resolve_impl` turns AUTO into a concrete one (the
Pallas kernels on GPU and TPU, plain XLA on the CPU, where Pallas would run
only in its slow interpreter), and only there. The SSD (`kernels.ssd`) takes
the implementation itself; the ops that have GPU kernels only (the conv,
`kernels.conv`; the norms, `kernels.norms`) take it too and ask
`gpu_kernel_mode` how to run.

`batch_sharded_call` runs a kernel on each device's rows of the batch under
a mesh (XLA cannot partition an opaque kernel call itself).
"""

from __future__ import annotations

import enum
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec


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
  if backend in ("gpu", "cuda", "rocm", "tpu"):
    return SSDImpl.PALLAS
  return SSDImpl.CHUNKED


def gpu_kernel_mode(impl: "SSDImpl | str | None") -> str | None:
  """How the block's GPU-only Pallas kernels (conv, norms) run for impl.

  Returns "gpu" (compiled: PALLAS on a GPU), "interpret" (PALLAS_INTERPRET,
  any backend) or None (XLA: the XLA implementations, impl None, and TPUs,
  which have no such kernels).
  """
  if impl is None:
    return None
  impl = resolve_impl(impl)
  if impl is SSDImpl.PALLAS_INTERPRET:
    return "interpret"
  if impl is SSDImpl.PALLAS and jax.default_backend() == "gpu":
    return "gpu"
  return None


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


def as_batch_rows(total: jax.Array, batch: int) -> jax.Array:
  """(d,) -> (batch, d) holding it in row 0: a sum that splits with the batch.

  A kernel's parameter gradient inside `batch_sharded_call` is one
  device's share; returned this way, summing the global rows adds the shares.
  """
  return jnp.zeros((batch, total.shape[0]), total.dtype).at[0].set(total)
