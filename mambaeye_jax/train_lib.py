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
(checkpoints, resuming, export), `train_loop` (the loop's pieces: stop
signals and their multi-host agreement, the non-finite check, the log line,
the checkpoint cadence); this module is the loop itself.

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

import functools
import logging
import os
import time
from typing import Callable

import jax
import ml_collections
from etils import epath

from mambaeye_jax import metrics as metrics_lib
from mambaeye_jax import model_dir
from mambaeye_jax import optim
from mambaeye_jax import sharding as sharding_lib
from mambaeye_jax import work_dir
from mambaeye_jax.data import pipeline

from mambaeye_jax import train_checkpoint
from mambaeye_jax import train_config
from mambaeye_jax import train_data
from mambaeye_jax import train_loop
from mambaeye_jax import train_step

# The config API that configs/*.py, train.py and the docs use from here.
default_config = train_config.default_config
model_config_dict = train_config.model_config_dict
data_config_dict = train_config.data_config_dict
config_fields = train_config.config_fields
validate_config = train_config.validate_config
unknown_field_message = train_config.unknown_field_message


# The errors callers catch, raised by the loop's non-finite check.
NonFiniteLossError = train_loop.NonFiniteLossError
NonFiniteStateError = train_loop.NonFiniteStateError


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
                                 packed=bool(config.data.packing), loss=config.loss,
                                 render=train_data.device_renderer(config)),
      state_shardings, mesh)
  writer = metrics_lib.MetricWriter(workdir, enabled=is_chief)
  logger = train_loop.TrainLogger(total_steps, writer, config.log_every_steps,
                                  start_step=step, echo=is_chief)
  checks = train_loop.FiniteCheck(workdir)
  summarize = functools.partial(_window_scalars, accuracy_at=accuracy_at, batches=batches)
  local = batch = None

  try:
    with train_loop.StopSignals() as stop, writer:
      while step < total_steps:
        t0 = time.perf_counter()
        got = train_loop.next_batch(batches, stop, step)
        if got is None:  # The data workers died of the stop signal.
          checks.flush(last_checkpoint)
          if last_checkpoint != step:
            train_checkpoint.save(manager, step, state, batches)
            last_checkpoint = step
          break
        local, batch = got
        data_wait = time.perf_counter() - t0
        train_data.check_labels(local, model_config.num_classes, step + 1)
        state, step_out = p_step(state, batch)
        step += 1
        # Checks the previous step's loss while this one runs on the device.
        checks.push(step, step_out, local, last_checkpoint)
        logger.add(step_out, data_wait)
        if step_hook is not None:
          step_hook(step)

        stopping = train_loop.should_stop(stop.requested, step, config.sync_stop_every_steps,
                                          manager.reached_preemption)
        done = step >= total_steps
        if logger.due(step, force=done or stopping):
          checks.flush(last_checkpoint)  # Never log a non-finite step as fine.
          logger.log(step, summarize)
        if train_loop.checkpoint_due(step, config.checkpoint_every_steps, done=done,
                                     stopping=stopping):
          checks.flush(last_checkpoint)  # Never checkpoint a non-finite state.
          train_checkpoint.save(manager, step, state, batches)
          last_checkpoint = step
        if stopping:
          logging.warning("stopped at step %d; checkpoint saved", step)
          break
      checks.flush(last_checkpoint)
    train_checkpoint.wait_for_saves(manager)
    finished = step >= total_steps
    # A finished run re-run exports again only if its model is missing.
    if (finished and config.export_model
        and not (already_done and epath.Path(export_dir).is_dir())):
      train_checkpoint.export_model(export_dir, model_config, state["params"])
    if finished and is_chief:
      print(finished_message(workdir, step, config, already=already_done), flush=True)
  finally:
    # The last batches' shared memory.
    local = batch = None
    checks.clear()
    logger.clear()
    try:
      train_checkpoint.wait_for_saves(manager)
    finally:
      manager.close()
      batches.close()
  return logger.last


def _window_scalars(window: train_loop.Window, accuracy_at: tuple[int, ...],
                    batches) -> dict[str, float]:
  """The scalars of one log line: train/*, perf/*, data/*.

  Args:
    window: the steps since the last line (their host metrics, seconds).
    accuracy_at: the glimpse counts of train/accuracy_at_<k>.
    batches: the pipeline, for its skip counters (collective with several
      processes: every process logs at the same steps).

  Returns:
    train_step.summarize's scalars, then perf/step_time_ms (ms per step),
    perf/images_per_sec, perf/tokens_per_sec, perf/data_wait_ms (ms per
    step), perf/data_wait_fraction (of the wall time), perf/batch_read_ms,
    perf/batch_put_ms and perf/batch_not_ready_fraction
    (BatchPrefetcher.take_timings), data/num_skipped, and
    on the first line perf/first_step_sec (s, compilation included).
  """
  host, elapsed, data_wait = window.metrics, window.seconds, window.data_wait
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
  scalars.update(batches.take_timings())
  if window.first:
    scalars["perf/first_step_sec"] = elapsed  # compilation included.
  return scalars


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
