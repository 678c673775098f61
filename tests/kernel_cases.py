"""Shared machinery of the Pallas kernel tests (SSD, conv + SiLU, norms).

Every op's kernel tests have one structure: a dict of named cases (shapes,
dtypes, segment ids where the op takes them), each run in two modes against
the op's pure-JAX reference, outputs and gradients:

* `pallas_interpret` (`INTERPRET`): the kernel's logic through the Pallas
  interpreter, on any backend; this is what CI runs on its CPU.
* `pallas` (`COMPILED`): the kernel compiled for the GPU (Triton); skipped
  with "needs a GPU" elsewhere, since Pallas GPU kernels cannot compile for a
  CPU.

The mode strings are `kernels.dispatch.SSDImpl` values, so a test can hand
`mode` straight to an op's `impl` argument. Cases too large for the
interpreter (seconds on a GPU, minutes interpreted on a 2-core CPU) are
listed as compiled-only and not generated in interpret mode at all.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import pytest

INTERPRET = "pallas_interpret"
COMPILED = "pallas"
HAS_GPU = jax.default_backend() == "gpu"
NO_GPU_REASON = "needs a GPU"

_MODE_IDS = {INTERPRET: "interpret", COMPILED: "compiled"}


def _mode_param(mode: str, *values, id_: str):
  # The compiled mode carries the `gpu` marker (so `-m "not gpu"` drops it)
  # and the same skip the SSD tests always had.
  marks = ((pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason=NO_GPU_REASON))
           if mode == COMPILED else ())
  return pytest.param(mode, *values, id=id_, marks=marks)


# `@pytest.mark.parametrize("mode", kernel_cases.MODES)` for a test that
# runs in both modes but is not a reference comparison over a case set.
MODES = [_mode_param(m, id_=i) for m, i in _MODE_IDS.items()]


def interpret(mode: str) -> bool:
  """The kernels' `interpret` argument for a mode."""
  if mode not in _MODE_IDS:
    raise ValueError(f"unknown kernel test mode {mode!r}")
  return mode == INTERPRET


def parametrize(cases: Mapping[str, Any], compiled_only: Mapping[str, Any] | None = None):
  """`@pytest.mark.parametrize("mode, case", ...)` over both modes.

  Args:
    cases: name -> case, run in both modes.
    compiled_only: name -> case, run compiled only (too slow interpreted).

  Returns:
    The parametrize mark; test ids read `<case>-<mode>`.
  """
  params = []
  for mode, mode_id in _MODE_IDS.items():
    every = dict(cases)
    if mode == COMPILED:
      every.update(compiled_only or {})
    params += [_mode_param(mode, case, id_=f"{name}-{mode_id}")
               for name, case in every.items()]
  return pytest.mark.parametrize(("mode", "case"), params)


# ---- tolerances -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Close:
  """Elementwise bound, as `np.testing.assert_allclose(rtol, atol)`."""
  rtol: float
  atol: float

  def check(self, got, want, name: str):
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=self.rtol, atol=self.atol, err_msg=name)


@dataclasses.dataclass(frozen=True)
class RelL2:
  """||got - want|| / ||want|| < bound: for outputs that sum many products,
  whose elementwise error near zero entries says little."""
  bound: float

  def check(self, got, want, name: str):
    a, b = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = float(np.linalg.norm(a - b) / (np.linalg.norm(b) + 1e-30))
    assert err < self.bound, f"{name}: rel L2 err {err:.2e} >= {self.bound:.1e}"


Tol = Close | RelL2


@dataclasses.dataclass(frozen=True)
class Tols:
  """An op's bounds for one dtype.

  out: one bound for every output, or output name -> bound.
  grad: one bound for every gradient, or argument name -> bound.
  """
  out: Tol | Mapping[str, Tol]
  grad: Tol | Mapping[str, Tol]


def tols_for(table: Mapping[Any, Tols], dtype) -> Tols:
  """table[dtype], by the dtype's canonical name (jnp.float32 or np.dtype)."""
  by_name = {jnp.dtype(k).name: v for k, v in table.items()}
  return by_name[jnp.dtype(dtype).name]


def _pick(spec, name: str) -> Tol:
  if isinstance(spec, Mapping):
    # Nested outputs (a tuple under one name) share that name's bound.
    return spec[name.split("[")[0]]
  return spec


# ---- the comparison ---------------------------------------------------------


def _named_leaves(tree) -> list[tuple[str, Any]]:
  """(name, leaf): dict keys for a dict of outputs, "out" for one array."""
  if not isinstance(tree, Mapping):
    tree = {"out": tree}
  out = []
  for key, value in tree.items():
    leaves = jax.tree.leaves(value)
    out += [(key if len(leaves) == 1 else f"{key}[{i}]", leaf) for i, leaf in enumerate(leaves)]
  return out


def check_outputs_and_grads(kernel: Callable[..., Any], reference: Callable[..., Any],
                            args: Mapping[str, jax.Array], tols: Tols, *, seed: int = 0,
                            min_kernels: int = 2) -> None:
  """Asserts kernel(**args) matches reference(**args), outputs and gradients.

  Both functions take the differentiable inputs by name (anything else, like
  segment ids, is closed over) and return one array or a dict of outputs.
  The gradients are the VJP of one random cotangent per output, w.r.t. every
  argument. Each output and gradient must have the reference's shape and
  dtype, be finite and lie within `tols`; each reference gradient must be
  nonzero, since a zero kernel gradient would pass a loose bound against a
  tiny reference.

  Args:
    kernel: the function under test (run under `jax.jit`, as the model does).
    reference: the pure-JAX reference (autodiff or its XLA custom VJP).
    args: name -> array.
    tols: the op's bounds for this case's dtype.
    seed: of the cotangents.
    min_kernels: how many `pallas_call`s the kernel's forward + backward
      must contain: the ops fall back to XLA on shapes their kernels do not
      take, and a case that silently tested XLA against XLA would prove
      nothing about the kernel.
  """
  want, ref_vjp = jax.vjp(lambda a: reference(**a), dict(args))
  keys = jax.random.split(jax.random.key(seed), len(jax.tree.leaves(want)))
  leaves, treedef = jax.tree.flatten(want)
  cot = treedef.unflatten([jax.random.normal(k, w.shape, w.dtype) for k, w in zip(keys, leaves)])

  def run(a):
    out, vjp = jax.vjp(lambda a: kernel(**a), a)
    return out, vjp(cot)[0]

  traced = jax.jit(run).trace(dict(args))
  found = str(traced.jaxpr).count("pallas_call")
  assert found >= min_kernels, f"{found} pallas_call(s) in the kernel's jaxpr, want {min_kernels}"
  got, grads = traced.lower().compile()(dict(args))
  (ref_grads,) = ref_vjp(cot)

  got_named, want_named = _named_leaves(got), _named_leaves(want)
  assert [n for n, _ in got_named] == [n for n, _ in want_named]
  for (name, g), (_, w) in zip(got_named, want_named):
    assert (g.shape, g.dtype) == (w.shape, w.dtype), name
    assert np.all(np.isfinite(np.asarray(g, np.float32))), name
    _pick(tols.out, name).check(g, w, name)
  for name in args:
    g, w = grads[name], ref_grads[name]
    assert (g.shape, g.dtype) == (w.shape, w.dtype), f"d{name}"
    assert np.all(np.isfinite(np.asarray(g, np.float32))), f"d{name}"
    assert np.linalg.norm(np.asarray(w, np.float32)) > 0, f"d{name}"
    _pick(tols.grad, name).check(g, w, f"d{name}")
