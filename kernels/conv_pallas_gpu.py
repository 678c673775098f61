"""Mamba2's causal depthwise conv + SiLU as Pallas kernels for NVIDIA GPUs.

Dimension letters: b batch, t tokens, c channels, k taps (d_conv);
tt tokens per program (`block_t`), cc channels per program (`block_c`).

    out_t = silu(bias + sum_k kernel[k] * x_{t - (K-1-k)})

with x before the row's start, or before the token's segment start, taken as
zero. The reference is `kernels.conv_reference.causal_conv_silu_reference` (XLA, with its
own custom VJP); tests/test_conv_pallas.py checks this module against it and
against autodiff of the plain definition, in interpret mode on the CPU.

Design. One program per (batch row, tt tokens, cc channels). The K shifted
windows of x are read as row gathers (clipped row indices, then masked), so
no padded copy of x is made and interpret mode reads the same rows as the
GPU. Everything is computed in float32; x, the output and dx keep their
dtype (bf16 in training).

The backward runs in two passes. The first recomputes the pre-activation,
writes d(pre-activation) (one sigmoid per token; in d_out's dtype, bf16 in
training) and, while it holds that gradient in float32 beside the K windows
of x it just read, sums their products into per-tile partial sums of the
kernel and bias gradients, which XLA adds up (small: (b, t / tt, K + 1, c)
float32). The second reads d(pre-activation) at the K shifted rows for dx
alone. A one-pass variant (`bwd_two_pass=False`) recomputes the
pre-activation at the K - 1 tokens after its tile instead (K sigmoids a
token). Times of both and of XLA: `python benchmarks/bench_conv.py`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels import pallas_gpu
from kernels import segments

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class ConvGpuConfig:
  """Tiles and launch parameters of both kernels (picked on an H100 with
  `python benchmarks/bench_conv.py`). The backward keeps more (tt, cc) float32
  tiles alive, so it takes smaller ones."""
  block_t: int = 64
  block_c: int = 64
  num_warps: int = 4
  bwd_block_t: int = 64
  bwd_block_c: int = 64
  bwd_num_warps: int = 4
  # Backward token tiles are halved (down to 16) until the grid has this many
  # programs: narrow convs (B and C, 128 channels) otherwise leave too few.
  bwd_min_programs: int = 4096
  # Two backward passes: d(pre-activation) and the parameter sums once per
  # token, then dx from it; one pass recomputes it at K offsets.
  bwd_two_pass: bool = True
  # The two-pass d(pre-activation) in float32 rather than in d_out's dtype.
  # Only dx reads it back, which is rounded to that dtype anyway; bf16 moves
  # a third fewer bytes (the kernel and bias sums use the float32 value).
  bwd_dpre_f32: bool = False


def tiles(length: int, channels: int, block_t: int = 64, block_c: int = 64):
  """(tt, cc) dividing (length, channels), at most (block_t, block_c), or None.

  Powers of two (Triton's tile shapes) down to 16 tokens and 32 channels.
  """
  bt = next((b for b in (block_t, 32, 16) if b <= block_t and length % b == 0), None)
  bc = next((b for b in (block_c, 64, 32) if b <= block_c and channels % b == 0), None)
  return None if bt is None or bc is None else (bt, bc)


class _Rows:
  """Row gathers of one program's token tile at an offset, clipped and masked."""

  def __init__(self, t0, tt, length, seg_ref):
    self.t0, self.tt, self.length, self.seg_ref = t0, tt, length, seg_ref
    self._seg = {}
    self._raw = {}  # (ref, offset) -> loaded rows: each offset is read once.

  def index(self, offset):
    rows = self.t0 + offset + jnp.arange(self.tt, dtype=jnp.int32)
    valid = (rows >= 0) & (rows < self.length)
    return jnp.clip(rows, 0, self.length - 1), valid

  def segment(self, offset):
    if offset not in self._seg:
      self._seg[offset] = self.seg_ref[self.index(offset)[0]]
    return self._seg[offset]

  def load(self, ref, offset, *, same_as=None):
    """ref rows t + offset (tt, cc) float32, zero off the row or the segment.

    same_as: also zero where the segment differs from the token at t + same_as.
    """
    idx, valid = self.index(offset)
    if same_as is not None and self.seg_ref is not None:
      valid = valid & (self.segment(offset) == self.segment(same_as))
    key = (id(ref), offset)
    if key not in self._raw:
      self._raw[key] = ref[idx, :]
    return jnp.where(valid[:, None], self._raw[key].astype(_F32), 0.0)


def _taps(w_ref):
  """The kernel's rows as a list of (cc,) float32 (rows of a loaded tile cannot
  be sliced in Triton; each is its own load)."""
  return [w_ref[k, :].astype(_F32) for k in range(w_ref.shape[0])]


def _pre_activation(rows, x_ref, w, bias, offset):
  """bias + sum_k w[k] x_{t + offset - (K-1-k)}, at tokens t + offset: (tt, cc)."""
  taps = len(w)
  acc = jnp.broadcast_to(bias[None, :], (rows.tt, bias.shape[0]))
  for k in range(taps):
    acc = acc + rows.load(x_ref, offset - (taps - 1 - k), same_as=offset) * w[k][None, :]
  return acc


def _fwd_kernel(*refs, tt, length, has_seg):
  if has_seg:
    x_ref, w_ref, b_ref, seg_ref, o_ref = refs
  else:
    (x_ref, w_ref, b_ref, o_ref), seg_ref = refs, None
  rows = _Rows(pl.program_id(1) * tt, tt, length, seg_ref)
  pre = _pre_activation(rows, x_ref, _taps(w_ref), b_ref[...].astype(_F32), 0)
  o_ref[...] = pallas_gpu.silu_and_grad(pre)[0].astype(o_ref.dtype)


def _bwd_kernel(*refs, tt, length, has_seg):
  """The one-pass backward (`bwd_two_pass=False`)."""
  if has_seg:
    x_ref, dout_ref, w_ref, b_ref, seg_ref, dx_ref, dw_ref, db_ref = refs
  else:
    (x_ref, dout_ref, w_ref, b_ref, dx_ref, dw_ref, db_ref), seg_ref = refs, None
  w, bias = _taps(w_ref), b_ref[...].astype(_F32)
  taps = len(w)
  rows = _Rows(pl.program_id(1) * tt, tt, length, seg_ref)
  dx = jnp.zeros((tt, bias.shape[0]), _F32)
  for offset in range(taps):  # d pre-activation at tokens t + offset.
    pre = _pre_activation(rows, x_ref, w, bias, offset)
    dpre = rows.load(dout_ref, offset, same_as=0 if offset else None) * pallas_gpu.silu_and_grad(pre)[1]
    # x_t feeds token t + offset through tap K-1-offset.
    dx = dx + dpre * w[taps - 1 - offset][None, :]
    if offset == 0:
      _param_grad_sums(rows, x_ref, dpre, dw_ref, db_ref)
  dx_ref[...] = dx.astype(dx_ref.dtype)


def _param_grad_sums(rows, x_ref, dpre, dw_ref, db_ref):
  """This tile's kernel and bias gradient sums over its tokens, float32."""
  taps = dw_ref.shape[0]
  db_ref[...] = jnp.sum(dpre, axis=0).astype(db_ref.dtype)
  for k in range(taps):
    window = rows.load(x_ref, -(taps - 1 - k), same_as=0)
    dw_ref[k, :] = jnp.sum(dpre * window, axis=0).astype(dw_ref.dtype)


def _bwd_pre_kernel(*refs, tt, length, has_seg):
  """Pass 1 of 2: d pre-activation = d_out * silu'(pre) (tt, cc) in dpre_ref's
  dtype, and the kernel and bias gradient sums from its float32 value."""
  if has_seg:
    x_ref, dout_ref, w_ref, b_ref, seg_ref, dpre_ref, dw_ref, db_ref = refs
  else:
    (x_ref, dout_ref, w_ref, b_ref, dpre_ref, dw_ref, db_ref), seg_ref = refs, None
  rows = _Rows(pl.program_id(1) * tt, tt, length, seg_ref)
  pre = _pre_activation(rows, x_ref, _taps(w_ref), b_ref[...].astype(_F32), 0)
  dpre = rows.load(dout_ref, 0) * pallas_gpu.silu_and_grad(pre)[1]
  dpre_ref[...] = dpre.astype(dpre_ref.dtype)
  _param_grad_sums(rows, x_ref, dpre, dw_ref, db_ref)


def _bwd_dx_kernel(*refs, tt, length, has_seg):
  """Pass 2 of 2: dx from d pre-activation at the K tokens each x_t feeds."""
  if has_seg:
    dpre_ref, w_ref, seg_ref, dx_ref = refs
  else:
    (dpre_ref, w_ref, dx_ref), seg_ref = refs, None
  w = _taps(w_ref)
  taps = len(w)
  rows = _Rows(pl.program_id(1) * tt, tt, length, seg_ref)
  dx = jnp.zeros((tt, w_ref.shape[1]), _F32)
  for offset in range(taps):  # x_t feeds token t + offset through tap K-1-offset.
    dx = dx + rows.load(dpre_ref, offset, same_as=0 if offset else None) * w[taps - 1 - offset]
  dx_ref[...] = dx.astype(dx_ref.dtype)


def _specs(length, taps, tt, cc):
  """BlockSpecs over grid (b, t / tt, c / cc)."""
  return dict(
      whole_rows=pl.BlockSpec((None, length, cc), lambda bi, ti, ci: (bi, 0, ci)),
      tile=pl.BlockSpec((None, tt, cc), lambda bi, ti, ci: (bi, ti, ci)),
      taps=pl.BlockSpec((taps, cc), lambda bi, ti, ci: (0, ci)),
      channels=pl.BlockSpec((cc,), lambda bi, ti, ci: (ci,)),
      segments=pl.BlockSpec((None, length), lambda bi, ti, ci: (bi, 0)),
      tile_taps=pl.BlockSpec((None, None, taps, cc), lambda bi, ti, ci: (bi, ti, 0, ci)),
      tile_channels=pl.BlockSpec((None, None, cc), lambda bi, ti, ci: (bi, ti, ci)),
  )


def _check(x, kernel, block_t, block_c):
  b, t, c = x.shape
  if kernel.ndim != 2 or kernel.shape[1] != c:
    raise ValueError(f"kernel must be (taps, {c}), got {kernel.shape}")
  fit = tiles(t, c, block_t, block_c)
  if fit is None:
    raise ValueError(f"conv kernel needs length % 16 == 0 and channels % 32 == 0, got "
                     f"x {x.shape}; use kernels.conv_reference.causal_conv_silu_reference")
  return b, t, c, fit


def forward(x, kernel, bias, segment_ids, out_dtype, *, cfg=ConvGpuConfig(),
            interpret=False):
  """silu(conv(x)): x (b, t, c), kernel (K, c), bias (c,), segment_ids (b, t) or None.

  segment_ids must be run ids (nondecreasing per row; see
  `kernels.segments.renumber_segments`). Returns (b, t, c) out_dtype.
  """
  b, t, c, (tt, cc) = _check(x, kernel, cfg.block_t, cfg.block_c)
  s = _specs(t, kernel.shape[0], tt, cc)
  has_seg = segment_ids is not None
  (out,) = pallas_gpu.launch(
      functools.partial(_fwd_kernel, tt=tt, length=t, has_seg=has_seg), "conv_silu_fwd",
      (b, t // tt, c // cc),
      [(x, s["whole_rows"]), (kernel, s["taps"]), (bias, s["channels"]),
       (segment_ids, s["segments"])],
      [(jax.ShapeDtypeStruct((b, t, c), out_dtype), s["tile"])], cfg.num_warps, interpret)
  return out


def backward(x, kernel, bias, segment_ids, d_out, *, cfg=ConvGpuConfig(), interpret=False):
  """Gradients of `forward` w.r.t. x (x.dtype), kernel and bias (float32 sums)."""
  b, t, c, (tt, cc) = _check(x, kernel, cfg.bwd_block_t, cfg.bwd_block_c)
  while b * (t // tt) * (c // cc) < cfg.bwd_min_programs and tt > 16:
    tt //= 2  # Still divides t: tiles() picked a power of two >= 16 that does.
  taps = kernel.shape[0]
  s = _specs(t, taps, tt, cc)
  has_seg = segment_ids is not None
  grid = (b, t // tt, c // cc)
  grads = [(jax.ShapeDtypeStruct((b, t, c), x.dtype), s["tile"]),
           (jax.ShapeDtypeStruct((b, t // tt, taps, c), _F32), s["tile_taps"]),
           (jax.ShapeDtypeStruct((b, t // tt, c), _F32), s["tile_channels"])]
  if cfg.bwd_two_pass:
    dpre_dtype = _F32 if cfg.bwd_dpre_f32 else d_out.dtype
    dpre, dw_parts, db_parts = pallas_gpu.launch(
        functools.partial(_bwd_pre_kernel, tt=tt, length=t, has_seg=has_seg),
        "conv_silu_bwd_pre", grid,
        [(x, s["whole_rows"]), (d_out, s["whole_rows"]), (kernel, s["taps"]),
         (bias, s["channels"]), (segment_ids, s["segments"])],
        [(jax.ShapeDtypeStruct((b, t, c), dpre_dtype), s["tile"])] + grads[1:],
        cfg.bwd_num_warps, interpret)
    (dx,) = pallas_gpu.launch(
        functools.partial(_bwd_dx_kernel, tt=tt, length=t, has_seg=has_seg),
        "conv_silu_bwd", grid,
        [(dpre, s["whole_rows"]), (kernel, s["taps"]), (segment_ids, s["segments"])],
        grads[:1], cfg.bwd_num_warps, interpret)
  else:
    dx, dw_parts, db_parts = pallas_gpu.launch(
        functools.partial(_bwd_kernel, tt=tt, length=t, has_seg=has_seg), "conv_silu_bwd",
        grid,
        [(x, s["whole_rows"]), (d_out, s["whole_rows"]), (kernel, s["taps"]),
         (bias, s["channels"]), (segment_ids, s["segments"])],
        grads, cfg.bwd_num_warps, interpret)
  return dx, dw_parts.sum((0, 1)), db_parts.sum((0, 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _conv_silu(x, kernel, bias, segment_ids, out_dtype, cfg, interpret):
  return forward(x, kernel, bias, segment_ids, out_dtype, cfg=cfg, interpret=interpret)


def _conv_silu_fwd(x, kernel, bias, segment_ids, out_dtype, cfg, interpret):
  out = forward(x, kernel, bias, segment_ids, out_dtype, cfg=cfg, interpret=interpret)
  return out, (x, kernel, bias, segment_ids)


def _conv_silu_bwd(out_dtype, cfg, interpret, residuals, d_out):
  del out_dtype
  x, kernel, bias, segment_ids = residuals
  dx, dw, db = backward(x, kernel, bias, segment_ids, d_out, cfg=cfg, interpret=interpret)
  return dx, dw.astype(kernel.dtype), db.astype(bias.dtype), None


_conv_silu.defvjp(_conv_silu_fwd, _conv_silu_bwd)


def causal_conv_silu(x, kernel, bias, segment_ids=None, out_dtype=None, *,
                     cfg: ConvGpuConfig = ConvGpuConfig(), interpret: bool = False):
  """Differentiable silu(causal depthwise conv(x)) through the kernels.

  Args:
    x: (b, t, c) with t % 16 == 0 and c % 32 == 0 (`tiles`).
    kernel: (K, c) taps, kernel[K - 1] multiplies the current token.
    bias: (c,).
    segment_ids: (b, t) int or None; taps never reach into another segment
      (any ids: they are renumbered into runs here).
    out_dtype: the result's dtype (default x.dtype).
    cfg: tiles.
    interpret: run the kernels in the Pallas interpreter (any backend).

  Returns:
    (b, t, c) in out_dtype.
  """
  if segment_ids is not None:
    segment_ids = segments.renumber_segments(segment_ids)
  return _conv_silu(x, kernel, bias, segment_ids, out_dtype or x.dtype, cfg, interpret)
