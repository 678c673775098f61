"""Training metrics: JSON lines, TensorBoard events and a console progress line.

`MetricWriter` appends one JSON object per logged step to
`WORKDIR/metrics.jsonl` (`{"step": s, "time": unix, "train/loss": ...}`) and,
when tensorboardX imports, the same scalars as TensorBoard events under
`WORKDIR/tb/`. Only process 0 writes; the others get a writer that does
nothing, so callers never branch on the process index.

`progress_line` formats what the console shows at each log step:

    step 1200/93600 (1.3%) | loss 6.2101 | acc@last 3.1% | 2150 img/s | 29.8 ms/step | ETA 12h03m
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Mapping

import numpy as np

try:
  import tensorboardX  # pylint: disable=g-import-not-at-top
except ImportError:  # Optional: JSON lines are always written.
  tensorboardX = None

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"


def _plain(value):
  """JSON-able Python scalar from numpy / jax scalars."""
  value = np.asarray(value)
  if value.dtype.kind in "iub":
    return int(value)
  return float(value)


class MetricWriter:
  """Writes scalar metrics as JSON lines and TensorBoard events.

  Args:
    workdir: directory for metrics.jsonl and tb/.
    enabled: False on every process but the first.
    tensorboard: also write TensorBoard events (if tensorboardX imports).
  """

  def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self._jsonl = None
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    # Append: a resumed run continues the same file (steps may repeat after
    # a crash between a log line and the checkpoint; readers keep the last).
    self._jsonl = open(os.path.join(workdir, METRICS_FILE), "a", encoding="utf-8")
    if tensorboard and tensorboardX is not None:
      self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, TB_DIR))
    elif tensorboard:
      logging.warning("tensorboardX does not import: metrics go to %s only, no "
                      "TensorBoard events", METRICS_FILE)

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    """Records `scalars` (name -> number) at `step`."""
    if not self.enabled:
      return
    record = {"step": int(step), "time": time.time()}
    record.update({k: _plain(v) for k, v in scalars.items()})
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for name, value in scalars.items():
        self._tb.add_scalar(name, _plain(value), int(step))
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def read_metrics(workdir: str) -> list[dict]:
  """All records of WORKDIR/metrics.jsonl, in file order."""
  path = os.path.join(workdir, METRICS_FILE)
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


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
  if "perf/images_per_sec" in scalars:
    parts.append(f"{scalars['perf/images_per_sec']:.0f} img/s")
  parts.append(f"{1000.0 * seconds_per_step:.1f} ms/step")
  if "perf/data_wait_fraction" in scalars:
    parts.append(f"data wait {100.0 * scalars['perf/data_wait_fraction']:.0f}%")
  remaining = (total_steps - step) * seconds_per_step if eta else float("nan")
  parts.append(f"ETA {format_duration(remaining)}")
  return " | ".join(parts)
