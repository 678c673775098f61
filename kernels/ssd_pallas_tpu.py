"""Mamba2's SSD chunked scan as Pallas TPU (Mosaic) kernels, with backward.

Dimension letters as in `kernels/ssd_reference.py`:

    b  batch               l  length (tokens)        h  heads
    p  headdim             g  groups (B/C groups)    n  d_state
    c  chunks              q  tokens per chunk (`chunk_size`)

`ssd_pallas_tpu` has the signature of `ssd_reference.ssd_sequential` (plus
`interpret`) and is differentiable through a `jax.custom_vjp` whose forward
and backward are each one `pallas_call`; `ssd_pallas_tpu_with_blocks` takes
every tile size (`SSDTpuBlockSizes`). docs/ssd_kernel_tpu.md says what has
been checked (interpret mode on CPU, lowering for TPU) and what has not (no
TPU has run it).

Layout. The kernels work head-major: the wrapper turns x (b, l, h, p) into
(b, h, L, p) and B, C (b, l, g, n) into (b, g, L, n), L being l padded to a
multiple of q. A (q, p) or (q, n) tile is then a legal TPU block for any p, n
(the last dim is the full array dim, the second-minor q is a multiple of 8).
Per-token scalars travel lane-dense as rows: `dtc` (b, h, 2, L) holds the
effective dt and the within-chunk cumulative sum of dt * A; `segrel`
(b, 1, L) holds segment numbers relative to the previous chunk's last token.
The small per-token work (softplus, cumsum, segment numbering) and the
transposes are plain XLA around the kernels, and autodiff carries gradients
through them; the custom VJP covers only the kernel core.

Forward kernel, grid (b, h / k, c) with semantics (parallel, parallel,
arbitrary), k = `heads_per_block` heads of one B/C group per step: their
(k, p, n) float32 states live in VMEM scratch across the chunk axis, B and C
are read once per chunk for all k heads and C B^T is computed once for them.
Per chunk and head, with cum the within-chunk cumulative log decay:

    L[i, j] = exp(cum_i - cum_j)   for j <= i in one segment, else 0
    y       = ((C B^T) * L * dt_j) x  +  exp(cum_i) * (C S^T)  +  D x
    S      <- exp(cum_last) S  +  (x * exp(cum_last - cum_j) dt_j)^T B

Every exponent is a difference of cumulative sums that is <= 0 for a decaying
A (exp(cum_i) itself is the difference from the chunk's start), so nothing
overflows and nothing is computed as exp(s_i) * exp(-s_j). Matmul operands are
in x's dtype (bf16 in training), accumulation and the state are float32.
Contractions over the token axis of a (q, p) or (q, n) tile (the state
updates) transpose that tile with an identity matmul rather than a vector
transpose (see `_transpose_mxu`); the only vector transposes are of (q, q).

Backward kernel: the same grid with the chunk axis walked in reverse (index
maps c -> c_count - 1 - c). It carries dS, the cotangent of the state at the
current chunk's end, in VMEM scratch, and reads the chunk-start states that
the forward wrote (b, h, c, p, n) float32. dB and dC are summed over the k
heads of a block in the kernel and come out per head block in float32; XLA
sums the h / (g k) blocks of each group (nothing to sum when k is the group
size, the default up to 8). dD's per-chunk shares ride in a spare row of the
d(dtc) output.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.segments import segment_starts
from kernels.ssd_reference import effective_dt
from kernels.ssd_reference import validate_ssd_inputs

Array = jax.Array

# TPU vregs are (8 sublanes, 128 lanes): a block's last dim must be a multiple
# of 128 (or the full dim) and its second-minor a multiple of 8 (or full).
_LANES = 128
_SUBLANES = 8
# The default scoped-VMEM limit of the smallest current chip (v5e); a config
# that needs more would fail to compile without raising the limit.
_DEFAULT_VMEM_BUDGET = 16 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class SSDTpuBlockSizes:
  """Tile sizes of the TPU SSD kernels.

  Attributes:
    chunk_size: q, tokens per chunk. The per-token rows (dtc, segrel) are
      (1, q) blocks, so q must be a multiple of 128 lanes; the intra-chunk
      work is q x q.
    heads_per_block: k, heads handled by one grid step; must divide the
      heads per B/C group. Larger k reads B and C and computes C B^T once for
      more heads; smaller k gives the parallel grid axes more steps (TPU
      chips with two TensorCores split those). None: the largest divisor of
      the heads per group that is at most 8.
    vmem_limit_bytes: passed to Mosaic as the scoped VMEM limit, or None for
      the compiler's default. Also the budget `validate` checks against.
  """
  chunk_size: int = 128
  heads_per_block: Optional[int] = None
  vmem_limit_bytes: Optional[int] = None

  def __post_init__(self):
    q = self.chunk_size
    if not isinstance(q, int) or q <= 0:
      raise ValueError(f"{q=} (chunk_size) must be a positive int")
    if q % _LANES:
      raise ValueError(f"chunk_size={q} must be a multiple of {_LANES} "
                       "(the per-token rows are (1, chunk_size) TPU blocks)")
    k = self.heads_per_block
    if k is not None and (not isinstance(k, int) or k <= 0):
      raise ValueError(f"heads_per_block={k} must be a positive int or None")
    if self.vmem_limit_bytes is not None and self.vmem_limit_bytes <= 0:
      raise ValueError(f"{self.vmem_limit_bytes=} must be positive or None")

  def resolve_heads_per_block(self, heads_per_group: int) -> int:
    """k for a model with `heads_per_group` heads per B/C group."""
    k = self.heads_per_block
    if k is None:
      return max(d for d in range(1, min(8, heads_per_group) + 1)
                 if heads_per_group % d == 0)
    if heads_per_group % k:
      raise ValueError(f"heads_per_block={k} must divide "
                       f"heads_per_group={heads_per_group} (a block of heads "
                       "shares one B/C group)")
    return k

  def vmem_bytes(self, k: int, p: int, n: int, itemsize: int) -> int:
    """Rough VMEM need of the backward kernel (the larger one), in bytes.

    Counts double-buffered blocks padded to (8, 128) tiles, the f32 scratch and
    ~12 live (q, q) f32 temporaries (the head loop is not unrolled, so only one
    head's temporaries are live).
    """
    q = self.chunk_size
    lane = lambda d: -(-d // _LANES) * _LANES
    sub = lambda d: -(-d // _SUBLANES) * _SUBLANES
    tiles_in = (2 * k * q * lane(p) * itemsize        # x, dy
                + 2 * q * lane(n) * itemsize          # B, C
                + k * sub(2) * q * 4 + sub(1) * q * 4  # dtc, segrel
                + 2 * k * sub(p) * lane(n) * 4)       # states, dfinal
    tiles_out = (k * q * lane(p) * itemsize + 2 * q * lane(n) * 4
                 + k * sub(2) * q * 4 + k * sub(p) * lane(n) * 4)
    scratch = k * sub(p) * lane(n) * 4
    temps = 12 * q * q * 4
    return 2 * (tiles_in + tiles_out) + scratch + temps

  def validate(self, k: int, p: int, n: int, dtype) -> None:
    """Raises ValueError if these tiles do not fit the VMEM budget."""
    budget = self.vmem_limit_bytes or _DEFAULT_VMEM_BUDGET
    need = self.vmem_bytes(k, p, n, jnp.dtype(dtype).itemsize)
    if need > budget:
      raise ValueError(
          f"chunk_size={self.chunk_size}, heads_per_block={k} with "
          f"headdim={p}, d_state={n} needs ~{need / 2**20:.1f} MiB of VMEM, "
          f"over the budget of {budget / 2**20:.1f} MiB: use smaller tiles "
          "or set vmem_limit_bytes")


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything static about one call (hashable: a custom_vjp nondiff arg)."""
  blocks: SSDTpuBlockSizes
  heads_per_group: int
  heads_per_block: int
  has_seg: bool
  has_d: bool
  has_init: bool
  interpret: Any


# ----------------------------------------------------------------------------
# In-kernel helpers. All vectors are 2-D: rows (1, q), columns (q, 1).


def _row_to_col(row: Array, eye: Array) -> Array:
  """(1, q) -> (q, 1) by masking the diagonal and reducing over lanes.

  A select plus a lane reduction is plain VPU/XLU work that Mosaic lowers for
  any q; it avoids relying on transposes of skinny vectors.
  """
  return jnp.sum(jnp.where(eye, row, 0.0), axis=1, keepdims=True)


def _col_to_row(col: Array, eye: Array) -> Array:
  """(q, 1) -> (1, q), the inverse of `_row_to_col`."""
  return jnp.sum(jnp.where(eye, col, 0.0), axis=0, keepdims=True)


def _dot(a, b, prec):
  """(m, k) @ (k, n) -> (m, n) float32."""
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=prec,
                         preferred_element_type=jnp.float32)


def _dot_nt(a, b, prec):
  """(m, k) @ (n, k)^T -> (m, n) float32."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=prec,
                         preferred_element_type=jnp.float32)


def _transpose_mxu(a, prec):
  """(q, d) -> (d, q) float32, as I_d @ a^T on the MXU.

  Exact (each output is one product with 1.0). Used for the token-contracting
  state updates instead of a vector transpose: Mosaic has rejected
  transposes whose source is lane-padded, e.g. (128, 64) -> (64, 128)
  (jax-ml/jax#18370), and headdim / d_state of 64 are exactly that case. The
  extra d * d * q MACs are small next to the q * q * d of the chunk matmuls.
  """
  d = a.shape[1]
  eye = (lax.broadcasted_iota(jnp.int32, (d, d), 0)
         == lax.broadcasted_iota(jnp.int32, (d, d), 1)).astype(a.dtype)
  return _dot_nt(eye, a, prec)


def _segment_masks(q: int, seg_row: Optional[Array]):
  """What one chunk's segment layout allows; shared by the heads of a block.

  Args:
    q: tokens per chunk.
    seg_row: (1, q) f32 segment numbers relative to the previous chunk's last
      token (0 = still that token's segment), or None.

  Returns:
    A dict:
      eye (q, q) bool: the diagonal, for row/column conversions.
      mask (q, q) bool: j <= i and tokens i, j in one segment.
      last (1, q) bool: the lane of the chunk's last token.
      sees_in (q, 1) bool or None: token i is in the incoming state's segment.
      to_end (q, 1) bool or None: token j is in the last token's segment.
      keep (1, 1) bool or None: no segment starts inside the chunk.
  """
  ii = lax.broadcasted_iota(jnp.int32, (q, q), 0)
  jj = lax.broadcasted_iota(jnp.int32, (q, q), 1)
  eye = ii == jj
  out = dict(eye=eye, mask=jj <= ii, sees_in=None, to_end=None, keep=None,
             last=lax.broadcasted_iota(jnp.int32, (1, q), 1) == q - 1)
  if seg_row is not None:
    seg_col = _row_to_col(seg_row, eye)
    seg_last = jnp.sum(jnp.where(out["last"], seg_row, 0.0), axis=1,
                       keepdims=True)
    out["mask"] = jnp.logical_and(out["mask"], seg_col == seg_row)
    out["sees_in"] = seg_col == 0.0
    out["to_end"] = seg_col == seg_last
    out["keep"] = seg_last == 0.0
  return out


def _chunk_factors(dt_row: Array, cum_row: Array, sm):
  """Decay factors of one chunk for one head.

  Args:
    dt_row: (1, q) f32 effective step sizes.
    cum_row: (1, q) f32 within-chunk inclusive cumsum of dt * A.
    sm: `_segment_masks` of this chunk.

  Returns:
    A dict of f32 arrays:
      lmat (q, q): exp(cum_i - cum_j) where j <= i in one segment, else 0.
      dt_col (q, 1): dt as a column.
      e_col (q, 1): exp(cum_i), 0 for tokens that cannot see the incoming
        state (a segment started earlier in this chunk).
      w_col (q, 1): exp(cum_last - cum_j), 0 for tokens outside the last
        token's segment: how token j's input reaches the chunk-end state.
      decay (1, 1): exp(cum_last), 0 if a segment starts inside the chunk: the
        factor on the incoming state at the chunk's end.
  """
  eye, mask = sm["eye"], sm["mask"]
  cum_col = _row_to_col(cum_row, eye)
  dt_col = _row_to_col(dt_row, eye)
  cum_last = jnp.sum(jnp.where(sm["last"], cum_row, 0.0), axis=1,
                     keepdims=True)
  e_col = jnp.exp(cum_col)
  w_col = jnp.exp(cum_last - cum_col)
  decay = jnp.exp(cum_last)
  if sm["sees_in"] is not None:
    e_col = jnp.where(sm["sees_in"], e_col, 0.0)
    w_col = jnp.where(sm["to_end"], w_col, 0.0)
    decay = jnp.where(sm["keep"], decay, 0.0)
  # The masked difference is zeroed before the exp, so masked entries never
  # produce inf (cum_i - cum_j > 0 for j > i) even transiently.
  diff = cum_col - cum_row
  lmat = jnp.where(mask, jnp.exp(jnp.where(mask, diff, 0.0)), 0.0)
  return dict(lmat=lmat, dt_col=dt_col, e_col=e_col, w_col=w_col, decay=decay)


def _group_of(head_block, blocks_per_group):
  """The B/C group of a head block (index maps; head_block >= 0).

  `lax.div` (truncating) rather than `//`: jnp's floor division lowers through
  a sign computation whose Mosaic rule asks which TPU it runs on, which fails
  when lowering on a machine without one (export from CPU).
  """
  return lax.div(head_block, blocks_per_group)


def _precision(dtype):
  # f32 operands ask the MXU for full f32 (multi-pass); bf16 is native.
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _for_each_head(k: int, body) -> None:
  """Runs body(j) for j in [0, k): a loop, so code size does not grow with k."""
  if k == 1:
    body(0)
    return

  def step(j, carry):
    body(j)
    return carry

  lax.fori_loop(0, k, step, 0)


# ----------------------------------------------------------------------------
# Forward kernel.


def _chunk_operands(x_ref, b_ref, c_ref, seg_ref):
  """What both chunk kernels read first.

  Returns:
    the compute dtype, the dot precision, this chunk's B and C (q, n), its
    segment masks (`_segment_masks`) and the scores C_i . B_j (q, q), shared
    by the block's k heads.
  """
  cdt = x_ref.dtype
  prec = _precision(cdt)
  bm = b_ref[...]
  cm = c_ref[...]
  sm = _segment_masks(bm.shape[0], None if seg_ref is None else seg_ref[...])
  return cdt, prec, bm, cm, sm, _dot_nt(cm, bm, prec)


def _fwd_kernel(*refs, st: _Static, emit_states: bool):
  """One chunk of one (batch, head block) pair.

  Refs (blocks; the batch dim squeezed; k heads per block):
    x (k, q, p), B (q, n), C (q, n), dtc (k, 2, q) f32, [segrel (1, q) f32],
    [D (h,) f32 in SMEM], [initial state (k, p, n) f32];
    outputs y (k, q, p), final state (k, p, n) f32, [chunk-start states
    (k, p, n) f32];
    scratch: states (k, p, n) f32.
  """
  refs = list(refs)
  x_ref, b_ref, c_ref, dtc_ref = refs[:4]
  del refs[:4]
  seg_ref = refs.pop(0) if st.has_seg else None
  d_ref = refs.pop(0) if st.has_d else None
  init_ref = refs.pop(0) if st.has_init else None
  y_ref, final_ref = refs[:2]
  del refs[:2]
  states_ref = refs.pop(0) if emit_states else None
  (s_ref,) = refs

  k = st.heads_per_block
  ci = pl.program_id(2)
  n_chunks = pl.num_programs(2)
  head0 = pl.program_id(1) * k

  @pl.when(ci == 0)
  def _():
    if init_ref is None:
      s_ref[...] = jnp.zeros(s_ref.shape, jnp.float32)
    else:
      s_ref[...] = init_ref[...]

  if states_ref is not None:
    states_ref[...] = s_ref[...]

  f32 = jnp.float32
  cdt, prec, bm, cm, sm, scores = _chunk_operands(x_ref, b_ref, c_ref, seg_ref)

  def head(j):
    x = x_ref[j]
    s0 = s_ref[j]
    dt_row = dtc_ref[j, 0:1, :]
    fac = _chunk_factors(dt_row, dtc_ref[j, 1:2, :], sm)
    weights = scores * fac["lmat"] * dt_row
    y = _dot(weights.astype(cdt), x, prec)
    y = y + fac["e_col"] * _dot_nt(cm, s0.astype(cdt), prec)
    if d_ref is not None:
      y = y + d_ref[head0 + j] * x.astype(f32)
    y_ref[j] = y.astype(y_ref.dtype)
    xw = (x.astype(f32) * (fac["w_col"] * fac["dt_col"])).astype(cdt)
    s_ref[j] = fac["decay"] * s0 + _dot(
        _transpose_mxu(xw, prec).astype(cdt), bm, prec)

  _for_each_head(k, head)

  @pl.when(ci == n_chunks - 1)
  def _():
    final_ref[...] = s_ref[...]


def _fwd_call(st: _Static, x_t, b_t, c_t, dtc, segrel, d, init, *,
              emit_states: bool):
  """Runs the forward kernel.

  Args:
    st: static configuration.
    x_t: (b, h, L, p) inputs, L a multiple of q.
    b_t, c_t: (b, g, L, n) in x_t's dtype.
    dtc: (b, h, 2, L) f32: effective dt, within-chunk cumsum of dt * A.
    segrel: (b, 1, L) f32 relative segment numbers, or None.
    d: (h,) f32 or None.
    init: (b, h, p, n) f32 or None.
    emit_states: also return every chunk's starting state (for the VJP).

  Returns:
    y_t (b, h, L, p) in x's dtype, final state (b, h, p, n) f32 and, if
    emit_states, chunk-start states (b, h, c, p, n) f32.
  """
  bsz, h, lp, p = x_t.shape
  n = b_t.shape[-1]
  q = st.blocks.chunk_size
  k = st.heads_per_block
  nc = lp // q
  bpg = st.heads_per_group // k  # head blocks per group

  x_spec = pl.BlockSpec((None, k, q, p), lambda bi, hb, ci: (bi, hb, ci, 0))
  bc_spec = pl.BlockSpec((None, None, q, n),
                         lambda bi, hb, ci: (bi, _group_of(hb, bpg), ci, 0))
  dtc_spec = pl.BlockSpec((None, k, 2, q), lambda bi, hb, ci: (bi, hb, 0, ci))
  state_spec = pl.BlockSpec((None, k, p, n), lambda bi, hb, ci: (bi, hb, 0, 0))
  in_specs = [x_spec, bc_spec, bc_spec, dtc_spec]
  args = [x_t, b_t, c_t, dtc]
  if st.has_seg:
    in_specs.append(pl.BlockSpec((None, 1, q), lambda bi, hb, ci: (bi, 0, ci)))
    args.append(segrel)
  if st.has_d:
    in_specs.append(pl.BlockSpec(memory_space=pltpu.SMEM))
    args.append(d)
  if st.has_init:
    in_specs.append(state_spec)
    args.append(init)
  out_shape = [jax.ShapeDtypeStruct(x_t.shape, x_t.dtype),
               jax.ShapeDtypeStruct((bsz, h, p, n), jnp.float32)]
  out_specs = [x_spec, state_spec]
  if emit_states:
    out_shape.append(jax.ShapeDtypeStruct((bsz, h, nc, p, n), jnp.float32))
    out_specs.append(pl.BlockSpec((None, k, None, p, n),
                                  lambda bi, hb, ci: (bi, hb, ci, 0, 0)))
  itemsize = x_t.dtype.itemsize
  g = b_t.shape[1]
  cost = pl.CostEstimate(
      flops=2 * bsz * lp * (g * q * n + h * (q * p + p * n + p * p + p * n)),
      transcendentals=bsz * h * lp * (q + 3),
      bytes_accessed=(2 * x_t.size * itemsize + 2 * b_t.size * itemsize
                      + dtc.size * 4
                      + (bsz * h * nc * p * n * 4 if emit_states else 0)))
  return pl.pallas_call(
      functools.partial(_fwd_kernel, st=st, emit_states=emit_states),
      out_shape=tuple(out_shape),
      grid=(bsz, h // k, nc),
      in_specs=in_specs,
      out_specs=tuple(out_specs),
      scratch_shapes=[pltpu.VMEM((k, p, n), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary"),
          vmem_limit_bytes=st.blocks.vmem_limit_bytes),
      cost_estimate=cost,
      interpret=st.interpret,
      name="ssd_tpu_fwd_states" if emit_states else "ssd_tpu_fwd",
  )(*args)


# ----------------------------------------------------------------------------
# Backward kernel.


def _bwd_kernel(*refs, st: _Static):
  """One chunk of one (batch, head block) pair, chunks visited last to first.

  Refs (blocks; the batch dim squeezed; k heads per block):
    x (k, q, p), B (q, n), C (q, n), dtc (k, 2, q) f32, [segrel (1, q) f32],
    [D (h,) f32 in SMEM], chunk-start states (k, p, n) f32, dy (k, q, p),
    d(final state) (k, p, n) f32;
    outputs dx (k, q, p), dB and dC summed over the block's heads (q, n) f32,
    d(dtc) (k, 2, q) f32 with, if D is given, a third row holding
    sum(dy * x) over the chunk in its first lane (the chunk's share of dD),
    d(initial state) (k, p, n) f32;
    scratch: dS (k, p, n) f32, the cotangent of the states at this chunk's
    end.
  """
  refs = list(refs)
  x_ref, b_ref, c_ref, dtc_ref = refs[:4]
  del refs[:4]
  seg_ref = refs.pop(0) if st.has_seg else None
  d_ref = refs.pop(0) if st.has_d else None
  (s0_ref, dy_ref, dfinal_ref, dx_ref, db_ref, dc_ref, ddtc_ref, dinit_ref,
   ds_ref) = refs

  k = st.heads_per_block
  ci = pl.program_id(2)  # step number; the chunk is n_chunks - 1 - ci.
  n_chunks = pl.num_programs(2)
  head0 = pl.program_id(1) * k

  @pl.when(ci == 0)
  def _():
    ds_ref[...] = dfinal_ref[...]

  f32 = jnp.float32
  cdt, prec, bm, cm, sm, scores = _chunk_operands(x_ref, b_ref, c_ref, seg_ref)
  q = bm.shape[0]
  eye = sm["eye"]
  db_ref[...] = jnp.zeros(db_ref.shape, f32)
  dc_ref[...] = jnp.zeros(dc_ref.shape, f32)

  def head(j):
    ds_end = ds_ref[j]
    s0 = s0_ref[j]
    x = x_ref[j]
    dy = dy_ref[j]
    xf = x.astype(f32)
    dyf = dy.astype(f32)
    dt_row = dtc_ref[j, 0:1, :]
    fac = _chunk_factors(dt_row, dtc_ref[j, 1:2, :], sm)
    lmat, e_col = fac["lmat"], fac["e_col"]
    wdt_col = fac["w_col"] * fac["dt_col"]

    gl = scores * lmat                         # (q, q)
    weights = gl * dt_row                      # the forward's (q, q) matrix
    pmat = _dot_nt(dy, x, prec)                # (q, q) dy_i . x_j
    ds_end_c = ds_end.astype(cdt)
    v = _dot_nt(bm, ds_end_c, prec)            # (q, p) B_j dS^T

    # x: intra-chunk (weights^T dy), via the chunk-end state, and the skip.
    # (q, q) transposes are tile-aligned; done in f32, then cast, as Mosaic
    # handles 32-bit transposes most generally.
    dx = _dot(weights.T.astype(cdt), dy, prec) + wdt_col * v
    if d_ref is not None:
      dx = dx + d_ref[head0 + j] * dyf
    dx_ref[j] = dx.astype(dx_ref.dtype)

    # B and C: d(scores) = dy x^T * L * dt_j; plus the state paths.
    dscores = pmat * lmat * dt_row
    s0_c = s0.astype(cdt)
    dc_ref[...] += (_dot(dscores.astype(cdt), bm, prec)
                    + e_col * _dot(dy, s0_c, prec))
    db_ref[...] += (_dot(dscores.T.astype(cdt), cm, prec)
                    + wdt_col * _dot(x, ds_end_c, prec))

    # dt and cum. Through L: d(cum_i - cum_j) = dy_i.x_j C_i.B_j L_ij dt_j.
    r_mat = pmat * weights
    ddt_row = jnp.sum(pmat * gl, axis=0, keepdims=True)
    dcum_row = -jnp.sum(r_mat, axis=0, keepdims=True)
    dcum_col = jnp.sum(r_mat, axis=1, keepdims=True)
    # Through exp(cum_i) on the incoming state's output.
    y_off = _dot_nt(cm, s0_c, prec)            # (q, p) C_i S^T
    dcum_col = dcum_col + e_col * jnp.sum(dyf * y_off, axis=1, keepdims=True)
    # Through exp(cum_last - cum_j) * dt_j on each token's input to the state.
    dwdt_col = jnp.sum(xf * v, axis=1, keepdims=True)
    ddt_col = dwdt_col * fac["w_col"]
    dcum_col = dcum_col - dwdt_col * wdt_col
    # cum_last: the input weights above and exp(cum_last) on the incoming
    # state.
    dcum_last = (jnp.sum(dwdt_col * wdt_col, axis=0, keepdims=True)
                 + fac["decay"] * jnp.sum(jnp.sum(ds_end * s0, axis=1,
                                                  keepdims=True),
                                          axis=0, keepdims=True))
    ddt_row = ddt_row + _col_to_row(ddt_col, eye)
    dcum_row = (dcum_row + _col_to_row(dcum_col, eye)
                + jnp.where(sm["last"], dcum_last, 0.0))
    ddtc_ref[j, 0:1, :] = ddt_row
    ddtc_ref[j, 1:2, :] = dcum_row
    if d_ref is not None:
      # dD's share: one number per chunk and head, in lane 0 of a spare row
      # (XLA sums the row), so XLA need not read x and dy again.
      dd = jnp.sum(jnp.sum(dyf * xf, axis=1, keepdims=True), axis=0,
                   keepdims=True)
      first = lax.broadcasted_iota(jnp.int32, (1, q), 1) == 0
      ddtc_ref[j, 2:3, :] = jnp.where(first, dd, 0.0)

    # The cotangent of this chunk's starting state = previous chunk's end.
    dye_t = _transpose_mxu((dyf * e_col).astype(cdt), prec).astype(cdt)
    ds_ref[j] = fac["decay"] * ds_end + _dot(dye_t, cm, prec)

  _for_each_head(k, head)

  @pl.when(ci == n_chunks - 1)
  def _():
    dinit_ref[...] = ds_ref[...]


def _bwd_call(st: _Static, x_t, b_t, c_t, dtc, segrel, d, states, dy_t,
              dfinal):
  """Runs the backward kernel.

  Args: as `_fwd_call`, plus
    states: (b, h, c, p, n) f32 chunk-start states from the forward.
    dy_t: (b, h, L, p) cotangent of y_t.
    dfinal: (b, h, p, n) f32 cotangent of the final state.

  Returns:
    dx_t (b, h, L, p) in x's dtype; dB, dC per head block (b, h / k, L, n)
    f32; d(dtc) (b, h, 2, L) f32, or (b, h, 3, L) with dD's per-chunk shares
    in a third row if D is given; d(initial state) (b, h, p, n) f32.
  """
  bsz, h, lp, p = x_t.shape
  n = b_t.shape[-1]
  q = st.blocks.chunk_size
  k = st.heads_per_block
  nc = lp // q
  bpg = st.heads_per_group // k
  rev = lambda ci: nc - 1 - ci

  x_spec = pl.BlockSpec((None, k, q, p),
                        lambda bi, hb, ci: (bi, hb, rev(ci), 0))
  bc_spec = pl.BlockSpec(
      (None, None, q, n),
      lambda bi, hb, ci: (bi, _group_of(hb, bpg), rev(ci), 0))
  dbc_spec = pl.BlockSpec((None, None, q, n),
                          lambda bi, hb, ci: (bi, hb, rev(ci), 0))
  dtc_spec = pl.BlockSpec((None, k, 2, q),
                          lambda bi, hb, ci: (bi, hb, 0, rev(ci)))
  rows_out = 3 if st.has_d else 2
  ddtc_spec = pl.BlockSpec((None, k, rows_out, q),
                           lambda bi, hb, ci: (bi, hb, 0, rev(ci)))
  state_spec = pl.BlockSpec((None, k, p, n), lambda bi, hb, ci: (bi, hb, 0, 0))
  in_specs = [x_spec, bc_spec, bc_spec, dtc_spec]
  args = [x_t, b_t, c_t, dtc]
  if st.has_seg:
    in_specs.append(pl.BlockSpec((None, 1, q),
                                 lambda bi, hb, ci: (bi, 0, rev(ci))))
    args.append(segrel)
  if st.has_d:
    in_specs.append(pl.BlockSpec(memory_space=pltpu.SMEM))
    args.append(d)
  in_specs += [pl.BlockSpec((None, k, None, p, n),
                            lambda bi, hb, ci: (bi, hb, rev(ci), 0, 0)),
               x_spec, state_spec]
  args += [states, dy_t, dfinal]
  out_shape = (jax.ShapeDtypeStruct(x_t.shape, x_t.dtype),
               jax.ShapeDtypeStruct((bsz, h // k, lp, n), jnp.float32),
               jax.ShapeDtypeStruct((bsz, h // k, lp, n), jnp.float32),
               jax.ShapeDtypeStruct((bsz, h, rows_out, lp), jnp.float32),
               jax.ShapeDtypeStruct((bsz, h, p, n), jnp.float32))
  out_specs = (x_spec, dbc_spec, dbc_spec, ddtc_spec, state_spec)
  itemsize = x_t.dtype.itemsize
  g = b_t.shape[1]
  cost = pl.CostEstimate(
      flops=2 * bsz * lp * (g * q * n
                            + h * (2 * q * n + 3 * q * p + 5 * p * n + p * p)),
      transcendentals=bsz * h * lp * (q + 3),
      bytes_accessed=(4 * x_t.size * itemsize + 2 * b_t.size * itemsize
                      + 2 * (h // k) * bsz * lp * n * 4
                      + 2 * dtc.size * 4 + states.size * 4))
  return pl.pallas_call(
      functools.partial(_bwd_kernel, st=st),
      out_shape=out_shape,
      grid=(bsz, h // k, nc),
      in_specs=in_specs,
      out_specs=out_specs,
      scratch_shapes=[pltpu.VMEM((k, p, n), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary"),
          vmem_limit_bytes=st.blocks.vmem_limit_bytes),
      cost_estimate=cost,
      interpret=st.interpret,
      name="ssd_tpu_bwd",
  )(*args)


# ----------------------------------------------------------------------------
# custom_vjp around the kernel core (head-major, padded, preprocessed inputs).


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ssd_core(st, x_t, b_t, c_t, dtc, segrel, d, init):
  """(y_t (b, h, L, p), final state (b, h, p, n) f32); see `_fwd_call`."""
  y_t, final = _fwd_call(st, x_t, b_t, c_t, dtc, segrel, d, init,
                         emit_states=False)
  return y_t, final


def _ssd_core_fwd(st, x_t, b_t, c_t, dtc, segrel, d, init):
  y_t, final, states = _fwd_call(st, x_t, b_t, c_t, dtc, segrel, d, init,
                                 emit_states=True)
  return (y_t, final), (x_t, b_t, c_t, dtc, segrel, d, states)


def _ssd_core_bwd(st, res, cts):
  x_t, b_t, c_t, dtc, segrel, d, states = res
  dy_t, dfinal = cts
  bsz, _, lp, _ = x_t.shape
  g, n = b_t.shape[1], b_t.shape[-1]
  dx_t, db_blk, dc_blk, ddtc, dinit = _bwd_call(
      st, x_t, b_t, c_t, dtc, segrel, d, states, dy_t.astype(x_t.dtype),
      dfinal.astype(jnp.float32))
  # Head block i reads group i // blocks_per_group: sum each group's blocks.
  bpg = st.heads_per_group // st.heads_per_block
  db_t = db_blk.reshape(bsz, g, bpg, lp, n).sum(axis=2).astype(b_t.dtype)
  dc_t = dc_blk.reshape(bsz, g, bpg, lp, n).sum(axis=2).astype(c_t.dtype)
  dseg = None if segrel is None else jnp.zeros_like(segrel)
  dd = None
  if d is not None:
    dd = jnp.sum(ddtc[:, :, 2], axis=(0, 2))
    ddtc = ddtc[:, :, :2]
  dinit = dinit if st.has_init else None
  return dx_t, db_t, dc_t, ddtc, dseg, dd, dinit


_ssd_core.defvjp(_ssd_core_fwd, _ssd_core_bwd)


# ----------------------------------------------------------------------------
# Public entry point.


def ssd_pallas_tpu(x, dt, A, B, C, D=None, *, dt_bias=None, dt_softplus=False,
                   initial_state=None, segment_ids=None,
                   return_final_state=False, chunk_size=128, interpret=False):
  """SSD scan with Pallas TPU kernels; differentiable (custom VJP).

  Args:
    x: (b, l, h, p) inputs.
    dt: (b, l, h) step sizes (before dt_bias / softplus if those are given).
    A: (h,) negative decay rates.
    B: (b, l, g, n) input projections.
    C: (b, l, g, n) output projections.
    D: (h,) skip connection, or None.
    dt_bias: (h,) or None.
    dt_softplus: apply softplus to dt + dt_bias.
    initial_state: (b, h, p, n) or None (zeros).
    segment_ids: (b, l) int, or None; the state resets to zero where the id
      changes from one token to the next.
    return_final_state: also return the (b, h, p, n) float32 final state.
    chunk_size: tokens per chunk, a multiple of 128; any length l works (the
      sequence is padded inside). Other tiles take their defaults; see
      `ssd_pallas_tpu_with_blocks` to set them.
    interpret: False to compile for TPU; True or a `pltpu.InterpretParams` to
      run the kernels' own logic in the Pallas interpreter (any backend).

  Returns:
    y: (b, l, h, p) in x's dtype, and the final state if asked for.

  Gradients flow to x, dt, A, B, C, D, dt_bias and initial_state. B and C
  are used in x's dtype inside the kernels (matmul operands).
  """
  return ssd_pallas_tpu_with_blocks(
      SSDTpuBlockSizes(chunk_size=chunk_size), x, dt, A, B, C, D,
      dt_bias=dt_bias, dt_softplus=dt_softplus, initial_state=initial_state,
      segment_ids=segment_ids, return_final_state=return_final_state,
      interpret=interpret)


def ssd_pallas_tpu_with_blocks(blocks: SSDTpuBlockSizes, x, dt, A, B, C,
                               D=None, *, dt_bias=None, dt_softplus=False,
                               initial_state=None, segment_ids=None,
                               return_final_state=False, interpret=False):
  """`ssd_pallas_tpu` with every tile size given by `blocks`.

  Same arguments (but chunk_size, which `blocks` holds) and returns.
  """
  if not isinstance(blocks, SSDTpuBlockSizes):
    raise TypeError(f"blocks must be SSDTpuBlockSizes, got {type(blocks)=}")
  bsz, l, h, p, g, n = validate_ssd_inputs(x, dt, A, B, C, D, dt_bias,
                                           initial_state, segment_ids)
  k = blocks.resolve_heads_per_block(h // g)
  blocks.validate(k, p, n, x.dtype)
  q = blocks.chunk_size
  nc = pl.cdiv(l, q)
  lp = nc * q
  pad = lp - l
  f32 = jnp.float32

  # Per-token scalars in XLA: padded tokens get dt = 0, so they neither decay
  # the state nor add to it.
  dt_eff = jnp.pad(effective_dt(dt, dt_bias, dt_softplus),
                   ((0, 0), (0, pad), (0, 0)))
  cum = jnp.cumsum((dt_eff * A.astype(f32)).reshape(bsz, nc, q, h), axis=2)
  dtc = jnp.stack([dt_eff, cum.reshape(bsz, lp, h)], axis=1)  # (b, 2, L, h)
  dtc = jnp.transpose(dtc, (0, 3, 1, 2))  # (b, h, 2, L)

  def head_major(t, dtype):  # (b, l, k, d) -> (b, k, L, d)
    t = jnp.pad(t.astype(dtype), ((0, 0), (0, pad), (0, 0), (0, 0)))
    return jnp.transpose(t, (0, 2, 1, 3))

  x_t = head_major(x, x.dtype)
  b_t = head_major(B, x.dtype)
  c_t = head_major(C, x.dtype)

  segrel = None
  if segment_ids is not None:
    # Number segments 0, 1, 2, ... by counting resets (so only changes of id
    # matter, never equality of ids far apart), then express each chunk's
    # numbers relative to the previous chunk's last token: 0 means "still
    # the segment that the incoming state belongs to". Padding adds no reset.
    starts = segment_starts(segment_ids, l)
    seg_num = jnp.cumsum(jnp.pad(starts.astype(jnp.int32), ((0, 0), (0, pad))),
                         axis=1).reshape(bsz, nc, q)
    prev_last = jnp.concatenate(
        [jnp.zeros((bsz, 1), jnp.int32), seg_num[:, :-1, -1]], axis=1)
    # Values lie in [0, q]: exact in f32.
    segrel = (seg_num - prev_last[:, :, None]).astype(f32).reshape(bsz, 1, lp)

  # f32 here so that the core's cotangents are f32; autodiff of the casts
  # returns them in the callers' dtypes.
  d = None if D is None else D.astype(f32)
  init = None if initial_state is None else initial_state.astype(f32)
  st = _Static(blocks=blocks, heads_per_group=h // g, heads_per_block=k,
               has_seg=segrel is not None, has_d=d is not None,
               has_init=init is not None, interpret=interpret)
  y_t, final = _ssd_core(st, x_t, b_t, c_t, dtc, segrel, d, init)
  y = jnp.transpose(y_t, (0, 2, 1, 3))[:, :l]
  return (y, final) if return_final_state else y
