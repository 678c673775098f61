"""Training metrics: JSON lines and TensorBoard events.

`MetricWriter` appends one JSON object per logged step to
`WORKDIR/metrics.jsonl` (`{"step": s, "time": unix, "train/loss": ...}`) and,
when tensorboardX imports, the same scalars as TensorBoard events under
`WORKDIR/tb/`. A bucket workdir (gs://...) gets metrics.jsonl rewritten whole
(Cloud Storage has no appends) at most every REMOTE_UPLOAD_SECONDS, and
TensorBoard events only where tensorboardX can write there (a warning
otherwise). Only process 0 writes; the others get a writer that does
nothing, so callers never branch on the process index.

The console's line is `mambaeye_jax.progress.progress_line`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Mapping

import numpy as np
from etils import epath

try:
  import tensorboardX  # pylint: disable=g-import-not-at-top
except ImportError:  # Optional: JSON lines are always written.
  tensorboardX = None

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"
# A bucket's object is rewritten whole (no appends on Cloud Storage): at most
# this often, and at close.
REMOTE_UPLOAD_SECONDS = 60.0


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
    # A URL workdir (gs://...): "://" must not reach os.path, which would make
    # a local ./gs:/ directory.
    self._remote = "://" in os.fspath(workdir)
    self._remote_lines: list[str] = []
    self._remote_dirty = False
    self._remote_uploaded = -math.inf
    if not enabled:
      return
    if self._remote:
      # gcsfs opens "a" as "w" (and writes only at close): keep the lines
      # and rewrite the object, so a resumed run keeps the earlier ones.
      epath.Path(workdir).mkdir(parents=True, exist_ok=True)
      self._jsonl_path = epath.Path(workdir, METRICS_FILE)
      if self._jsonl_path.exists():
        self._remote_lines = self._jsonl_path.read_text(
            encoding="utf-8").splitlines(keepends=True)
    else:
      os.makedirs(workdir, exist_ok=True)
      # Append: a resumed run continues the same file (steps may repeat after
      # a crash between a log line and the checkpoint; readers keep the last).
      self._jsonl = open(os.path.join(workdir, METRICS_FILE), "a", encoding="utf-8")
    self._tb_dir = os.path.join(workdir, TB_DIR)
    if tensorboard and tensorboardX is not None:
      self._tb = self._tensorboard_writer(self._tb_dir)
    elif tensorboard:
      # An optional extra, not a fault: say how to get the events, quietly.
      logging.info("metrics go to %s; TensorBoard events need the tensorboard "
                   "extra (pip install 'mambaeye-jax[tensorboard]')", METRICS_FILE)

  def _tensorboard_writer(self, logdir: str):
    """tensorboardX's writer; None, with a warning, where a bucket cannot take it."""
    if not self._remote:
      return tensorboardX.SummaryWriter(logdir)
    # tensorboardX writes gs:// with google-cloud-storage, s3:// with boto3,
    # and any other URL to a local directory named after it: check first.
    scheme = logdir.split("://", 1)[0]
    from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
    if (scheme not in record_writer.REGISTERED_FACTORIES
        or not getattr(record_writer, f"{scheme.upper()}_ENABLED", False)):
      self._tensorboard_failed(logdir, f"tensorboardX cannot write {scheme}:// here "
                               "(gs:// needs google-cloud-storage, s3:// boto3)")
      return None
    try:
      return tensorboardX.SummaryWriter(logdir)
    except Exception as e:  # pylint: disable=broad-except
      self._tensorboard_failed(logdir, f"{type(e).__name__}: {e}")
      return None

  def _tensorboard_failed(self, logdir: str, why: str) -> None:
    """Turns TensorBoard events off for this run, with one warning."""
    logging.warning("no TensorBoard events in %s (%s); metrics go to %s only", logdir,
                    why, METRICS_FILE)
    tb, self._tb = self._tb, None
    if tb is not None:
      try:
        tb.close()
      except Exception:  # pylint: disable=broad-except
        pass

  def _upload(self, force: bool = False) -> None:
    """Rewrites a bucket's metrics.jsonl with every line so far."""
    now = time.monotonic()
    if not self._remote_dirty or (
        not force and now - self._remote_uploaded < REMOTE_UPLOAD_SECONDS):
      return
    try:
      self._jsonl_path.write_text("".join(self._remote_lines), encoding="utf-8")
    except Exception as e:  # pylint: disable=broad-except
      # A transient bucket error must not stop training: the lines stay in
      # memory and go with the next upload.
      logging.warning("cannot write %s (%s: %s); retrying at the next log step",
                      self._jsonl_path, type(e).__name__, e)
      return
    self._remote_uploaded = now
    self._remote_dirty = False

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    """Records `scalars` (name -> number) at `step`."""
    if not self.enabled:
      return
    record = {"step": int(step), "time": time.time()}
    record.update({k: _plain(v) for k, v in scalars.items()})
    if self._remote:
      self._remote_lines.append(json.dumps(record) + "\n")
      self._remote_dirty = True
      self._upload()
    else:
      self._jsonl.write(json.dumps(record) + "\n")
      self._jsonl.flush()
    if self._tb is not None:
      try:
        for name, value in scalars.items():
          self._tb.add_scalar(name, _plain(value), int(step))
        self._tb.flush()
      except Exception as e:  # pylint: disable=broad-except
        if not self._remote:
          raise
        # A bucket's events are a bonus: losing them must not stop training.
        self._tensorboard_failed(self._tb_dir, f"{type(e).__name__}: {e}")

  def close(self) -> None:
    if self._remote:
      self._upload(force=True)
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      tb, self._tb = self._tb, None
      try:
        tb.close()
      except Exception as e:  # pylint: disable=broad-except
        if not self._remote:
          raise
        logging.warning("closing the TensorBoard writer of %s failed: %s: %s",
                        self._tb_dir, type(e).__name__, e)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def read_metrics(workdir: str) -> list[dict]:
  """All records of WORKDIR/metrics.jsonl, in file order."""
  path = os.path.join(workdir, METRICS_FILE)
  with epath.Path(path).open(encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
