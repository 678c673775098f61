"""The pre-norm step, residual += hidden then RMSNorm, as Pallas GPU kernels.

Dimension letters: r rows (tokens, batch flattened), d features, rr rows per
program (`block_rows`).

Forward: s = hidden + residual (float32), normed = s / rms(s) * weight in the
output dtype, and 1/rms per row. Backward, from the gradients of both
outputs: ds = d_s + rstd * (g - n * mean(g * n)) with n = s * rstd and
g = d_normed * weight, which is the gradient of hidden and of residual alike,
and this tile's share of the weight gradient (XLA adds the (r / rr, d)
shares). d_normed may come in parts, one per consumer of normed, added here
in float32 so that no pass before this one has to add them. Each direction reads its inputs once; XLA's fusions of the same math
read the residual stream two or three times per direction (measured on an
H100: ~3 ms of a 31 ms Tiny training step). The reference is
`kernels.norms.add_rms_norm` (XLA, with its own custom VJP); both
kernels are tested against it in interpret mode on the CPU
(tests/test_add_norm_pallas.py). A power-of-two d: other widths use XLA.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels import pallas_gpu

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class AddNormGpuConfig:
  """Rows per program and warps."""
  block_rows: int = 32
  num_warps: int = 4


def supported(rows: int, features: int, cfg: AddNormGpuConfig = AddNormGpuConfig()) -> bool:
  """Whether the kernels take these shapes (else use XLA)."""
  return features & (features - 1) == 0 and rows % cfg.block_rows == 0


def _check(rows, features, cfg):
  if not supported(rows, features, cfg):
    raise ValueError(f"add+norm kernel needs rows % {cfg.block_rows} == 0 and a power-of-two "
                     f"width, got ({rows}, {features}); use kernels.norms.add_rms_norm")


def _fwd_kernel(h_ref, r_ref, w_ref, s_ref, out_ref, rstd_ref, *, eps):
  s = h_ref[...].astype(_F32) + r_ref[...].astype(_F32)
  rstd = jax.lax.rsqrt(jnp.mean(s * s, axis=1) + eps)
  s_ref[...] = s
  out_ref[...] = (s * rstd[:, None] * w_ref[...].astype(_F32)[None, :]).astype(out_ref.dtype)
  rstd_ref[...] = rstd


def forward(hidden, residual, weight, eps, out_dtype, *, cfg=AddNormGpuConfig(),
            interpret=False):
  """hidden, residual: (r, d); weight (d,) -> s (r, d) f32, normed (r, d), rstd (r,) f32."""
  r, d = hidden.shape
  _check(r, d, cfg)
  rr = cfg.block_rows
  rows = pl.BlockSpec((rr, d), lambda i: (i, 0))
  return pallas_gpu.launch(
      lambda *refs: _fwd_kernel(*refs, eps=eps), "add_norm_fwd", (r // rr,),
      [(hidden, rows), (residual, rows), (weight, pl.BlockSpec((d,), lambda i: (0,)))],
      [(jax.ShapeDtypeStruct((r, d), _F32), rows),
       (jax.ShapeDtypeStruct((r, d), out_dtype), rows),
       (jax.ShapeDtypeStruct((r,), _F32), pl.BlockSpec((rr,), lambda i: (i,)))],
      cfg.num_warps, interpret)


def _bwd_kernel(s_ref, rstd_ref, w_ref, ds_ref, *refs, parts):
  dn_refs, (dh_ref, dr_ref, dw_ref) = refs[:parts], refs[parts:]
  rstd = rstd_ref[...][:, None]
  normed = s_ref[...] * rstd
  d_normed = sum(dn[...].astype(_F32) for dn in dn_refs)
  g = d_normed * w_ref[...].astype(_F32)[None, :]
  ds = ds_ref[...].astype(_F32) + rstd * (g - normed * jnp.mean(g * normed, axis=1)[:, None])
  dh_ref[...] = ds.astype(dh_ref.dtype)
  dr_ref[...] = ds.astype(dr_ref.dtype)
  dw_ref[...] = jnp.sum(d_normed * normed, axis=0)


def backward(s, rstd, weight, d_s, d_normed, hidden_dtype, residual_dtype, *,
             cfg=AddNormGpuConfig(), interpret=False):
  """Gradients of `forward` w.r.t. hidden, residual (their dtypes) and weight (f32).

  Args:
    s: (r, d) float32 and rstd (r,) from `forward`.
    weight: (d,).
    d_s: (r, d) gradient of s.
    d_normed: (r, d) gradient of normed, or a sequence of such parts (one
      per consumer) whose sum it is.
  """
  r, d = s.shape
  _check(r, d, cfg)
  rr = cfg.block_rows
  rows = pl.BlockSpec((rr, d), lambda i: (i, 0))
  parts = [d_normed] if isinstance(d_normed, jax.Array) else list(d_normed)
  dh, dr, dw_parts = pallas_gpu.launch(
      functools.partial(_bwd_kernel, parts=len(parts)), "add_norm_bwd", (r // rr,),
      [(s, rows), (rstd, pl.BlockSpec((rr,), lambda i: (i,))),
       (weight, pl.BlockSpec((d,), lambda i: (0,))), (d_s, rows)]
      + [(part, rows) for part in parts],
      [(jax.ShapeDtypeStruct((r, d), hidden_dtype), rows),
       (jax.ShapeDtypeStruct((r, d), residual_dtype), rows),
       (jax.ShapeDtypeStruct((r // rr, d), _F32), pl.BlockSpec((None, d), lambda i: (i, 0)))],
      cfg.num_warps, interpret)
  return dh, dr, dw_parts.sum(0)
