"""Pure-JAX references for Mamba2's SSD (state-space duality) scan.

Dimension legend used in every docstring of this package:

    b  batch               l  length (tokens)        h  heads
    p  headdim             g  groups (B/C groups)    n  d_state
    c  chunks              q  tokens per chunk

The recurrence, per head with state S (p x n), starting at `initial_state`
(zero by default):

    S_t = exp(dt_t * A) * S_{t-1} + dt_t * x_t B_t^T
    y_t = S_t C_t + D * x_t

Where `segment_ids` is given, the state is reset (to zero, not to the
initial state) at every token whose segment id differs from the previous
token's: several sequences packed in one row never see each other. The
initial state belongs to the segment of token 0.

Three implementations share one signature (see `SSDInputs`):

* `ssd_sequential`: a `lax.scan` over tokens in float32. Slow and obviously
  right: the oracle every other path is tested against.
* `ssd_chunked`: the chunked SSD of the Mamba2 paper in plain XLA: quadratic
  attention-like work inside chunks of `chunk_size` tokens, a `lax.scan` that
  passes (p x n) states between chunks.
* `ssd_associative`: the same intra-chunk work, with the between-chunk pass
  done by `jax.lax.associative_scan`, so its depth is logarithmic in the
  number of chunks.

Neither chunked form materialises a (b, l, h, p, n) tensor: states exist per
chunk, (b, c, h, p, n), which is l / chunk_size times smaller.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from kernels.segments import renumber_segments
from kernels.segments import segment_starts

Array = jax.Array


def validate_ssd_inputs(x, dt, A, B, C, D=None, dt_bias=None,
                        initial_state=None, segment_ids=None):
  """Checks the shapes of SSD inputs and returns (b, l, h, p, g, n).

  Raises:
    ValueError: naming the argument and the shapes that disagree.
  """
  if x.ndim != 4:
    raise ValueError(f"x must be (batch, length, heads, headdim), got {x.shape=}")
  b, l, h, p = x.shape
  if dt.shape != (b, l, h):
    raise ValueError(f"dt must be (batch, length, heads)={(b, l, h)}, got {dt.shape=}")
  if A.shape != (h,):
    raise ValueError(f"A must be (heads,)={(h,)}, got {A.shape=}")
  if B.ndim != 4 or B.shape[:2] != (b, l):
    raise ValueError(f"B must be (batch, length, groups, d_state) with "
                     f"batch, length = {(b, l)}, got {B.shape=}")
  g, n = B.shape[2:]
  if C.shape != B.shape:
    raise ValueError(f"C must have B's shape {B.shape}, got {C.shape=}")
  if h % g:
    raise ValueError(f"heads={h} must be a multiple of groups={g}")
  if D is not None and D.shape != (h,):
    raise ValueError(f"D must be (heads,)={(h,)}, got {D.shape=}")
  if dt_bias is not None and dt_bias.shape != (h,):
    raise ValueError(f"dt_bias must be (heads,)={(h,)}, got {dt_bias.shape=}")
  if initial_state is not None and initial_state.shape != (b, h, p, n):
    raise ValueError(f"initial_state must be (batch, heads, headdim, d_state)="
                     f"{(b, h, p, n)}, got {initial_state.shape=}")
  if segment_ids is not None and segment_ids.shape != (b, l):
    raise ValueError(f"segment_ids must be (batch, length)={(b, l)}, "
                     f"got {segment_ids.shape=}")
  return b, l, h, p, g, n


def packed_bc_shape(bc) -> jax.ShapeDtypeStruct:
  """The shape of B (or C) inside a packed (b, l, 2 g, n) array."""
  if bc.ndim != 4 or bc.shape[2] % 2:
    raise ValueError("packed B and C (C=None) must be (batch, length, 2 * groups, "
                     f"d_state), got {bc.shape=}")
  return jax.ShapeDtypeStruct((*bc.shape[:2], bc.shape[2] // 2, bc.shape[3]), bc.dtype)


def split_packed_bc(bc: Array) -> tuple[Array, Array]:
  """(b, l, 2 g, n) packed B and C (B's groups first) -> B, C (b, l, g, n)."""
  packed_bc_shape(bc)
  return jnp.split(bc, 2, axis=2)


def effective_dt(dt: Array, dt_bias: Optional[Array], dt_softplus: bool) -> Array:
  """Returns the step sizes actually used, in float32.

  Args:
    dt: (b, l, h) raw step sizes.
    dt_bias: (h,) added before the softplus, or None.
    dt_softplus: whether to apply softplus (Mamba2 does).

  Returns:
    (b, l, h) float32.
  """
  dt = dt.astype(jnp.float32)
  if dt_bias is not None:
    dt = dt + dt_bias.astype(jnp.float32)
  if dt_softplus:
    dt = jax.nn.softplus(dt)
  return dt


def _expand_groups(t: Array, heads: int) -> Array:
  """(b, l, g, n) -> (b, l, h, n) by repeating each group over its heads."""
  return jnp.repeat(t, heads // t.shape[2], axis=2)


def _finish(y, x, D, final_state, return_final_state):
  if D is not None:
    y = y + x.astype(jnp.float32) * D.astype(jnp.float32)[:, None]
  y = y.astype(x.dtype)
  return (y, final_state) if return_final_state else y


def ssd_sequential(x, dt, A, B, C, D=None, *, dt_bias=None, dt_softplus=False,
                   initial_state=None, segment_ids=None,
                   return_final_state=False, chunk_size=None):
  """The SSD recurrence token by token, in float32 (the oracle).

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
    segment_ids: (b, l) int, or None; the state resets where it changes.
    return_final_state: also return the (b, h, p, n) float32 final state.
    chunk_size: ignored; accepted so that every implementation shares one
      signature.

  Returns:
    y: (b, l, h, p) in x's dtype, and the final state if asked for.
  """
  del chunk_size
  b, l, h, p, g, n = validate_ssd_inputs(x, dt, A, B, C, D, dt_bias,
                                         initial_state, segment_ids)
  f32 = jnp.float32
  dt = effective_dt(dt, dt_bias, dt_softplus)
  Bh = _expand_groups(B, h).astype(f32)
  Ch = _expand_groups(C, h).astype(f32)
  starts = segment_starts(segment_ids, l)
  if starts is None:
    starts = jnp.zeros((b, l), bool)
  state0 = (jnp.zeros((b, h, p, n), f32) if initial_state is None
            else initial_state.astype(f32))

  def step(state, inputs):
    x_t, dt_t, b_t, c_t, start_t = inputs  # (b,h,p) (b,h) (b,h,n) (b,h,n) (b,)
    decay = jnp.exp(dt_t * A.astype(f32))  # (b, h)
    decay = jnp.where(start_t[:, None], 0.0, decay)
    state = (decay[:, :, None, None] * state
             + (dt_t[:, :, None] * x_t)[..., None] * b_t[:, :, None, :])
    y_t = jnp.einsum("bhpn,bhn->bhp", state, c_t,
                     precision=jax.lax.Precision.HIGHEST)
    return state, y_t

  xs = (jnp.moveaxis(x.astype(f32), 1, 0), jnp.moveaxis(dt, 1, 0),
        jnp.moveaxis(Bh, 1, 0), jnp.moveaxis(Ch, 1, 0),
        jnp.moveaxis(starts, 1, 0))
  final_state, y = jax.lax.scan(step, state0, xs)
  y = jnp.moveaxis(y, 0, 1)
  return _finish(y, x, D, final_state, return_final_state)


def _pad_to_chunks(t: Optional[Array], length: int, chunk: int, value=0):
  if t is None:
    return None
  pad = (-length) % chunk
  if pad == 0:
    return t
  widths = [(0, 0)] * t.ndim
  widths[1] = (0, pad)
  return jnp.pad(t, widths, constant_values=value)


def _chunk_terms(x, dt, A, B, C, segment_ids, chunk_size):
  """Everything of the chunked SSD that is local to a chunk.

  Returns a dict of per-chunk tensors (c = padded length / q):
    y_diag: (b, c, q, h, p) f32, the intra-chunk output.
    states: (b, c, h, p, n) f32, each chunk's state from its own tokens.
    cum: (b, c, q, h) f32, within-chunk cumulative log decay.
    seg: (b, c, q) segment ids, or None.
  """
  b, l, h, p = x.shape
  g = B.shape[2]
  q = chunk_size
  f32 = jnp.float32
  x = _pad_to_chunks(x, l, q)
  dt = _pad_to_chunks(dt, l, q)  # padded dt = 0: no decay, no input.
  B = _pad_to_chunks(B, l, q)
  C = _pad_to_chunks(C, l, q)
  if segment_ids is not None:
    # Padding continues the last segment, so it never resets anything.
    segment_ids = jnp.pad(segment_ids, ((0, 0), (0, (-l) % q)), mode="edge")
  c = x.shape[1] // q
  r = h // g  # heads per group

  x = x.reshape(b, c, q, h, p)
  dt = dt.reshape(b, c, q, h)
  B = B.reshape(b, c, q, g, B.shape[-1])
  C = C.reshape(b, c, q, g, C.shape[-1])
  cum = jnp.cumsum(dt * A.astype(f32), axis=2)  # (b, c, q, h)

  # Decay from token j to token i inside a chunk: exp(cum_i - cum_j), i >= j.
  # The difference is masked before the exp so no inf ever appears.
  causal = jnp.tril(jnp.ones((q, q), bool))
  diff = cum[:, :, :, None, :] - cum[:, :, None, :, :]  # (b, c, i, j, h)
  mask = causal[None, None, :, :, None]
  seg = None
  if segment_ids is not None:
    seg = segment_ids.reshape(b, c, q)
    mask = mask & (seg[:, :, :, None] == seg[:, :, None, :])[..., None]
  decay = jnp.exp(jnp.where(mask, diff, -jnp.inf))  # (b, c, i, j, h)

  scores = jnp.einsum("bcign,bcjgn->bcgij", C, B, preferred_element_type=f32)
  scores = jnp.repeat(scores, r, axis=2)  # (b, c, h, i, j)
  weights = scores * jnp.moveaxis(decay, -1, 2) * jnp.moveaxis(dt, -1, 2)[:, :, :, None, :]
  y_diag = jnp.einsum("bchij,bcjhp->bcihp", weights.astype(x.dtype), x,
                      preferred_element_type=f32)

  # Each chunk's own contribution to the state at its last token.
  to_end = jnp.exp(cum[:, :, -1:, :] - cum) * dt  # (b, c, q, h)
  if seg is not None:
    to_end = to_end * (seg == seg[:, :, -1:])[..., None]
  Bh = jnp.repeat(B, r, axis=3)  # (b, c, q, h, n)
  states = jnp.einsum("bcqh,bcqhp,bcqhn->bchpn", to_end, x.astype(f32),
                      Bh.astype(f32), preferred_element_type=f32)
  return dict(y_diag=y_diag, states=states, cum=cum, seg=seg, C=C)


def _chunk_carry_terms(cum, seg):
  """Per-chunk factors for passing the state from chunk c-1 into chunk c.

  Returns:
    chunk_decay: (b, c, h) f32, the factor on the previous chunk's state at
      this chunk's end (zero where a segment boundary lies in between).
    in_mask: (b, c, q) f32 or None, 1 where a token may see the incoming
      state (it is in the segment that was live at the previous chunk's end).
  """
  chunk_decay = jnp.exp(cum[:, :, -1, :])  # (b, c, h)
  if seg is None:
    return chunk_decay, None
  prev_last = jnp.concatenate([seg[:, :1, 0], seg[:, :-1, -1]], axis=1)  # (b, c)
  in_mask = (seg == prev_last[:, :, None]).astype(jnp.float32)  # (b, c, q)
  keep = (seg[:, :, -1] == prev_last).astype(jnp.float32)  # (b, c)
  return chunk_decay * keep[..., None], in_mask


def _combine_chunks(terms, chunk_states_in, in_mask, length, x, D, final_state,
                    return_final_state):
  """Adds the incoming states' contribution and un-chunks y."""
  cum, C = terms["cum"], terms["C"]
  b, c, q, h, p = terms["y_diag"].shape
  g = C.shape[3]
  Ch = jnp.repeat(C, h // g, axis=3)  # (b, c, q, h, n)
  in_decay = jnp.exp(cum)  # (b, c, q, h)
  if in_mask is not None:
    in_decay = in_decay * in_mask[..., None]
  y_off = jnp.einsum("bcqhn,bchpn,bcqh->bcqhp", Ch.astype(jnp.float32),
                     chunk_states_in, in_decay, preferred_element_type=jnp.float32)
  y = (terms["y_diag"] + y_off).reshape(b, c * q, h, p)[:, :length]
  return _finish(y, x, D, final_state, return_final_state)


def _ssd_chunked_impl(x, dt, A, B, C, D, dt_bias, dt_softplus, initial_state,
                      segment_ids, return_final_state, chunk_size, use_associative):
  b, l, h, p, g, n = validate_ssd_inputs(x, dt, A, B, C, D, dt_bias,
                                         initial_state, segment_ids)
  if chunk_size <= 0:
    raise ValueError(f"{chunk_size=} must be positive")
  dt_eff = effective_dt(dt, dt_bias, dt_softplus)
  if segment_ids is not None:
    segment_ids = renumber_segments(segment_ids)
  terms = _chunk_terms(x, dt_eff, A, B, C, segment_ids, chunk_size)
  chunk_decay, in_mask = _chunk_carry_terms(terms["cum"], terms["seg"])
  states = terms["states"]  # (b, c, h, p, n)
  state0 = (jnp.zeros((b, h, p, n), jnp.float32) if initial_state is None
            else initial_state.astype(jnp.float32))

  if use_associative:
    # Fold the initial state into chunk 0, then an associative scan of the
    # affine maps S -> a * S + s over chunks.
    first = states[:, 0] + chunk_decay[:, 0, :, None, None] * state0
    elems_s = jnp.concatenate([first[:, None], states[:, 1:]], axis=1)
    elems_a = chunk_decay.at[:, 0].set(0.0)

    def combine(left, right):
      a_l, s_l = left
      a_r, s_r = right
      return a_l * a_r, a_r[..., None, None] * s_l + s_r

    _, ends = jax.lax.associative_scan(combine, (elems_a, elems_s), axis=1)
  else:
    def step(carry, inp):
      a_c, s_c = inp
      carry = a_c[:, :, None, None] * carry + s_c
      return carry, carry

    _, ends = jax.lax.scan(step, state0,
                           (jnp.moveaxis(chunk_decay, 1, 0), jnp.moveaxis(states, 1, 0)))
    ends = jnp.moveaxis(ends, 0, 1)  # (b, c, h, p, n): state at each chunk end.
  states_in = jnp.concatenate([state0[:, None], ends[:, :-1]], axis=1)
  return _combine_chunks(terms, states_in, in_mask, l, x, D, ends[:, -1], return_final_state)


def ssd_chunked(x, dt, A, B, C, D=None, *, dt_bias=None, dt_softplus=False,
                initial_state=None, segment_ids=None, return_final_state=False,
                chunk_size=256):
  """Chunked SSD in plain XLA; chunk states passed with `lax.scan`.

  Same arguments and returns as `ssd_sequential`; `chunk_size` is the number
  of tokens handled by the quadratic intra-chunk form (any length works: the
  sequence is padded inside).
  """
  return _ssd_chunked_impl(x, dt, A, B, C, D, dt_bias, dt_softplus,
                           initial_state, segment_ids, return_final_state,
                           chunk_size, use_associative=False)


def ssd_associative(x, dt, A, B, C, D=None, *, dt_bias=None, dt_softplus=False,
                    initial_state=None, segment_ids=None,
                    return_final_state=False, chunk_size=256):
  """Chunked SSD with `jax.lax.associative_scan` between chunks.

  Same arguments and returns as `ssd_chunked`.
  """
  return _ssd_chunked_impl(x, dt, A, B, C, D, dt_bias, dt_softplus,
                           initial_state, segment_ids, return_final_state,
                           chunk_size, use_associative=True)
