"""Shared test fixtures: where the official golden outputs live; CUDA lowering."""

import glob
import os

import jax
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def golden_dir() -> str:
  """MAMBAEYE_GOLDEN_DIR, or ../shared/golden beside the repository."""
  return os.environ.get("MAMBAEYE_GOLDEN_DIR",
                        os.path.join(REPO_ROOT, "..", "shared", "golden"))


def golden_pairs():
  """[(name, state_dict path, io npz path)] for every official_<name>.pt."""
  pairs = []
  for pt in sorted(glob.glob(os.path.join(golden_dir(), "official_*.pt"))):
    name = os.path.basename(pt)[len("official_"):-len(".pt")]
    npz = os.path.join(golden_dir(), f"official_{name}_io.npz")
    if os.path.exists(npz):
      pairs.append((name, pt, npz))
  return pairs


@pytest.fixture(params=golden_pairs() or [None],
                ids=lambda p: p[0] if p else "no-golden")
def golden(request):
  """One (name, .pt path, npz path) golden pair; skips when none exist."""
  if request.param is None:
    pytest.skip(f"no official_<name>.pt + _io.npz pairs in {golden_dir()} "
                "(set MAMBAEYE_GOLDEN_DIR)")
  return request.param


@pytest.fixture
def cuda_lowering():
  """(fn, *args) -> StableHLO text of jax.jit(fn) exported for CUDA.

  Runs the Triton lowering of Pallas GPU kernels on a machine without a GPU;
  the Triton custom call has no serialisation guarantee, which export checks
  for, so that one check is turned off.
  """
  def lower(fn, *args):
    exported = jax.export.export(
        jax.jit(fn), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(*args)
    return exported.mlir_module()

  return lower
