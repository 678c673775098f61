"""Console progress: one line for a training step, one live line for evaluation.

    step 1200/93600 (1.3%) | loss 6.2101 | acc@last 3.1% | 2150 img/s | 29.8 ms/step | ETA 12h03m
    [random/fit/512] 20/50 images, 20/100 total, 93.1 img/s, ETA 4m05s

`progress_line` is what both trainers print at each log step; `Progress` is
the evaluator's line, rewritten in place on a terminal. Durations are
`format_duration`'s everywhere.
"""

from __future__ import annotations

import collections
import math
import sys
import time
from typing import Mapping


def format_duration(seconds: float) -> str:
  """12h03m, 4m05s or 9s."""
  if not math.isfinite(seconds) or seconds < 0:
    return "?"
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f"{hours}h{minutes:02d}m"
  if minutes:
    return f"{minutes}m{secs:02d}s"
  return f"{secs}s"


def progress_line(step: int, total_steps: int, scalars: Mapping[str, float],
                  seconds_per_step: float, eta: bool = True) -> str:
  """One console line: step, loss, last-glimpse accuracy, speed, ETA.

  eta=False prints "ETA ?" (the first line, whose time includes compilation).
  """
  parts = [f"step {step}/{total_steps} ({100.0 * step / max(total_steps, 1):.1f}%)"]
  if "train/loss" in scalars:
    parts.append(f"loss {scalars['train/loss']:.4f}")
  if "train/accuracy_last" in scalars:
    parts.append(f"acc@last {100.0 * scalars['train/accuracy_last']:.1f}%")
  elif "train/accuracy" in scalars:  # A classifier of whole images (MambaOut).
    parts.append(f"acc {100.0 * scalars['train/accuracy']:.1f}%")
  if "perf/images_per_sec" in scalars:
    parts.append(f"{scalars['perf/images_per_sec']:.0f} img/s")
  parts.append(f"{1000.0 * seconds_per_step:.1f} ms/step")
  if "perf/data_wait_fraction" in scalars:
    parts.append(f"data wait {100.0 * scalars['perf/data_wait_fraction']:.0f}%")
  remaining = (total_steps - step) * seconds_per_step if eta else float("nan")
  parts.append(f"ETA {format_duration(remaining)}")
  return " | ".join(parts)


class Progress:
  """One status line with throughput and ETA, rewritten in place on a
  terminal and printed every `interval` seconds otherwise."""

  def __init__(self, total_images: int, stream=None, interval: float = 10.0):
    self.total = total_images
    self.stream = stream if stream is not None else sys.stderr
    self.interval = interval
    self.done = 0
    self.start = time.perf_counter()
    self._last = 0.0
    self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()
    self._window = collections.deque(maxlen=20)  # (time, done) for the rate.

  def update(self, count: int, label: str, setting_done: int,
             setting_total: int, force: bool = False):
    now = time.perf_counter()
    self.done += count
    self._window.append((now, self.done))
    if not force and now - self._last < (0.5 if self._tty else self.interval):
      return
    self._last = now
    (t0, d0), (t1, d1) = self._window[0], self._window[-1]
    rate = (d1 - d0) / (t1 - t0) if t1 > t0 and d1 > d0 else 0.0
    eta = (self.total - self.done) / rate if rate > 0 else float("nan")
    speed = f"{rate:.1f} img/s" if rate > 0 else "warming up (compiling)"
    line = (f"[{label}] {setting_done}/{setting_total} images, "
            f"{self.done}/{self.total} total, {speed}, ETA {format_duration(eta)}")
    if self._tty:
      self.stream.write("\r" + line.ljust(100))
    else:
      self.stream.write(line + "\n")
    self.stream.flush()

  def finish(self):
    if self._tty:
      self.stream.write("\n")
    self.stream.flush()
