"""The MambaEye training loop: data-parallel, checkpointed, resumable.

`train_and_evaluate(config, workdir)` trains from an ml_collections config
(see `default_config` and configs/*.py) and leaves in `workdir`:

    train_config.json   the whole config (restore_model reads "model" there)
    checkpoints/<step>/ orbax: params, train (opt_state, step, rng), data
                        (the data iterator's state, one file per process)
    metrics.jsonl, tb/  training metrics (see mambaeye_jax.metrics)
    model/              the final parameters as a model directory
                        (model_dir.save_params; what eval.py loads)
    nan_batch_step<N>_process<i>.npz   only if a loss went non-finite

Dimension letters: b global batch, b_local this process's rows, T glimpses,
K classes.

The parts: `train_config` (schema, defaults, checks), `train_data`
(batches, prefetching), `train_step` (state and step), `train_checkpoint`
(checkpoints, resuming, export); this module is the loop.

Parallelism: one "data" mesh axis over every device of every process
(mambaeye_jax.sharding). The state is built sharded from its abstract shape
(`jax.eval_shape`, then `jax.jit(init, out_shardings=...)`), and the step is
one `jax.jit` over the NNX functional API (`nnx.split` once, `nnx.merge`
inside the step) with the state donated.

Interruption: SIGTERM or Ctrl-C (SIGINT) asks the loop to stop; it finishes
the step in flight, saves a checkpoint and returns. A second Ctrl-C aborts at
once. A later call with the same workdir resumes from the latest checkpoint,
data iterator included, and continues the same loss curve.
"""

from __future__ import annotations

import io
import logging
import math
import os
import signal
import time
from typing import Callable

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from mambaeye_jax import metrics as metrics_lib
from mambaeye_jax import model_dir
from mambaeye_jax import optim
from mambaeye_jax import progress as progress_lib
from mambaeye_jax import sharding as sharding_lib
from mambaeye_jax import work_dir
from mambaeye_jax.data import pipeline

from mambaeye_jax import train_checkpoint
from mambaeye_jax import train_config
from mambaeye_jax import train_data
from mambaeye_jax import train_step

# The config API that configs/*.py, train.py and the docs use from here.
default_config = train_config.default_config
model_config_dict = train_config.model_config_dict
data_config_dict = train_config.data_config_dict
config_fields = train_config.config_fields
validate_config = train_config.validate_config
unknown_field_message = train_config.unknown_field_message


class _StopRequest:
  """Turns SIGTERM / SIGINT into a flag the loop polls (main thread only)."""

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


class NonFiniteLossError(FloatingPointError):
  """The loss went NaN or infinite; the message names the step and the batch file."""


class NonFiniteStateError(NonFiniteLossError):
  """The parameters or optimizer state went NaN or infinite (the loss did not)."""


def _check_finite(step: int, metrics: dict, local_batch: dict, workdir: str,
                  last_checkpoint: int | None) -> None:
  """Raises before a non-finite loss or state can be logged as fine or saved."""
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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       step_hook: Callable[[int], None] | None = None) -> dict[str, float]:
  """Trains (or resumes) and returns the last logged metrics.

  See `_train_and_evaluate` for the arguments, the result and the errors.
  """
  try:
    return _train_and_evaluate(config, workdir, step_hook=step_hook)
  finally:
    pipeline.release_shared_memory()


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                        step_hook: Callable[[int], None] | None = None) -> dict[str, float]:
  """Trains (or resumes) and returns the last logged metrics.

  Args:
    config: a training config (see `default_config`).
    workdir: output directory (see the module docstring); reused to resume.
    step_hook: called with each completed step number (tests interrupt runs
      with it).

  Returns:
    The scalars of the last log line (train/*, perf/*), plus "step".

  Raises:
    ValueError: a bad config, a source with more classes than the model, or
      a workdir whose checkpoints belong to another model; raised before
      anything is written to the workdir.
    NonFiniteLossError: when the loss goes NaN or infinite
      (NonFiniteStateError: the parameters or optimizer state do).
    train_checkpoint.CheckpointWriteError: a checkpoint cannot be written.
    sources.TooManyBadRecordsError: the data is mostly unreadable.
  """
  # Everything that can be checked is, before anything is written.
  train_config.validate_config(config)
  workdir = model_dir.absolute(workdir)  # A bucket's gs://... stays as it is.
  model_config = work_dir.model_config_from(config)
  train_checkpoint.check_resumable(workdir, config)
  source = train_data.make_source(config)
  train_data.check_num_classes(source, model_config)
  mesh = sharding_lib.make_mesh(None if config.num_devices < 0 else config.num_devices)
  local_bs = sharding_lib.local_batch_size(config.global_batch_size, mesh)
  num_examples = train_data.num_train_examples(config, source)
  ocfg = train_config.optim_config_from(config, num_examples)
  total_steps = ocfg.total_steps
  tx = optim.make_optimizer(ocfg)
  schedule = optim.learning_rate_schedule(ocfg)
  accuracy_at = tuple(int(k) for k in config.accuracy_at)
  is_chief = jax.process_index() == 0
  train_checkpoint.check_checkpoint_dir(workdir)
  logging.info("MambaEye %s, %d devices on %d processes, global batch %d, %d steps",
               model_config, mesh.size, jax.process_count(), config.global_batch_size,
               total_steps)

  iterator = train_data.make_train_iterator(config, local_bs, model_config, source=source)
  manager = None
  try:
    state, state_shardings, abstract = train_step.create_train_state(
        model_config, tx, config.seed, mesh)
    manager = work_dir.checkpoint_manager(workdir, config)
    start = manager.latest_step()
    if start is not None:
      logging.info("resuming from checkpoint step %d", start)
      del state  # Free it before the restored copy arrives.
      state = train_checkpoint.restore_or_explain(manager, start, abstract, iterator, workdir)
    # Written once the run is known to start or resume: a failed resume
    # leaves the workdir's record of its model as it was.
    work_dir.write_train_config(workdir, config)
    batches = train_data.BatchPrefetcher(iterator, mesh, config.prefetch_to_device)
  except BaseException:
    train_data.close_quietly(iterator)
    if manager is not None:
      manager.close()
    raise
  step = int(start or 0)
  last_checkpoint = start
  export_dir = os.path.join(workdir, work_dir.MODEL_DIR)
  already_done = step >= total_steps
  graphdef = train_step.model_graphdef(model_config)
  p_step = train_step.compile_train_step(
      train_step.make_train_step(graphdef, tx, schedule, accuracy_at,
                                 packed=bool(config.data.packing), loss=config.loss),
      state_shardings, mesh)
  writer = metrics_lib.MetricWriter(workdir, enabled=is_chief)
  last_logged: dict[str, float] = {"step": step}
  window: list = []  # device metrics of the steps since the last log.
  pending = None  # (step, device metrics, host batch) not yet checked for NaN.
  data_wait = 0.0
  window_start = time.perf_counter()
  first_window = True  # Its time includes compilation: logged at step start + 1.

  def check_pending():
    nonlocal pending
    if pending is not None:
      s, m, local = pending
      pending = None
      _check_finite(s, m, local, workdir, last_checkpoint)

  try:
    with _StopRequest() as stop, writer:
      while step < total_steps:
        t0 = time.perf_counter()
        try:
          local, batch = next(batches)
        except Exception:  # pylint: disable=broad-except
          if not (stop.requested and jax.process_count() == 1):
            raise
          # A terminal's Ctrl-C and `timeout` signal the whole process group,
          # so the data workers may die of the same signal while the loop
          # waits for them: the batch in flight is lost, not the run. (With
          # several processes the others would wait in the save: raise.)
          logging.warning("the data pipeline stopped after the stop signal; saving step %d",
                          step)
          check_pending()
          if last_checkpoint != step:
            train_checkpoint.save(manager, step, state, batches)
            last_checkpoint = step
          break
        data_wait += time.perf_counter() - t0
        train_data.check_labels(local, model_config.num_classes, step + 1)
        state, step_out = p_step(state, batch)
        step += 1
        # Check the previous step's loss while this one runs on the device.
        check_pending()
        pending = (step, step_out, local)
        window.append(step_out)
        if step_hook is not None:
          step_hook(step)

        stopping = stop.requested
        if jax.process_count() > 1 and step % config.sync_stop_every_steps == 0:
          stopping = bool(multihost_utils.process_allgather(np.int32(stopping)).max())
        elif jax.process_count() > 1:
          stopping = False  # Every host must stop at the same step.
        stopping = stopping or manager.reached_preemption(step)
        done = step >= total_steps

        if step % config.log_every_steps == 0 or done or stopping or first_window:
          check_pending()
          host = jax.device_get(window)
          elapsed = time.perf_counter() - window_start
          scalars = train_step.summarize(host, accuracy_at)
          n = len(host)
          images = float(sum(m["count_last"] for m in host))
          tokens = float(sum(m["tokens"] for m in host))
          scalars.update({
              "perf/step_time_ms": 1000.0 * elapsed / n,
              "perf/images_per_sec": images / elapsed,
              "perf/tokens_per_sec": tokens / elapsed,
              "perf/data_wait_ms": 1000.0 * data_wait / n,
              "perf/data_wait_fraction": data_wait / elapsed,
          })
          scalars.update(train_data.pipeline_stats(batches))
          if first_window:
            scalars["perf/first_step_sec"] = elapsed  # compilation included.
          writer.write(step, scalars)
          if is_chief:
            print(progress_lib.progress_line(step, total_steps, scalars, elapsed / n,
                                            eta=not first_window), flush=True)
          first_window = False
          last_logged = {"step": step, **scalars}
          window, data_wait = [], 0.0
          window_start = time.perf_counter()

        if step % config.checkpoint_every_steps == 0 or done or stopping:
          check_pending()  # Never checkpoint a non-finite state.
          train_checkpoint.save(manager, step, state, batches)
          last_checkpoint = step
        if stopping:
          logging.warning("stopped at step %d; checkpoint saved", step)
          break
      check_pending()
    train_checkpoint.wait_for_saves(manager)
    finished = step >= total_steps
    # A finished run re-run exports again only if its model is missing.
    if (finished and config.export_model
        and not (already_done and epath.Path(export_dir).is_dir())):
      train_checkpoint.export_model(export_dir, model_config, state["params"])
    if finished and is_chief:
      print(finished_message(workdir, step, config, already=already_done), flush=True)
  finally:
    local = batch = pending = window = None  # The last batches' shared memory.
    try:
      train_checkpoint.wait_for_saves(manager)
    finally:
      manager.close()
      batches.close()
  return last_logged


def finished_message(workdir: str, step: int, config: ml_collections.ConfigDict,
                     already: bool = False) -> str:
  """Where a finished run's model is and what to run next."""
  export_dir = os.path.join(workdir, work_dir.MODEL_DIR)
  data = "IMAGE_FOLDER"
  if config.data.source == "synthetic":
    data = "IMAGE_FOLDER (a root/<class>/<image> folder)"
  lines = [f"training {'had already ' if already else ''}finished at step {step} (checkpoints in "
           f"{os.path.join(workdir, work_dir.CHECKPOINT_DIR)})"]
  if config.export_model and epath.Path(export_dir).is_dir():
    lines.append(f"the model is in {export_dir}")
    lines.append(f"evaluate it with: python eval.py --checkpoint {export_dir} --data {data}")
  else:
    lines.append(f"evaluate it with: python eval.py --workdir {workdir} --data {data}")
  return "\n".join(lines)
