"""The pieces of a training loop, each small enough to test alone.

`train_lib.train_and_evaluate` (MambaEye) is a short loop over these:

    StopSignals        SIGTERM / SIGINT as a flag the loop polls
    should_stop        that flag agreed across processes, plus preemption
    next_batch         a batch, or None when the data died of the stop signal
    FiniteCheck        the non-finite check of each step, one step late
    check_finite       raises NonFiniteLossError / NonFiniteStateError
    TrainLogger        the log window: metrics, wall time and data wait since
                       the last line; metrics.jsonl and the progress line
    checkpoint_due     whether this step is saved

`mambaout_train.train` uses `TrainLogger` too (it has no checkpoints and no
stop signals: a run is minutes long).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
import signal
import time
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from mambaeye_jax import progress as progress_lib
from mambaeye_jax import work_dir


# ----------------------------------------------------------------------------
# Stopping.


class StopSignals:
  """Turns SIGTERM / SIGINT into a flag the loop polls (main thread only).

  The first signal sets `requested`; the loop finishes the step in flight,
  saves and returns. A second Ctrl-C raises KeyboardInterrupt at once (no
  save). Outside the main thread no handler can be installed, so the run
  cannot be interrupted and `requested` stays False.
  """

  def __init__(self):
    self.requested = False
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt  # Second Ctrl-C: abort without saving.
    self.requested = True
    logging.warning("received %s: saving a checkpoint and stopping after this step",
                    signal.Signals(signum).name)

  def __enter__(self):
    try:
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    except ValueError:  # Not the main thread: no handlers, no interruption.
      self._previous = {}
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def should_stop(requested: bool, step: int, sync_every_steps: int,
                reached_preemption: Callable[[int], bool],
                process_count: int | None = None) -> bool:
  """Whether every process stops after `step` (the same answer on each).

  One process stops as soon as it is asked to. Several must stop at the
  same step (the save that follows is collective), so they only act on a
  signal at every `sync_every_steps`-th step, where they agree: one
  process's request stops all. A JAX preemption notice
  (`reached_preemption`, orbax's manager's; already agreed across
  processes) stops at any step.

  Args:
    requested: this process's StopSignals.requested.
    step: the step just completed.
    sync_every_steps: how often several processes agree (config
      sync_stop_every_steps).
    reached_preemption: step -> bool; called only when no agreed request
      stops the run already.
    process_count: default jax.process_count().

  Returns:
    True to save and stop now.
  """
  if process_count is None:
    process_count = jax.process_count()
  stopping = requested
  if process_count > 1 and step % sync_every_steps == 0:
    # Collective: every process reaches it at the same step.
    stopping = bool(multihost_utils.process_allgather(np.int32(stopping)).max())
  elif process_count > 1:
    stopping = False  # Every host must stop at the same step.
  return stopping or reached_preemption(step)


def next_batch(batches: Iterator[Any], stop: StopSignals, step: int,
               process_count: int | None = None) -> Any | None:
  """next(batches), or None when the data died of the stop signal.

  A terminal's Ctrl-C and `timeout` signal the whole process group, so the
  data workers may die of the same signal while the loop waits for them:
  the batch in flight is lost, not the run; the caller saves `step` and
  stops. With several processes the others would wait in that save, so
  the error is raised instead, as is any error without a stop request.

  Args:
    batches: the batch iterator.
    stop: the run's StopSignals.
    step: the last completed step (named in the warning).
    process_count: default jax.process_count().
  """
  if process_count is None:
    process_count = jax.process_count()
  try:
    return next(batches)
  except Exception:  # pylint: disable=broad-except
    if not (stop.requested and process_count == 1):
      raise
    logging.warning("the data pipeline stopped after the stop signal; saving step %d", step)
    return None


def checkpoint_due(step: int, every_steps: int, *, done: bool, stopping: bool) -> bool:
  """Whether `step` is saved: every `every_steps` steps, the last, and on a stop."""
  return step % every_steps == 0 or done or stopping


# ----------------------------------------------------------------------------
# Non-finite values.


class NonFiniteLossError(FloatingPointError):
  """The loss went NaN or infinite; the message names the step and the batch file."""


class NonFiniteStateError(NonFiniteLossError):
  """The parameters or optimizer state went NaN or infinite (the loss did not)."""


def check_finite(step: int, metrics: Mapping[str, Any], local_batch: Mapping[str, Any],
                 workdir: str, last_checkpoint: int | None) -> None:
  """Raises before a non-finite loss or state can be logged as fine or saved.

  Args:
    step: the step whose metrics these are.
    metrics: its step metrics ("loss", optionally "nonfinite_state", the
      count of non-finite parameter and optimizer values after the update,
      and "learning_rate"); device or host scalars.
    local_batch: this process's rows of that step's batch (host arrays),
      written to `nan_batch_step<step>_process<i>.npz` in `workdir` when
      raising.
    workdir: the run's work directory (local or a bucket).
    last_checkpoint: the last saved step, named in the message; None if none.

  Raises:
    NonFiniteLossError: the loss is NaN or infinite.
    NonFiniteStateError: the loss is finite but the state is not.
  """
  loss = float(metrics["loss"])
  nonfinite = int(metrics.get("nonfinite_state", 0))
  if math.isfinite(loss) and not nonfinite:
    return
  path = os.path.join(workdir, f"nan_batch_step{step}_process{jax.process_index()}.npz")
  # Through memory: np.savez seeks in its file, which a bucket's files cannot.
  buffer = io.BytesIO()
  np.savez_compressed(buffer, **local_batch)
  epath.Path(path).write_bytes(buffer.getvalue())
  if last_checkpoint is None:
    last = "no checkpoint was written"
  else:
    last = (f"the last checkpoint is step {last_checkpoint} in "
            f"{os.path.join(workdir, work_dir.CHECKPOINT_DIR)}")
  where = f"that step's batch (this process's rows) is saved in {path}; {last}"
  if not math.isfinite(loss):
    raise NonFiniteLossError(f"training loss is {loss} at step {step}; {where}")
  raise NonFiniteStateError(
      f"the update of step {step} made {nonfinite} parameter or optimizer values NaN or "
      f"infinite (the loss, {loss:.4g}, was finite; learning rate "
      f"{float(metrics['learning_rate']):.3g}: too large?); nothing was saved from that "
      f"state; {where}")


class FiniteCheck:
  """The non-finite check of each step, made one step late.

  Reading a step's loss waits for the device; waiting for the previous
  step's instead, once the next one is dispatched, costs no device idle
  time. Whatever logs or saves must `flush` first, so that nothing
  non-finite is ever logged as fine or checkpointed.
  """

  def __init__(self, workdir: str):
    self.workdir = workdir
    self._pending = None  # (step, device metrics, host batch), not yet checked.

  def push(self, step: int, metrics: Mapping[str, Any], local_batch: Mapping[str, Any],
           last_checkpoint: int | None) -> None:
    """Checks the step pending (if any), then holds `step`'s for later."""
    self.flush(last_checkpoint)
    self._pending = (step, metrics, local_batch)

  def flush(self, last_checkpoint: int | None) -> None:
    """Checks the step pending, if any (`check_finite`'s errors)."""
    if self._pending is not None:
      step, metrics, local_batch = self._pending
      self._pending = None
      check_finite(step, metrics, local_batch, self.workdir, last_checkpoint)

  def clear(self) -> None:
    """Drops the pending step unchecked (frees its batch's shared memory)."""
    self._pending = None


# ----------------------------------------------------------------------------
# Logging.


@dataclasses.dataclass
class Window:
  """The steps of one log line.

  Attributes:
    step: the last step of the window (the line's).
    metrics: each step's metrics, on the host (len: the steps).
    seconds: wall time since the previous line (or the logger's start), s.
    data_wait: of which waiting for batches, s.
    first: the first line of this run, whose time includes compilation.
  """
  step: int
  metrics: list
  seconds: float
  data_wait: float
  first: bool

  @property
  def seconds_per_step(self) -> float:
    return self.seconds / len(self.metrics)


class TrainLogger:
  """Owns the log cadence, the metrics since the last line and their timing.

  Each step, `add` its device metrics and the seconds spent waiting for its
  batch; when `due`, `log` fetches the window's metrics, turns them into
  scalars (the caller's `summarize`), writes them to the metric writer and
  prints the progress line (progress.progress_line):

      step 2000/2000 (100.0%) | loss 2.3010 | acc@last 11.2% | 93 img/s | ... | ETA 0s

  The first line of a run is logged at its first step, alone: its time is
  mostly compilation, so it prints "ETA ?" and does not blur the rate of
  the next line.
  """

  def __init__(self, total_steps: int, writer, log_every_steps: int, *,
               start_step: int = 0, echo: bool = True):
    """Starts the clock of the first window.

    Args:
      total_steps: the run's last step (of the progress line).
      writer: has write(step, scalars) (metrics.MetricWriter).
      log_every_steps: a line every that many steps (and at the first step,
        and when `due` is forced).
      start_step: the step the run starts from (a resumed run's checkpoint).
      echo: print the progress line (process 0 of several does).
    """
    self.total_steps = total_steps
    self.writer = writer
    self.log_every_steps = log_every_steps
    self.echo = echo
    self.last: dict[str, float] = {"step": start_step}  # The last line's scalars.
    self._metrics: list = []
    self._data_wait = 0.0
    self._start = time.perf_counter()
    self._first = True

  def add(self, step_metrics: Any, data_wait: float) -> None:
    """Adds a step: its metrics (device arrays are fine) and its batch wait, s."""
    self._metrics.append(step_metrics)
    self._data_wait += data_wait

  def due(self, step: int, force: bool = False) -> bool:
    """Whether `step` gets a line: every log_every_steps, forced, or the first."""
    return step % self.log_every_steps == 0 or force or self._first

  def log(self, step: int, summarize: Callable[[Window], dict[str, float]]) -> dict[str, float]:
    """Writes and prints the line of the steps added since the last one.

    Args:
      step: the last step added.
      summarize: the window -> the scalars to write (it may raise, e.g. on a
        non-finite loss, before anything is written).

    Returns:
      {"step": step, **scalars}, also kept as `last`.
    """
    host = jax.device_get(self._metrics)
    window = Window(step, host, time.perf_counter() - self._start, self._data_wait, self._first)
    scalars = summarize(window)
    self.writer.write(step, scalars)
    if self.echo:
      print(progress_lib.progress_line(step, self.total_steps, scalars,
                                       window.seconds_per_step, eta=not window.first),
            flush=True)
    self.last = {"step": step, **scalars}
    self._metrics, self._data_wait, self._first = [], 0.0, False
    # After the writing and printing: their time is in no step's.
    self._start = time.perf_counter()
    return self.last

  def clear(self) -> None:
    """Drops the metrics not yet logged (their device buffers)."""
    self._metrics = []
