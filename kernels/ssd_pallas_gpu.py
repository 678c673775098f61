"""Mamba2's SSD chunked scan as Pallas kernels for NVIDIA GPUs.

Dimension letters as in `kernels.ssd_reference`:

    b  batch               l  length (tokens)        h  heads
    p  headdim             g  groups (B/C groups)    n  d_state
    q  tokens per in-kernel chunk (`block_q`)
    s  splits of the length (programs that walk one head's sequence)

Design.

* One program per (head, split, batch) walks its tokens in chunks of
  `block_q` with the (p, n) float32 state in registers: in the forward the
  chunk states never round-trip through device memory (mamba_ssm writes them
  out in float32 and reads them back in three more launches). Per chunk the
  program does four small matrix products (C B^T, (C B^T * decay) x, C S^T,
  x^T B) on the tensor cores. The in-kernel chunk need not equal the model's `chunk_size`
  (256 in Mamba2): the chunked form is exact for any chunk length.
* Where batch * heads is small (length 16384 at batch 4 gives 32 sequences
  for 132 SMs), the length is cut into `s` splits: a cheap kernel computes
  each split's own final state from zero, an unrolled `lax.scan` over the
  few splits (in XLA, on (b, h, s, p, n) float32, small) gives every split
  its incoming state, and the main kernel runs all splits in parallel. The
  split count is chosen by shape (`split_plan`).
* Numerically stable: every decay is the exp of a difference of cumulative
  log-decays inside one chunk, exp(cum_i - cum_j) with i >= j, masked before
  the exp, never exp(cum_i) * exp(-cum_j).
* Backward. Under `jax.grad` the forward kernel also stores the state
  entering every chunk ((b, h, l / q, p, n) in the compute dtype: as large
  as x when p = n = q = 64, written once and read once). `_bwd_kernel` then
  walks the chunks backward with the (p, n) adjoint state dS
  (dS_t = a_{t+1} dS_{t+1} + dy_t C_t^T) on chip and writes dx, dB, dC, both
  parts of d(dt), dD and d(initial state) in one pass. d(dt * A) is summed
  over the (source j, output i) pairs that straddle each token, so every
  term carries a decay <= 1; the shorter route through
  d cum_t = dy_t . y_t - dt_t x_t . (dS_t B_t) and a reverse cumulative sum
  subtracts large sums and lost dA to bf16 rounding (measured: 5-50%
  relative error at 75 tokens).

Why the Triton lowering of Pallas and not Mosaic GPU: on the H100 with JAX
0.11.2 a Triton-lowered kernel with this exact structure (fori_loop over
64-token chunks, (64, 64) float32 state in registers, several dots per chunk)
compiled, ran and matched the reference, while a first plain `pallas_call`
with Mosaic GPU compiler parameters failed an assertion (DESIGN.md section 4).
Mosaic GPU wants warpgroup-level programming (explicit wgmma layouts, TMA and
barriers) for which this work had no device budget to iterate; the Triton
path is measured in docs/ssd_kernel_notes.md. JAX warns that the Triton
lowering is deprecated; revisit when Mosaic GPU runs this shape of kernel.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels import segments

try:  # The Triton compiler parameters; absent from some CPU-only installs.
  from jax.experimental.pallas import triton as pltriton
except ImportError:  # pragma: no cover
  pltriton = None

Array = jax.Array
_F32 = jnp.float32


def _is_pow2(v: int) -> bool:
  return v > 0 and (v & (v - 1)) == 0


@dataclasses.dataclass(frozen=True)
class SSDGpuConfig:
  """Tile sizes and launch parameters of the GPU SSD kernels.

  Attributes:
    block_q: tokens per in-kernel chunk of the forward kernels (power of 2,
      16..256). Independent of the model's `chunk_size`.
    num_warps: warps per forward program.
    num_stages: software-pipelining depth of the forward chunk loop.
    bwd_block_q: tokens per chunk in the backward kernels (and in the
      training forward, which stores a state per chunk); None: by state size
      (see `resolved`).
    bwd_num_warps: warps per backward program.
    bwd_num_stages: pipelining depth of the backward chunk loops; None: by
      state size.
    min_programs: the length is split until batch * heads * splits reaches
      this many programs (about two per SM of an H100) ...
    min_split_chunks: ... while every split keeps at least this many chunks.
    split_chunks: if set, the number of chunks (of the larger block) per
      split, overriding the heuristic (used by tests to force splitting).
  """

  block_q: int = 64
  num_warps: int = 4
  num_stages: int = 2
  bwd_block_q: Optional[int] = None
  bwd_num_warps: int = 4
  bwd_num_stages: Optional[int] = None
  min_programs: int = 264
  min_split_chunks: int = 4
  split_chunks: Optional[int] = None

  def __post_init__(self):
    for name in ("block_q", "bwd_block_q"):
      v = getattr(self, name)
      if v is None and name == "bwd_block_q":
        continue
      if not (_is_pow2(v) and 16 <= v <= 256):
        raise ValueError(f"{name}={v} must be a power of 2 in [16, 256] "
                         "(Triton tiles are powers of 2; dots need >= 16)")
    for name in ("num_warps", "bwd_num_warps"):
      v = getattr(self, name)
      if not (_is_pow2(v) and v <= 16):
        raise ValueError(f"{name}={v} must be a power of 2 <= 16")
    for name in ("num_stages", "bwd_num_stages", "min_programs",
                 "min_split_chunks"):
      v = getattr(self, name)
      if v is None and name == "bwd_num_stages":
        continue
      if v < 1:
        raise ValueError(f"{name}={v} must be >= 1")
    if self.split_chunks is not None and self.split_chunks < 1:
      raise ValueError(f"split_chunks={self.split_chunks} must be >= 1 or None")


  def resolved(self, p: int, n: int) -> "SSDGpuConfig":
    """Fills the fields left None for a (p, n) state (padded sizes).

    Measured on the H100 (docs/ssd_kernel_notes.md, run C): with a (64, 64)
    state, 64-token backward chunks pipelined 2 deep are best; with (64, 128)
    (Mamba2 LM) the 64-token backward spills and 32-token chunks without
    pipelining run 1.3-1.4x faster end to end.
    """
    small = p * n <= 64 * 64
    return dataclasses.replace(
        self,
        bwd_block_q=(self.bwd_block_q if self.bwd_block_q is not None
                     else (64 if small else 32)),
        bwd_num_stages=(self.bwd_num_stages if self.bwd_num_stages is not None
                        else (2 if small else 1)))


def split_plan(b: int, h: int, l: int, cfg: SSDGpuConfig):
  """Returns (splits, split_len): how one head's sequence is cut.

  split_len is a multiple of both block sizes; splits * split_len >= l.
  """
  qmax = max(cfg.block_q, cfg.bwd_block_q or cfg.block_q)
  total = -(-l // qmax)
  if cfg.split_chunks is not None:
    per = min(cfg.split_chunks, total)
  else:
    splits = 1
    while (b * h * splits < cfg.min_programs
           and total // (2 * splits) >= cfg.min_split_chunks):
      splits *= 2
    per = -(-total // splits)
  splits = -(-total // per)
  return splits, per * qmax


# ----------------------------------------------------------------------------
# In-kernel helpers (traced inside the kernels; also run under interpret).
# ----------------------------------------------------------------------------


def _dot(a, b, ta=False, tb=False):
  """a @ b with optional transposes, float32 accumulation.

  float32 operands use IEEE float32 products (Triton would default to TF32,
  ~1e-3 relative error); 16-bit operands use the tensor cores.
  """
  prec = (lax.Precision.HIGHEST if a.dtype == _F32 else lax.Precision.DEFAULT)
  dims = (((0,) if ta else (1,), (1,) if tb else (0,)), ((), ()))
  return lax.dot_general(a, b, dims, precision=prec, preferred_element_type=_F32)


@dataclasses.dataclass
class _Decays:
  lmat: Array          # (q, q) exp(cum_i - cum_j), 0 unless j <= i, same segment
  to_end: Array        # (q,) exp(cum_last - cum_j), 0 off the last segment
  from_start: Array    # (q,) exp(cum_i), 0 where token i cannot see the carry
  chunk_decay: Array   # () exp(cum_last), 0 if a segment starts in the chunk


def _decays(la, run, runp, q, transpose=False):
  """Decay factors of one chunk.

  Args:
    la: (q,) float32 log decays dt * A.
    run: (q,) int32 segment run ids (nondecreasing), or None.
    runp: (q,) int32 run id of the previous token, or None.
    q: chunk length.
    transpose: return lmat transposed, [j, i] (the backward's orientation).
  """
  cum = jnp.cumsum(la)
  cum_last = jnp.sum(la)
  rows = lax.broadcasted_iota(jnp.int32, (q, q), 0)
  cols = lax.broadcasted_iota(jnp.int32, (q, q), 1)
  if transpose:
    mask = rows <= cols
    diff = cum[None, :] - cum[:, None]
  else:
    mask = rows >= cols
    diff = cum[:, None] - cum[None, :]
  if run is not None:
    mask = mask & (run[:, None] == run[None, :])
  # Masked before the exp: off the causal triangle the difference is
  # positive and could overflow.
  lmat = jnp.exp(jnp.where(mask, diff, -jnp.inf))
  to_end = jnp.exp(cum_last - cum)
  from_start = jnp.exp(cum)
  chunk_decay = jnp.exp(cum_last)
  if run is not None:
    last = jnp.max(run)    # run ids never decrease: the max is the last token's
    before = jnp.min(runp)  # ... and the min of runp is the token before chunk
    to_end = jnp.where(run == last, to_end, 0.0)
    from_start = jnp.where(run == before, from_start, 0.0)
    chunk_decay = jnp.where(last == before, chunk_decay, 0.0)
  return _Decays(lmat, to_end, from_start, chunk_decay)


def _unpack(refs, names, flags):
  """Maps kernel refs to names, skipping the optional ones not passed."""
  out, i = {}, 0
  for name in names:
    if flags.get(name, True):
      out[name] = refs[i]
      i += 1
    else:
      out[name] = None
  assert i == len(refs), (i, len(refs))
  return out


def _chunk_slice(c, q):
  return pl.ds(pl.multiple_of(c * q, q), q)


def _load_chunk(r, sl, has_seg):
  """Loads one chunk's operands; r maps names to refs (dict)."""
  run = r["run"][sl] if has_seg else None
  runp = r["runp"][sl] if has_seg else None
  return r["dt"][sl], r["la"][sl], run, runp


# ----------------------------------------------------------------------------
# Kernels. Refs are one program's blocks: x (L, p), dt/la (L,), B/C (L, n),
# run/runp (L,), states (p, n), with L the split length.
# ----------------------------------------------------------------------------


def _fwd_kernel(*refs, q, n_chunks, cd, has_seg, has_s_in, has_d,
                write_states):
  """y = SSD(x) over one split, starting from s_in; writes its final state.

  With write_states, also stores the state entering every chunk, (c, p, n)
  in the compute dtype, for the backward pass (l / q times smaller than a
  per-token state).
  """
  names = ["x", "dt", "la", "B", "C", "run", "runp", "s_in", "D", "y", "s_out",
           "states"]
  r = _unpack(refs, names, dict(run=has_seg, runp=has_seg, s_in=has_s_in,
                                D=has_d, states=write_states))
  p, n = r["x"].shape[1], r["B"].shape[1]
  d = r["D"][0].astype(_F32) if has_d else None

  def body(c, state):
    sl = _chunk_slice(c, q)
    x = r["x"][sl, :]
    bm = r["B"][sl, :].astype(cd)
    cm = r["C"][sl, :].astype(cd)
    dt, la, run, runp = _load_chunk(r, sl, has_seg)
    dec = _decays(la, run, runp, q)
    xc = x.astype(cd)
    state_c = state.astype(cd)
    if write_states:
      r["states"][c] = state_c.astype(r["states"].dtype)
    # Inside the chunk: y_i = sum_j (C_i . B_j) exp(cum_i - cum_j) dt_j x_j.
    w = _dot(cm, bm, tb=True) * dec.lmat * dt[None, :]
    y = _dot(w.astype(cd), xc)
    # From the carried state: y_i += exp(cum_i) C_i S^T.
    y = y + dec.from_start[:, None] * _dot(cm, state_c, tb=True)
    if has_d:
      y = y + d * x.astype(_F32)
    r["y"][sl, :] = y.astype(r["y"].dtype)
    xw = (x.astype(_F32) * (dec.to_end * dt)[:, None]).astype(cd)
    return dec.chunk_decay * state + _dot(xw, bm, ta=True)

  state = r["s_in"][...].astype(_F32) if has_s_in else jnp.zeros((p, n), _F32)
  state = lax.fori_loop(0, n_chunks, body, state)
  r["s_out"][...] = state


def _state_kernel(*refs, q, n_chunks, cd, has_seg, reverse):
  """One split's own final state (forward) or adjoint start state (reverse).

  Forward: S = sum_j exp(cum_end - cum_j) dt_j u_j v_j^T with u = x, v = B.
  Reverse: dS = sum_i exp(cum_i - cum_start) dy_i C_i^T with u = dy, v = C.
  """
  names = ["u", "dt", "la", "v", "run", "runp", "s_out"]
  r = _unpack(refs, names, dict(run=has_seg, runp=has_seg))
  p, n = r["u"].shape[1], r["v"].shape[1]

  def body(k, state):
    c = n_chunks - 1 - k if reverse else k
    sl = _chunk_slice(c, q)
    u = r["u"][sl, :].astype(_F32)
    v = r["v"][sl, :].astype(cd)
    dt, la, run, runp = _load_chunk(r, sl, has_seg)
    dec = _decays(la, run, runp, q)
    wt = dec.from_start if reverse else dec.to_end * dt
    return dec.chunk_decay * state + _dot((u * wt[:, None]).astype(cd), v, ta=True)

  r["s_out"][...] = lax.fori_loop(0, n_chunks, body, jnp.zeros((p, n), _F32))


def _bwd_kernel(*refs, q, n_chunks, cd, has_seg, has_ds_in, has_d):
  """Backward walk over one split's chunks with the adjoint state dS (p, n).

  Reads the forward state entering each chunk (`states`). Writes dx, this
  head's parts of dB and dC, d(dt) direct and d(dt * A) per token, the sum
  over tokens of dy * x (for dD) and dS at the split's start.

  d(dt * A)_t sums m_ij = dy_i . (d y_i / d cum) over the pairs j < t <= i
  that straddle t, split by where j and i lie relative to this chunk: both
  inside, j before it (through the incoming state), i after it (through dS),
  or both outside (chunk_decay * <dS, S>). Every term carries decays <= 1:
  no difference of sequence-long sums, which in bf16 lost d(dt) and dA.

  The (q, q) matrices are built transposed, [j, i], so that the products
  that contract over i take them untransposed.
  """
  names = ["x", "dt", "la", "B", "C", "dy", "run", "runp", "states", "ds_in",
           "D", "dx", "db", "dc", "ddt", "dla", "dd", "ds_out"]
  r = _unpack(refs, names, dict(run=has_seg, runp=has_seg, ds_in=has_ds_in,
                                D=has_d))
  p, n = r["x"].shape[1], r["B"].shape[1]
  d = r["D"][0].astype(_F32) if has_d else None

  def rev_cumsum(v):  # sum over k >= t (Triton has no reverse scan)
    return jnp.sum(v) - jnp.cumsum(v) + v

  def body(k, carry):
    dstate, dd_acc = carry
    c = n_chunks - 1 - k
    sl = _chunk_slice(c, q)
    x = r["x"][sl, :]
    xc = x.astype(cd)
    x32 = x.astype(_F32)
    bm = r["B"][sl, :].astype(cd)
    cm = r["C"][sl, :].astype(cd)
    dy_raw = r["dy"][sl, :]
    dy = dy_raw.astype(cd)
    dy32 = dy_raw.astype(_F32)
    dt, la, run, runp = _load_chunk(r, sl, has_seg)
    dec = _decays(la, run, runp, q, transpose=True)
    lt = dec.lmat                                  # [j, i] exp(cum_i - cum_j)
    s_prev = r["states"][c].astype(cd)  # forward state entering the chunk
    ds_c = dstate.astype(cd)
    g_bc = _dot(bm, cm, tb=True)   # [j, i] = B_j . C_i
    p_xy = _dot(xc, dy, tb=True)   # [j, i] = x_j . dy_i
    # dS_j B_j = sum_{i>=j} exp(cum_i - cum_j) (C_i . B_j) dy_i
    #            + exp(cum_end - cum_j) dS_end B_j.
    g_off = dec.to_end[:, None] * _dot(bm, ds_c, tb=True)  # (q, p)
    gx = _dot((g_bc * lt).astype(cd), dy) + g_off
    dx = dt[:, None] * gx
    if has_d:
      dx = dx + d * dy32
    r["dx"][sl, :] = dx.astype(r["dx"].dtype)
    r["ddt"][sl] = jnp.sum(x32 * gx, axis=1)
    # dB_j = dt_j (sum_{i>=j} exp(cum_i - cum_j) (dy_i . x_j) C_i
    #              + exp(cum_end - cum_j) dS_end^T x_j).
    m2 = p_xy * lt
    db = _dot(m2.astype(cd), cm) + dec.to_end[:, None] * _dot(xc, ds_c)
    r["db"][sl, :] = (dt[:, None] * db).astype(r["db"].dtype)
    # dC_i = sum_{j<=i} exp(cum_i - cum_j) dt_j (dy_i . x_j) B_j
    #        + exp(cum_i) S_prev dy_i.
    wc = m2 * dt[:, None]
    dc_off = dec.from_start[:, None] * _dot(dy, s_prev)  # (q, n)
    dc = _dot(wc.astype(cd), bm, ta=True) + dc_off
    r["dc"][sl, :] = dc.astype(r["dc"].dtype)
    # Pairs inside the chunk: m is lower triangular ([j, i] nonzero for
    # j <= i), and [j < t <= i] = [t <= i] - [t <= j] there, so the
    # straddling sum is a reverse cumsum of row sums minus column sums.
    m = wc * g_bc
    inner = rev_cumsum(jnp.sum(m, axis=0) - jnp.sum(m, axis=1))
    y_off = jnp.sum(cm.astype(_F32) * dc_off, axis=1)   # dy_i . y_i from S_prev
    x_off = dt * jnp.sum(x32 * g_off, axis=1)           # j's share via dS_end
    through = dec.chunk_decay * jnp.sum(dstate * s_prev.astype(_F32))
    r["dla"][sl] = (inner + rev_cumsum(y_off) + (jnp.cumsum(x_off) - x_off)
                    + through)
    dd_acc = dd_acc + jnp.sum(dy32 * x32, axis=0)
    dyw = (dy32 * dec.from_start[:, None]).astype(cd)
    dstate = dec.chunk_decay * dstate + _dot(dyw, cm, ta=True)
    return dstate, dd_acc

  dstate = (r["ds_in"][...].astype(_F32) if has_ds_in
            else jnp.zeros((p, n), _F32))
  dstate, dd_acc = lax.fori_loop(0, n_chunks, body,
                                 (dstate, jnp.zeros((p,), _F32)))
  r["dd"][...] = dd_acc
  r["ds_out"][...] = dstate


# ----------------------------------------------------------------------------
# Launch code.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Prepared:
  """Padded, kernel-layout operands shared by every launch of one call.

  x (b, L, h, p); B, C (b, L, g, n), or both the one packed array (b, L,
  2 g, n) with C's groups from c_group on; dt, la (b, h, L) float32; run,
  runp (b, L) int32 or None; L = splits * split_len >= l.
  """
  x: Array
  dt: Array
  la: Array
  B: Array
  C: Array
  c_group: int
  run: Optional[Array]
  runp: Optional[Array]
  splits: int
  split_len: int
  length: int


def _pad_len(t, extra, mode="constant"):
  if t is None or extra == 0:
    return t
  widths = [(0, 0)] * t.ndim
  widths[1] = (0, extra)
  return jnp.pad(t, widths, mode=mode)


def _pad_last(t, size):
  """Zero-pads the last axis up to `size` (headdim / d_state to a power of 2)."""
  if t is None or t.shape[-1] == size:
    return t
  widths = [(0, 0)] * (t.ndim - 1) + [(0, size - t.shape[-1])]
  return jnp.pad(t, widths)


def _pad_state(state, p2, n2):
  """(b, h, p, n) -> (b, h, p2, n2) float32, zero-padded like x and B."""
  p, n = state.shape[-2:]
  return jnp.pad(state.astype(_F32), ((0, 0), (0, 0), (0, p2 - p), (0, n2 - n)))


def _pow2_at_least_16(v):
  return max(16, 1 << max(0, (v - 1).bit_length()))


def prepare(x, dt, A, B, C, segment_ids, cfg: SSDGpuConfig) -> _Prepared:
  """Pads and lays out the operands (see `_Prepared`).

  Args:
    x: (b, l, h, p); dt: (b, l, h) effective step sizes; A: (h,);
    B, C: (b, l, g, n), or B (b, l, 2 g, n) holding both and C None (see
    `forward`); segment_ids: (b, l) int or None.
  """
  b, l, h, _ = x.shape
  splits, split_len = split_plan(b, h, l, cfg)
  extra = splits * split_len - l
  # Padding: x = B = C = dt = 0 (no input, no decay); the segment of the last
  # token continues, so padding resets nothing and the final state is the
  # state at token l - 1.
  x = _pad_last(_pad_len(x, extra), _pow2_at_least_16(x.shape[-1]))
  n2 = _pow2_at_least_16(B.shape[-1])
  B = _pad_last(_pad_len(B, extra), n2)
  if C is None:  # Packed: the kernels read C's groups of the same array.
    C, c_group = B, B.shape[2] // 2
  else:
    C, c_group = _pad_last(_pad_len(C, extra), n2), 0
  dt = jnp.swapaxes(_pad_len(dt.astype(_F32), extra), 1, 2)  # (b, h, L)
  la = dt * A.astype(_F32)[None, :, None]
  run = runp = None
  if segment_ids is not None:
    seg = _pad_len(segment_ids, extra, mode="edge")
    # Run ids count segment starts: nondecreasing, so a chunk's last run id is
    # its max and the previous token's is the min of runp.
    run = segments.renumber_segments(seg)
    runp = jnp.concatenate([run[:, :1], run[:, :-1]], axis=1)
  return _Prepared(x, dt, la, B, C, c_group, run, runp, splits, split_len, l)


def _specs(pr: _Prepared, heads_per_group: int):
  """BlockSpecs of the common operands for the grid (h, s, b).

  Heads vary fastest in the grid so programs running together read the same
  B / C rows (one group serves several heads) from L2.
  """
  L = pr.split_len
  p, n = pr.x.shape[-1], pr.B.shape[-1]
  r = heads_per_group
  seq_p = pl.BlockSpec((None, L, None, p), lambda hi, si, bi: (bi, si, hi, 0))
  c0 = pr.c_group
  seq_b = pl.BlockSpec((None, L, None, n),
                       lambda hi, si, bi: (bi, si, hi // r, 0))
  seq_c = pl.BlockSpec((None, L, None, n),
                       lambda hi, si, bi: (bi, si, c0 + hi // r, 0))
  seq_nh = pl.BlockSpec((None, L, None, n), lambda hi, si, bi: (bi, si, hi, 0))
  per_tok = pl.BlockSpec((None, None, L), lambda hi, si, bi: (bi, hi, si))
  seg = pl.BlockSpec((None, L), lambda hi, si, bi: (bi, si))
  state = pl.BlockSpec((None, None, None, p, n),
                       lambda hi, si, bi: (bi, hi, si, 0, 0))
  head = pl.BlockSpec((1,), lambda hi, si, bi: (hi,))
  return dict(seq_p=seq_p, seq_b=seq_b, seq_c=seq_c, seq_nh=seq_nh, per_tok=per_tok,
              seg=seg, state=state, head=head)


def _call(kernel, name, grid, inputs, out_specs, out_shapes, num_warps,
          num_stages, interpret):
  """pallas_call with the Triton lowering; inputs is a list of (array, spec)."""
  inputs = [(a, s) for a, s in inputs if a is not None]
  params = (None if pltriton is None else
            pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages))
  return pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=[s for _, s in inputs],
      out_specs=out_specs,
      out_shape=out_shapes,
      compiler_params=params,
      interpret=interpret,
      name=name,
  )(*[a for a, _ in inputs])


def _compute_dtype(*arrays):
  dts = {a.dtype for a in arrays if a is not None}
  if len(dts) == 1 and dts.pop() in (jnp.bfloat16, jnp.float16):
    return arrays[0].dtype
  return _F32


def _split_decays(pr: _Prepared):
  """(b, h, s) float32: each split's total decay, 0 if a segment starts in it."""
  b, h, _ = pr.la.shape
  s, L = pr.splits, pr.split_len
  dec = jnp.exp(jnp.sum(pr.la.reshape(b, h, s, L), axis=-1))
  if pr.run is not None:
    last = pr.run.reshape(b, s, L)[:, :, -1]
    before = pr.runp.reshape(b, s, L)[:, :, 0]
    dec = dec * (last == before).astype(_F32)[:, None, :]
  return dec


def _scan_splits(dec, local, first, reverse):
  """Carries states across splits: returns each split's incoming state.

  Args:
    dec: (b, h, s) split decays.
    local: (b, h, s, p, n) each split's own state from a zero start.
    first: (b, h, p, n) state entering split 0 (or, reverse, leaving the last).
    reverse: walk the splits from the last (adjoint states).

  Returns:
    (b, h, s, p, n): forward, the state entering split i; reverse, the
    adjoint state at the end of split i.
  """
  def step(carry, inp):
    d, loc = inp
    return d[:, :, None, None] * carry + loc, carry

  xs = (jnp.moveaxis(dec, 2, 0), jnp.moveaxis(local, 2, 0))
  # Unrolled: a rolled XLA loop on the GPU costs a launch and a host round
  # trip per split (measured: 16 splits added ~0.25 ms to the forward).
  _, ins = lax.scan(step, first, xs, reverse=reverse, unroll=True)
  return jnp.moveaxis(ins, 0, 2)


def _groups(B, C):
  """(groups, d_state) of B and C, given apart or packed (C None)."""
  g, n = B.shape[2:]
  return (g // 2 if C is None else g), n


def forward(x, dt, A, B, C, D, initial_state, segment_ids, *,
            cfg: SSDGpuConfig, interpret: bool = False,
            for_backward: bool = False):
  """SSD forward on the GPU kernels.

  Args:
    x: (b, l, h, p); dt: (b, l, h) effective step sizes (after bias and
    softplus); A: (h,); B, C: (b, l, g, n), or C None and B (b, l, 2 g, n)
    holding B's groups then C's (the kernels read both from that one array,
    so a caller holding them together needs no copies); D: (h,) or None;
    initial_state: (b, h, p, n) or None; segment_ids: (b, l) int or None.
    cfg: tile config.
    interpret: run the kernels in the Pallas interpreter.
    for_backward: use the backward chunk size and also return the state
      entering every chunk.

  Returns:
    y: (b, l, h, p) in x.dtype; final_state: (b, h, p, n) float32; and with
    for_backward, states: (b, h, c, p', n') in the compute dtype (c chunks
    of cfg.bwd_block_q over the padded length; p', n' padded sizes).
  """
  b, l, h, p = x.shape
  g, n = _groups(B, C)
  cfg = cfg.resolved(_pow2_at_least_16(p), _pow2_at_least_16(n))
  q = cfg.bwd_block_q if for_backward else cfg.block_q
  pr = prepare(x, dt, A, B, C, segment_ids, cfg)
  cd = _compute_dtype(x, B, C)
  sp = _specs(pr, h // g)
  s = pr.splits
  n_chunks = pr.split_len // q
  p2, n2 = pr.x.shape[-1], pr.B.shape[-1]
  grid = (h, s, b)
  has_seg = pr.run is not None
  st_shape = jax.ShapeDtypeStruct((b, h, s, p2, n2), _F32)
  s0 = None
  if initial_state is not None:
    s0 = _pad_state(initial_state, p2, n2)
  s_in = None
  if s > 1:
    kernel = functools.partial(_state_kernel, q=q, n_chunks=n_chunks, cd=cd,
                               has_seg=has_seg, reverse=False)
    local = _call(kernel, "ssd_fwd_split_states", grid,
                  [(pr.x, sp["seq_p"]), (pr.dt, sp["per_tok"]),
                   (pr.la, sp["per_tok"]), (pr.B, sp["seq_b"]),
                   (pr.run, sp["seg"]), (pr.runp, sp["seg"])],
                  sp["state"], st_shape, cfg.num_warps, cfg.num_stages,
                  interpret)
    first = s0 if s0 is not None else jnp.zeros((b, h, p2, n2), _F32)
    s_in = _scan_splits(_split_decays(pr), local, first, reverse=False)
  elif s0 is not None:
    s_in = s0[:, :, None]
  kernel = functools.partial(_fwd_kernel, q=q, n_chunks=n_chunks, cd=cd,
                             has_seg=has_seg, has_s_in=s_in is not None,
                             has_d=D is not None, write_states=for_backward)
  out_specs = [sp["seq_p"], sp["state"]]
  out_shapes = [jax.ShapeDtypeStruct(pr.x.shape, x.dtype), st_shape]
  if for_backward:
    out_specs.append(pl.BlockSpec((None, None, n_chunks, p2, n2),
                                  lambda hi, si, bi: (bi, hi, si, 0, 0)))
    out_shapes.append(jax.ShapeDtypeStruct((b, h, s * n_chunks, p2, n2), cd))
  outs = _call(
      kernel, "ssd_fwd_train" if for_backward else "ssd_fwd", grid,
      [(pr.x, sp["seq_p"]), (pr.dt, sp["per_tok"]), (pr.la, sp["per_tok"]),
       (pr.B, sp["seq_b"]), (pr.C, sp["seq_c"]), (pr.run, sp["seg"]),
       (pr.runp, sp["seg"]), (s_in, sp["state"]),
       (None if D is None else D.astype(_F32), sp["head"])],
      out_specs, out_shapes, cfg.num_warps, cfg.num_stages, interpret)
  y = outs[0][:, :l, :, :p]
  final = outs[1][:, :, -1, :p, :n]
  if for_backward:
    return y, final, outs[2]
  return y, final


def backward(x, dt, A, B, C, D, initial_state, segment_ids, states, dy,
             dfinal, *, cfg: SSDGpuConfig, interpret: bool = False):
  """Gradients of `forward` (same argument shapes; dt is the effective dt).

  Args:
    states: the chunk states returned by `forward(..., for_backward=True)`.
    dy: (b, l, h, p) cotangent of y.
    dfinal: (b, h, p, n) cotangent of the final state, or None.

  Returns:
    dx, ddt (float32, w.r.t. the effective dt), dA, dB, dC, dD (or None),
    d initial_state (or None), in the primal dtypes. With B and C packed (C
    None), dB is packed the same way and dC is None.
  """
  b, l, h, p = x.shape
  g, n = _groups(B, C)
  r = h // g
  cfg = cfg.resolved(_pow2_at_least_16(p), _pow2_at_least_16(n))
  pr = prepare(x, dt, A, B, C, segment_ids, cfg)
  cd = _compute_dtype(x, B, C)
  sp = _specs(pr, r)
  s, L = pr.splits, pr.split_len
  Lp = s * L
  p2, n2 = pr.x.shape[-1], pr.B.shape[-1]
  grid = (h, s, b)
  has_seg = pr.run is not None
  q = cfg.bwd_block_q
  n_chunks = L // q
  dyp = _pad_last(_pad_len(dy, Lp - l), p2)
  st_shape = jax.ShapeDtypeStruct((b, h, s, p2, n2), _F32)
  seg_in = [(pr.run, sp["seg"]), (pr.runp, sp["seg"])]

  dfin = None
  if dfinal is not None:
    dfin = _pad_state(dfinal, p2, n2)
  ds_in = None
  if s > 1:
    kernel = functools.partial(_state_kernel, q=q, n_chunks=n_chunks, cd=cd,
                               has_seg=has_seg, reverse=True)
    local = _call(kernel, "ssd_bwd_split_states", grid,
                  [(dyp, sp["seq_p"]), (pr.dt, sp["per_tok"]),
                   (pr.la, sp["per_tok"]), (pr.C, sp["seq_c"])] + seg_in,
                  sp["state"], st_shape, cfg.bwd_num_warps,
                  cfg.bwd_num_stages, interpret)
    last = dfin if dfin is not None else jnp.zeros((b, h, p2, n2), _F32)
    # The adjoint at the end of split i is the one that split i + 1 sends
    # back through its own decay.
    ds_in = _scan_splits(_split_decays(pr), local, last, reverse=True)
  elif dfin is not None:
    ds_in = dfin[:, :, None]

  # Per-head parts of dB and dC in B's dtype, summed over a group's heads in
  # float32 below. (b, l, h, n) float32 parts cost ~0.1 ms more of traffic at
  # MambaEye sizes; in bf16 each part adds one rounding (2^-9 relative).
  part_dtype = B.dtype
  part_shape = jax.ShapeDtypeStruct((b, Lp, h, n2), part_dtype)
  tok_shape = jax.ShapeDtypeStruct((b, h, Lp), _F32)
  kernel = functools.partial(_bwd_kernel, q=q, n_chunks=n_chunks, cd=cd,
                             has_seg=has_seg, has_ds_in=ds_in is not None,
                             has_d=D is not None)
  dd_spec = pl.BlockSpec((None, None, None, p2),
                         lambda hi, si, bi: (bi, hi, si, 0))
  chunk_states = pl.BlockSpec((None, None, n_chunks, p2, n2),
                              lambda hi, si, bi: (bi, hi, si, 0, 0))
  dx, db_h, dc_h, ddt, dla, dd, ds_out = _call(
      kernel, "ssd_bwd", grid,
      [(pr.x, sp["seq_p"]), (pr.dt, sp["per_tok"]), (pr.la, sp["per_tok"]),
       (pr.B, sp["seq_b"]), (pr.C, sp["seq_c"]), (dyp, sp["seq_p"])]
      + seg_in + [(states, chunk_states), (ds_in, sp["state"]),
                  (None if D is None else D.astype(_F32), sp["head"])],
      [sp["seq_p"], sp["seq_nh"], sp["seq_nh"], sp["per_tok"], sp["per_tok"],
       dd_spec, sp["state"]],
      [jax.ShapeDtypeStruct(pr.x.shape, x.dtype), part_shape, part_shape,
       tok_shape, tok_shape, jax.ShapeDtypeStruct((b, h, s, p2), _F32),
       st_shape],
      cfg.bwd_num_warps, cfg.bwd_num_stages, interpret)

  # dt enters directly (as the input scale) and through la = dt * A.
  ddt_eff = jnp.swapaxes(ddt + A.astype(_F32)[None, :, None] * dla, 1, 2)[:, :l]
  dA = jnp.sum(pr.dt * dla, axis=(0, 2)).astype(A.dtype)

  def group_sum(t):
    t = t[:, :l, :, :n]
    if r > 1:
      t = t.reshape(b, l, g, r, n).astype(_F32).sum(axis=3)
    return t.astype(B.dtype)

  dx = dx[:, :l, :, :p]
  dD = None if D is None else jnp.sum(dd[..., :p], axis=(0, 2, 3)).astype(D.dtype)
  dinit = None
  if initial_state is not None:
    dinit = ds_out[:, :, 0, :p, :n].astype(initial_state.dtype)
  dB, dC = group_sum(db_h), group_sum(dc_h)
  if C is None:
    dB, dC = jnp.concatenate([dB, dC], axis=2), None
  return dx, ddt_eff, dA, dB, dC, dD, dinit
