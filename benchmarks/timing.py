"""The one timing helper of the benchmarks.

    times = call_times(fn, repeats=7, inner=5, warmup=1, sync=jax.block_until_ready)
    ms = median_ms(fn, repeats=7, inner=5, sync=jax.block_until_ready)

`fn` is called `warmup` times untimed (compilation, caches), then `repeats`
timed batches of `inner` back-to-back calls; `sync(output)` waits for the
last output of each batch (JAX dispatches asynchronously: without it the
clock would stop before the device does), and each batch's time is divided
by `inner`. Importing this module imports nothing heavy (the data benchmark
runs without JAX).
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable


def _no_sync(_: Any) -> None:
  """For functions that block on their own."""


def call_times(fn: Callable[[], Any], *, repeats: int, inner: int = 1, warmup: int = 1,
               sync: Callable[[Any], Any] = _no_sync) -> list[float]:
  """Seconds per call of `fn`, one value per timed batch (see the module doc)."""
  for _ in range(warmup):
    sync(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(inner):
      out = fn()
    sync(out)
    times.append((time.perf_counter() - start) / inner)
  return times


def median_ms(fn: Callable[[], Any], **kwargs) -> float:
  """The median of `call_times(fn, **kwargs)`, in milliseconds."""
  return 1e3 * statistics.median(call_times(fn, **kwargs))
