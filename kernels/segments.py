"""Packed sequences: where segments start, and ids that never repeat.

Every op that resets its state at a segment boundary (the SSD scan, the
causal conv, their kernels) takes `segment_ids` (b, l) int and uses these.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

Array = jax.Array


def segment_starts(segment_ids: Optional[Array], length: int) -> Optional[Array]:
  """(b, l) bool: True where a token starts a new segment (never at t = 0)."""
  if segment_ids is None:
    return None
  prev = jnp.concatenate([segment_ids[:, :1], segment_ids[:, :-1]], axis=1)
  return segment_ids != prev


def renumber_segments(segment_ids: Array) -> Array:
  """(b, l) ids -> (b, l) int32 ids that grow by one at every change.

  Equality masks ("same segment") are then right even where a later segment
  reuses an earlier id (0, 1, 0 are three segments, not two).
  """
  return jnp.cumsum(segment_starts(segment_ids, segment_ids.shape[1]), axis=1,
                    dtype=jnp.int32)
