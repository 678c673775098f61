"""Batching glimpse examples: padded rows or packed rows, checkpointable.

Input: a Grain `IterDataset` of examples (see `glimpses.py`), or skip markers
`{SKIP_KEY: reason}` left by records that could not be read, or empty
examples (`length` 0, used to even out evaluation shards).

Output batch (b rows of L steps):
  "patches" (b, L, 768) uint8; "positions" (b, L, 2) int32; "ratio" (b, L)
  float32; "labels" (b, L) int32 (the label of the step's sequence, 0 on
  padding); "mask" (b, L) bool (real steps); "segment_ids" (b, L) int32
  (1, 2, 3... per sequence in its row, 0 on padding; always 1 when padded);
  plus NUM_SKIPPED_KEY () int32, the skip markers consumed for this batch,
  which `pipeline.GlimpseIterator` removes and adds to its counter.
With `row_arrays` (name -> (shape of one row, dtype); `pipeline.row_arrays`
gives a ship mode's), those per-row arrays replace "patches": one example
per row, zeros on empty rows. Ship "canvas" has "canvas" (b, S, S, 3) uint8
(examples of `glimpses.make_canvas_example`), ship "source" has "source" and
"plan"; the steps' patches are gathered on the device
(`train_step.batch_patches`), zero on padding steps as here.

Padded mode puts one example per row. Packed mode fills rows greedily in
stream order: an example that does not fit the rest of the row starts the
next row (and, past the last row, the next batch).

After a batch is full the batcher reads one example ahead, so that skip
markers up to the next example (or up to the end of a finite input) count in
this batch. That carried example is the only state besides the input's: the
iterator's state is the input's state just before the carried example was
read, so a restore re-reads it. Skips inside a final partial batch that
drop_remainder drops are not counted (its records are not seen either).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import grain
import numpy as np

from mambaeye_jax.data import geometry


SKIP_KEY = "skipped"
NUM_SKIPPED_KEY = "num_skipped"

Example = dict[str, Any]
# Per-row arrays that replace "patches": name -> (shape of one row, dtype).
RowArrays = Mapping[str, tuple[tuple[int, ...], Any]]


def empty_batch(batch_size: int, seq_len: int,
                row_arrays: RowArrays | None = None) -> dict[str, np.ndarray]:
  """An all-padding batch of the output contract: (b, L) rows of zeros.

  row_arrays: those arrays (b, *shape) instead of "patches" (b, L, 768).
  """
  b, L = batch_size, seq_len
  rows = dict(row_arrays or {})
  pixels = ({name: np.zeros((b, *shape), dtype) for name, (shape, dtype) in rows.items()}
            if rows else {"patches": np.zeros((b, L, geometry.PATCH_DIM), np.uint8)})
  return {
      **pixels,
      "positions": np.zeros((b, L, 2), np.int32),
      "ratio": np.zeros((b, L), np.float32),
      "labels": np.zeros((b, L), np.int32),
      "mask": np.zeros((b, L), bool),
      "segment_ids": np.zeros((b, L), np.int32),
  }


def rows_to_batch(rows: Sequence[Sequence[Example]], batch_size: int,
                  seq_len: int, row_arrays: RowArrays | None = None
                  ) -> dict[str, np.ndarray]:
  """Lays out rows of examples into one batch.

  Args:
    rows: at most `batch_size` rows, each a list of examples whose lengths
      sum to at most `seq_len`; missing rows are all padding.
    batch_size: b.
    seq_len: L.
    row_arrays: the examples' arrays that replace "patches" (name ->
      (shape, dtype)), one example per row; None: examples with "patches".

  Returns:
    The batch dict of the module docstring (without NUM_SKIPPED_KEY).

  Raises:
    ValueError: a row longer than `seq_len`, too many rows, or (canvas) a
      row of several examples or a canvas not S x S.
  """
  if len(rows) > batch_size:
    raise ValueError(f"{len(rows)} rows for {batch_size=}")
  per_row = dict(row_arrays or {})
  batch = empty_batch(batch_size, seq_len, row_arrays=per_row)
  for i, row in enumerate(rows):
    if per_row:
      if len(row) > 1:
        raise ValueError(f"row {i} packs {len(row)} examples, but a {'/'.join(per_row)} "
                         "batch holds one image per row")
      for name, (shape, _) in per_row.items():
        if row and row[0][name].shape != tuple(shape):
          raise ValueError(f"row {i}: {name} {row[0][name].shape} is not {tuple(shape)}")
    offset = 0
    for segment, ex in enumerate(row, start=1):
      n = int(ex["length"])
      if offset + n > seq_len:
        raise ValueError(f"row {i} needs {offset + n} steps > {seq_len=}")
      steps = slice(offset, offset + n)
      if per_row:
        for name in per_row:
          batch[name][i] = ex[name]
      else:
        batch["patches"][i, steps] = ex["patches"][:n]
      batch["positions"][i, steps] = ex["positions"][:n]
      batch["ratio"][i, steps] = ex["ratio"][:n]
      batch["labels"][i, steps] = ex["label"]
      batch["mask"][i, steps] = True
      batch["segment_ids"][i, steps] = segment
      offset += n
  return batch


class BatchIterDataset(grain.IterDataset):
  """Batches an IterDataset of examples into padded or packed rows."""

  def __init__(self, parent: grain.IterDataset, *, batch_size: int,
               seq_len: int, packing: bool = False,
               drop_remainder: bool = True, row_arrays: RowArrays | None = None):
    """Configures the batcher.

    Args:
      parent: examples (or skip markers) in stream order.
      batch_size: rows per batch, b.
      seq_len: steps per row, L; every example must have length <= L.
      packing: several sequences per row (segment ids 1, 2, ...).
      drop_remainder: at the end of a finite input, drop the last partial
        batch (True) or pad it with empty rows (False).
      row_arrays: the examples' arrays batched instead of "patches" (name
        -> (shape, dtype)), one per row (no packing); None: "patches".
    """
    rows = dict(row_arrays or {})
    if rows and packing:
      raise ValueError(f"{'/'.join(rows)} batches hold one image per row: packing is not "
                       "supported")
    super().__init__(parent)
    if batch_size < 1 or seq_len < 1:
      raise ValueError(f"need batch_size, seq_len >= 1, got {batch_size=}, "
                       f"{seq_len=}")
    self._batch_size = batch_size
    self._seq_len = seq_len
    self._packing = packing
    self._drop_remainder = drop_remainder
    self._rows = rows

  def __iter__(self) -> "_BatchIterator":
    return _BatchIterator(self._parent.__iter__(), self._batch_size,
                          self._seq_len, self._packing, self._drop_remainder,
                          self._rows)

  def __str__(self) -> str:
    return (f"BatchIterDataset(batch_size={self._batch_size}, "
            f"seq_len={self._seq_len}, packing={self._packing}, "
            f"row_arrays={sorted(self._rows)})")


class _BatchIterator(grain.DatasetIterator):
  """Iterator of BatchIterDataset (see the module docstring for state)."""

  def __init__(self, parent: grain.DatasetIterator, batch_size: int,
               seq_len: int, packing: bool, drop_remainder: bool,
               rows: RowArrays | None = None):
    super().__init__(parent)
    self._batch_size = batch_size
    self._seq_len = seq_len
    self._packing = packing
    self._drop_remainder = drop_remainder
    self._rows = rows
    self._carry: Example | None = None
    self._carry_state: dict[str, Any] | None = None
    self._exhausted = False

  def _pull(self) -> tuple[Example | None, dict[str, Any] | None, int]:
    """Next real example (None at the end), the input state before it, and
    the number of skip markers read on the way."""
    skipped = 0
    while True:
      state = self._parent.get_state()
      try:
        ex = next(self._parent)
      except StopIteration:
        return None, None, skipped
      if SKIP_KEY in ex:
        skipped += 1
        continue
      n = int(ex["length"])
      if n > self._seq_len:
        raise ValueError(f"example of length {n} exceeds seq_len="
                         f"{self._seq_len}; raise seq_len or lower the "
                         "number of glimpses")
      return ex, state, skipped

  def __next__(self) -> dict[str, np.ndarray]:
    if self._exhausted:
      raise StopIteration
    rows: list[list[Example]] = []
    row: list[Example] = []  # Packing: the row being filled.
    used = 0
    num_skipped = 0
    pending = None
    if self._carry is not None:
      pending = (self._carry, self._carry_state)
      self._carry = self._carry_state = None
    while len(rows) < self._batch_size and self._carry is None:
      if pending is not None:
        (ex, state), pending = pending, None
      else:
        ex, state, skipped = self._pull()
        num_skipped += skipped
      if ex is None:
        self._exhausted = True
        break
      n = int(ex["length"])
      if not self._packing:
        rows.append([ex])
      elif used + n <= self._seq_len:
        row.append(ex)
        used += n
      else:
        rows.append(row)
        row, used = [ex], n
        if len(rows) == self._batch_size:
          # The example that opened a row past the batch starts the next.
          self._carry, self._carry_state = ex, state
          row = []
    if row:  # Packing ran out of input with a row half full.
      rows.append(row)
    if not self._exhausted and self._carry is None:
      # Read one example ahead, so that skip markers between this batch and
      # the next count in this one (and those before the end of a finite
      # input are not lost with it); that example starts the next batch.
      ex, state, skipped = self._pull()
      num_skipped += skipped
      if ex is None:
        self._exhausted = True
      else:
        self._carry, self._carry_state = ex, state
    if not rows or (self._drop_remainder and len(rows) < self._batch_size):
      raise StopIteration
    batch = rows_to_batch(rows, self._batch_size, self._seq_len, row_arrays=self._rows)
    batch[NUM_SKIPPED_KEY] = np.int32(num_skipped)
    return batch

  def get_state(self) -> dict[str, Any]:
    # With a carried example, resume from just before it was read.
    state = (self._carry_state if self._carry is not None
             else self._parent.get_state())
    return {"parent": state, "exhausted": self._exhausted}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._carry = self._carry_state = None
    self._exhausted = bool(state["exhausted"])


def batch_examples(examples: Iterable[Example], batch_size: int,
                   seq_len: int, packing: bool = False,
                   drop_remainder: bool = False, row_arrays: RowArrays | None = None
                   ) -> list[dict[str, np.ndarray]]:
  """Convenience for tests and tools: batches a list of examples eagerly."""
  ds = BatchIterDataset(grain.MapDataset.source(list(examples))
                        .to_iter_dataset(),
                        batch_size=batch_size, seq_len=seq_len,
                        packing=packing, drop_remainder=drop_remainder,
                        row_arrays=row_arrays)
  return list(ds)
