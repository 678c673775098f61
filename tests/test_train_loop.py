"""The training loop's pieces alone (mambaeye_jax.train_loop): no model, no device work."""

import math
import os
import signal

import numpy as np
import pytest

from mambaeye_jax import train_loop


# ----------------------------------------------------------------------------
# Stopping.


class _Preemption:
  """reached_preemption stand-in: records the steps it was asked about."""

  def __init__(self, answer: bool = False):
    self.answer, self.asked = answer, []

  def __call__(self, step):
    self.asked.append(step)
    return self.answer


def test_one_process_stops_at_once_when_asked():
  preemption = _Preemption()
  assert train_loop.should_stop(True, 7, 10, preemption, process_count=1)
  assert not train_loop.should_stop(False, 7, 10, preemption, process_count=1)
  # Asked first: preemption is not consulted when the run stops anyway.
  assert preemption.asked == [7]


def test_a_preemption_notice_stops_every_process_at_any_step():
  assert train_loop.should_stop(False, 3, 10, _Preemption(True), process_count=1)
  assert train_loop.should_stop(False, 3, 10, _Preemption(True), process_count=2)


def test_several_processes_stop_only_at_a_sync_step_and_agree(monkeypatch):
  gathered = []

  def allgather(x):  # Process 1 asked to stop; this one (process 0) did not.
    gathered.append(int(x))
    return np.array([int(x), 1], np.int32)

  monkeypatch.setattr(train_loop.multihost_utils, "process_allgather", allgather)
  # Between sync steps a request waits (no collective: hosts may be at
  # different points of the step).
  assert not train_loop.should_stop(True, 9, 10, _Preemption(), process_count=2)
  assert gathered == []
  # At a sync step, another process's request stops this one too.
  assert train_loop.should_stop(False, 10, 10, _Preemption(), process_count=2)
  assert gathered == [0]


def test_several_processes_go_on_when_nobody_asked(monkeypatch):
  monkeypatch.setattr(train_loop.multihost_utils, "process_allgather",
                      lambda x: np.array([int(x), 0], np.int32))
  assert not train_loop.should_stop(False, 20, 10, _Preemption(), process_count=2)


def test_stop_signals_set_the_flag_and_a_second_ctrl_c_aborts():
  before = signal.getsignal(signal.SIGINT)
  with train_loop.StopSignals() as stop:
    assert not stop.requested
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.requested
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  assert signal.getsignal(signal.SIGINT) is before  # Handlers restored.


class _Dying:
  def __next__(self):
    raise RuntimeError("Worker process was terminated unexpectedly with exit code -15.")


def test_data_dying_of_the_stop_signal_is_a_stop_on_one_process():
  stop = train_loop.StopSignals()
  assert train_loop.next_batch(iter([1, 2]), stop, 0, process_count=1) == 1
  with pytest.raises(RuntimeError, match="terminated"):  # Not asked to stop: an error.
    train_loop.next_batch(_Dying(), stop, 3, process_count=1)
  stop.requested = True
  assert train_loop.next_batch(_Dying(), stop, 3, process_count=1) is None
  # Several processes: the others would wait in the save; raise instead.
  with pytest.raises(RuntimeError, match="terminated"):
    train_loop.next_batch(_Dying(), stop, 3, process_count=2)


@pytest.mark.parametrize("step, done, stopping, want", [
    (3, False, False, True), (6, False, False, True), (4, False, False, False),
    (4, True, False, True), (5, False, True, True)])
def test_checkpoint_cadence(step, done, stopping, want):
  assert train_loop.checkpoint_due(step, 3, done=done, stopping=stopping) is want


# ----------------------------------------------------------------------------
# Non-finite values.


def test_finite_check_is_one_step_late_and_names_the_last_checkpoint(tmp_path):
  checks = train_loop.FiniteCheck(str(tmp_path))
  checks.push(1, {"loss": 2.3}, {"x": np.zeros(2)}, None)
  checks.push(2, {"loss": math.nan}, {"x": np.arange(2)}, None)  # Checks step 1 only.
  with pytest.raises(train_loop.NonFiniteLossError,
                     match=r"nan at step 2; .*last checkpoint is step 1 in"):
    checks.push(3, {"loss": 2.0}, {"x": np.zeros(2)}, 1)
  np.testing.assert_array_equal(np.load(tmp_path / "nan_batch_step2_process0.npz")["x"],
                                np.arange(2))
  checks.flush(1)  # Step 2 was consumed by the raise; step 3 is fine.


def test_finite_check_flush_raises_and_clear_forgets(tmp_path):
  checks = train_loop.FiniteCheck(str(tmp_path))
  checks.push(4, {"loss": math.inf}, {"x": np.zeros(1)}, None)
  with pytest.raises(train_loop.NonFiniteLossError, match="no checkpoint was written"):
    checks.flush(None)
  checks.push(5, {"loss": math.inf}, {"x": np.zeros(1)}, None)
  checks.clear()
  checks.flush(None)  # Nothing pending.


def test_a_non_finite_state_behind_a_finite_loss_is_its_own_error(tmp_path):
  with pytest.raises(train_loop.NonFiniteStateError,
                     match=r"update of step 3 made 2 parameter .*learning rate 0\.5"):
    train_loop.check_finite(3, {"loss": 1.0, "nonfinite_state": 2, "learning_rate": 0.5},
                            {"x": np.zeros(1)}, str(tmp_path), None)
  train_loop.check_finite(3, {"loss": 1.0, "nonfinite_state": 0}, {}, str(tmp_path), None)
  assert os.listdir(tmp_path) == ["nan_batch_step3_process0.npz"]


# ----------------------------------------------------------------------------
# Logging.


class _Writer:
  def __init__(self):
    self.lines = []

  def write(self, step, scalars):
    self.lines.append((step, dict(scalars)))


def _scalars(window):
  return {"train/loss": float(np.mean([m["loss"] for m in window.metrics])),
          "perf/images_per_sec": 10.0,
          "perf/data_wait_fraction": window.data_wait / window.seconds}


def test_logger_cadence_first_step_then_every_n_and_forced():
  logger = train_loop.TrainLogger(10, _Writer(), 4, start_step=2, echo=False)
  assert logger.last == {"step": 2}
  assert logger.due(3)  # The first line of a (resumed) run, whatever the step.
  logger.add({"loss": 1.0}, 0.0)
  logger.log(3, _scalars)
  assert [logger.due(s) for s in (4, 5, 6, 7, 8)] == [True, False, False, False, True]
  assert logger.due(5, force=True)


def test_logger_writes_the_window_and_prints_the_progress_line(capsys, monkeypatch):
  clock = iter([100.0, 104.0, 104.5, 106.5, 107.0])
  monkeypatch.setattr(train_loop.time, "perf_counter", lambda: next(clock))
  writer = _Writer()
  logger = train_loop.TrainLogger(6, writer, 2)  # Clock 100: the first window starts.
  logger.add({"loss": 3.0}, 0.5)
  seen = []
  first = logger.log(1, lambda w: seen.append(w) or _scalars(w))  # Clock 104.
  assert first == {"step": 1, "train/loss": 3.0, "perf/images_per_sec": 10.0,
                   "perf/data_wait_fraction": 0.125}
  assert seen[0].first and seen[0].seconds == 4.0 and seen[0].step == 1
  for loss in (2.0, 4.0):
    logger.add({"loss": loss}, 0.25)
  logger.log(3, _scalars)  # Clock 106.5, from 104.5: 2 s for 2 steps.
  assert writer.lines == [(1, {k: v for k, v in first.items() if k != "step"}),
                          (3, {"train/loss": 3.0, "perf/images_per_sec": 10.0,
                               "perf/data_wait_fraction": 0.25})]
  assert logger.last["step"] == 3
  assert capsys.readouterr().out.splitlines() == [
      "step 1/6 (16.7%) | loss 3.0000 | 10 img/s | 4000.0 ms/step | data wait 12% | ETA ?",
      "step 3/6 (50.0%) | loss 3.0000 | 10 img/s | 1000.0 ms/step | data wait 25% | ETA 3s"]


def test_logger_echo_off_prints_nothing_and_summarize_errors_write_nothing(capsys):
  writer = _Writer()
  logger = train_loop.TrainLogger(4, writer, 1, echo=False)
  logger.add({"loss": 1.0}, 0.0)
  logger.log(1, _scalars)
  assert capsys.readouterr().out == ""

  def bad(window):
    raise FloatingPointError(f"non-finite loss at step {window.step}")

  logger.add({"loss": math.nan}, 0.0)
  with pytest.raises(FloatingPointError, match="at step 2"):
    logger.log(2, bad)
  assert [s for s, _ in writer.lines] == [1]
