"""Glimpses on the device: the patch gather and the move embedding in JAX.

The same definitions as the host's `mambaeye_jax.data.geometry` (which the
data workers run, without JAX), for batches inside jitted code: the model
embeds moves here, and the evaluator gathers patches on the device from the
canvases its workers prepare. Tests check both sides agree.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mambaeye_jax.data import geometry
from mambaeye_jax.data.geometry import MOVE_DIM
from mambaeye_jax.data.geometry import PATCH_SIZE


def moves_from_positions_jax(positions: jax.Array,
                             segment_ids: jax.Array | None = None) -> jax.Array:
  """Relative moves inside jitted code.

  Args:
    positions: (b, T, 2) int (row, col) top-left corners.
    segment_ids: (b, T) int or None; a token that starts a new segment gets
      move (0, 0), as the first token of a sequence does.

  Returns:
    (b, T, 2) int32 moves.
  """
  positions = positions.astype(jnp.int32)
  prev = jnp.concatenate([positions[:, :1], positions[:, :-1]], axis=1)
  moves = positions - prev
  if segment_ids is not None:
    prev_seg = jnp.concatenate([segment_ids[:, :1], segment_ids[:, :-1]], axis=1)
    moves = jnp.where((segment_ids != prev_seg)[..., None], 0, moves)
  return moves


def move_embedding_jax(moves: jax.Array) -> jax.Array:
  """`move_embedding` inside jitted code.

  Args:
    moves: (..., 2) int (row, col) moves.

  Returns:
    (..., 512) float32.
  """
  # Moves are exact integers; only the product and the sines round (to ~1e-5
  # for moves of a thousand pixels, as float32 sines of large angles do).
  angles = moves.astype(jnp.float32)[..., None] * jnp.asarray(
      geometry.inverse_frequencies(), jnp.float32)
  feats = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
  return feats.reshape(*feats.shape[:-2], MOVE_DIM)


def extract_patches_jax(canvas: jax.Array, positions: jax.Array) -> jax.Array:
  """Device-side patch gather for a batch of canvases.

  Args:
    canvas: (b, H, W, 3) any dtype.
    positions: (b, T, 2) int corners inside the canvas (clamped if not).

  Returns:
    (b, T, 768) of canvas.dtype, flattened as (channel, row, col).
  """
  def one(image, pos):
    def take(p):
      return jax.lax.dynamic_slice(image, (p[0], p[1], 0),
                                   (PATCH_SIZE, PATCH_SIZE, image.shape[-1]))
    patches = jax.vmap(take)(pos)  # (T, 16, 16, 3)
    return patches.transpose(0, 3, 1, 2).reshape(pos.shape[0], -1)
  return jax.vmap(one)(canvas, positions.astype(jnp.int32))
