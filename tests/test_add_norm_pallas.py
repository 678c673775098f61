"""The fused residual add + RMSNorm: XLA custom VJP and Pallas kernels vs autodiff.

The case set runs in both modes of `kernel_cases` (interpreted on any
backend, compiled on a GPU) through the layer's custom VJP, and through its
XLA form; the rest checks the XLA fallback and the CUDA lowering.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import kernel_cases
import numpy as np
import pytest

from kernels import add_norm_pallas_gpu
from kernels import norms


def _plain(hidden, residual, weight):
  s = hidden.astype(jnp.float32) + residual
  return s, norms.rms_normalize(s, weight)


def _inputs(shape, hidden_dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(0), 5)
  return (jax.random.normal(keys[0], shape, hidden_dtype), jax.random.normal(keys[1], shape),
          1.0 + 0.1 * jax.random.normal(keys[2], shape[-1:]),
          (jax.random.normal(keys[3], shape), jax.random.normal(keys[4], shape)))


@dataclasses.dataclass(frozen=True)
class Case:
  """One add + norm problem (rows per example a multiple of 16)."""
  shape: tuple[int, int, int]
  dtype: Any  # hidden's and the normalised output's; residual is float32.
  # Consumers of normed: with 3, their gradients reach the backward
  # separately and must add up to autodiff's through one output.
  copies: int = 1
  # Against the layer's XLA custom VJP instead of plain autodiff.
  xla_reference: bool = False
  tols: kernel_cases.Tols | None = None  # None: TOLS by dtype


TOLS = {
    jnp.float32: kernel_cases.Tols(
        out=dict(s=kernel_cases.Close(1e-6, 1e-6), normed=kernel_cases.Close(1e-5, 1e-5)),
        grad=kernel_cases.Close(1e-4, 1e-4)),
    # s and the residual's gradient stay float32; normed and dhidden are
    # rounded to bf16, dweight sums float32 products of bf16 gradients.
    jnp.bfloat16: kernel_cases.Tols(
        out=dict(s=kernel_cases.Close(1e-6, 1e-6), normed=kernel_cases.Close(1e-2, 1e-2)),
        grad=dict(hidden=kernel_cases.Close(1e-2, 1e-2),
                  residual=kernel_cases.Close(1e-4, 1e-4),
                  weight=kernel_cases.Close(1e-3, 1e-3))),
}
CASES = {
    "f32": Case((2, 32, 64), jnp.float32),
    "f32_copies3": Case((2, 32, 64), jnp.float32, copies=3),
    "bf16": Case((2, 64, 128), jnp.bfloat16),
}
COMPILED_ONLY = {
    # dweight sums 4k rows: an absolute bound of its size.
    "f32_mambaeye_vs_xla": Case((4, 1024, 256), jnp.float32, xla_reference=True,
                                tols=kernel_cases.Tols(out=kernel_cases.Close(1e-5, 1e-5),
                                                       grad=kernel_cases.Close(1e-4, 1e-3))),
}


def _layer(case, impl):
  def fn(hidden, residual, weight):
    s, normed = norms.add_rms_norm(hidden, residual, weight, 1e-5, case.dtype, impl,
                                   copies=case.copies)
    return dict(s=s, normed=normed)
  return fn


def _reference(case):
  if case.xla_reference:
    return _layer(case, None)

  def plain(hidden, residual, weight):
    s, normed = _plain(hidden, residual, weight)
    normed = normed.astype(case.dtype)
    return dict(s=s, normed=(normed,) * case.copies if case.copies > 1 else normed)

  return plain


def _args(case):
  hidden, residual, weight, _ = _inputs(case.shape, case.dtype)
  return dict(hidden=hidden, residual=residual, weight=weight)


@kernel_cases.parametrize(CASES, COMPILED_ONLY)
def test_kernels_match_reference(mode, case):
  kernel_cases.check_outputs_and_grads(_layer(case, mode), _reference(case), _args(case),
                                       case.tols or kernel_cases.tols_for(TOLS, case.dtype))


@pytest.mark.parametrize("case", [pytest.param(c, id=n) for n, c in CASES.items()])
def test_xla_form_matches_autodiff(case):
  """The custom VJP without kernels (impl None), the kernels' XLA twin."""
  kernel_cases.check_outputs_and_grads(_layer(case, None), _reference(case), _args(case),
                                       kernel_cases.tols_for(TOLS, case.dtype), min_kernels=0)


@pytest.mark.parametrize("impl", [None, kernel_cases.INTERPRET])
def test_copies_must_be_positive(impl):
  hidden, residual, weight, _ = _inputs((2, 32, 64))
  with pytest.raises(ValueError, match="copies"):
    norms.add_rms_norm(hidden, residual, weight, 1e-5, jnp.float32, impl, copies=0)


def test_unsupported_shapes():
  assert not add_norm_pallas_gpu.supported(64, 96)
  assert not add_norm_pallas_gpu.supported(48, 256)
  hidden, residual, weight, _ = _inputs((2, 48, 96))
  got = norms.add_rms_norm(hidden, residual, weight, 1e-5, jnp.float32, "pallas_interpret")  # XLA
  np.testing.assert_allclose(got[1], _plain(hidden, residual, weight)[1], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="power-of-two"):
    add_norm_pallas_gpu.forward(hidden.reshape(-1, 96), residual.reshape(-1, 96), weight, 1e-5,
                                jnp.float32, interpret=True)


def test_kernels_lower_for_cuda(cuda_lowering):
  x = jnp.zeros((4096, 256), jnp.bfloat16)

  def both(h, r, w):
    s, normed, rstd = add_norm_pallas_gpu.forward(h, r, w, 1e-5, jnp.bfloat16)
    return add_norm_pallas_gpu.backward(s, rstd, w, s, [normed] * 4, jnp.bfloat16, jnp.float32)

  text = cuda_lowering(both, x, x.astype(jnp.float32), jnp.ones((256,)))
  assert "add_norm_fwd" in text and "add_norm_bwd" in text
