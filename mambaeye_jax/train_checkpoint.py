"""The trainer's checkpoints: writing, restoring, resuming, exporting.

Orbax checkpoints of the state and of the data iterator under
WORKDIR/checkpoints (the layout is `work_dir`'s); `check_resumable` refuses
a work directory of another model; `export_model` writes the final model
directory.
"""

from __future__ import annotations

import logging
import os
import tempfile

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from mambaeye_jax import model as model_lib
from mambaeye_jax import model_dir
from mambaeye_jax import sharding as sharding_lib
from mambaeye_jax import work_dir

from mambaeye_jax import train_step


class CheckpointWriteError(OSError):
  """A checkpoint cannot be written; the message names the directory and why."""


def check_checkpoint_dir(workdir: str) -> None:
  """Fails at the start, not at the first save, when checkpoints cannot be written.

  Raises:
    CheckpointWriteError: WORKDIR/checkpoints cannot be created (a regular
      file is in the way, no permission) or a file cannot be written there.
  """
  directory = os.path.join(workdir, work_dir.CHECKPOINT_DIR)
  if model_dir.is_url(directory):
    _check_remote_checkpoint_dir(directory)
    return
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as e:
    what = "is a file, not a directory" if os.path.isfile(directory) else e.strerror or str(e)
    raise CheckpointWriteError(f"cannot create the checkpoint directory {directory}: "
                               f"{what}") from e
  try:
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".write_test"):
      pass
  except OSError as e:
    raise CheckpointWriteError(f"cannot write in the checkpoint directory {directory}: "
                               f"{e.strerror or e}") from e


def _check_remote_checkpoint_dir(directory: str) -> None:
  """check_checkpoint_dir for a bucket (gs://...): epath instead of tempfile."""
  # One name per process: every process checks, and one's unlink must not
  # race another's write.
  probe = epath.Path(directory, f".write_test_process{jax.process_index()}")
  try:
    epath.Path(directory).mkdir(parents=True, exist_ok=True)
    probe.write_text("")
    probe.unlink(missing_ok=True)
  # gcsfs and google-auth raise their own types (HttpError, RefreshError...);
  # ImportError when gcsfs, which epath needs for gs://, is missing.
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointWriteError(f"cannot write in the checkpoint directory {directory}: "
                               f"{type(e).__name__}: {e}") from e


def save(manager: ocp.CheckpointManager, step: int, state: train_step.TrainState,
          iterator) -> None:
  """Starts an asynchronous save; raises CheckpointWriteError when it cannot."""
  train = {k: state[k] for k in ("opt_state", "step", "rng")}
  try:
    manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state["params"]),
        train=ocp.args.StandardSave(train),
        data=grain.checkpoint.CheckpointSave(iterator)), force=True)
  except OSError as e:
    raise CheckpointWriteError(f"cannot write checkpoint {step} in {manager.directory}: "
                               f"{e}") from e


def wait_for_saves(manager: ocp.CheckpointManager) -> None:
  """Waits for the asynchronous saves; their errors become CheckpointWriteError."""
  try:
    manager.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointWriteError(f"writing a checkpoint in {manager.directory} failed: "
                               f"{type(e).__name__}: {e}") from e


class _DataStateError(ValueError):
  """A checkpoint's data iterator state does not fit this config's pipeline."""


def _restore(manager: ocp.CheckpointManager, step: int, abstract: train_step.TrainState,
             iterator) -> train_step.TrainState:
  """Restores state (resharded onto `abstract`'s shardings) and the iterator."""
  train_abstract = {k: abstract[k] for k in ("opt_state", "step", "rng")}
  restored = manager.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(abstract["params"]),
      train=ocp.args.StandardRestore(train_abstract)))
  data_dir = os.path.join(manager.directory, str(step), "data")
  name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
  if epath.Path(data_dir, name).exists():
    try:
      manager.restore(step, args=ocp.args.Composite(
          data=grain.checkpoint.CheckpointRestore(iterator)))
    except (ValueError, KeyError, TypeError) as e:
      raise _DataStateError(
          f"cannot restore the data iterator's position from checkpoint {step} in "
          f"{manager.directory} ({type(e).__name__}: {e}); it was saved with other data "
          "settings (data.worker_count and the data source are part of the stream): resume "
          "with the stored data settings (see "
          f"{os.path.join(os.path.dirname(manager.directory), work_dir.TRAIN_CONFIG_FILE)}); the "
          "workdir was left unchanged") from e
  else:
    # Another process count wrote this checkpoint: the model resumes, the
    # data order starts afresh (seeded, so still reproducible).
    logging.warning("checkpoint %d has no data state for %s; the data iterator starts "
                    "from its beginning", step, name)
  return {"params": restored["params"], **restored["train"]}


def export_model(directory: str, model_config: model_lib.ModelConfig, params) -> None:
  """Writes a model directory (model_dir.save_params), replacing an old one.

  Collective: every process calls it; process 0 writes.
  """
  host_params = sharding_lib.to_host(params)
  directory = model_dir.absolute(directory)
  if jax.process_index() == 0:
    tmp = directory + ".tmp"
    if epath.Path(tmp).exists():
      epath.Path(tmp).rmtree()
    model_dir.save_params(tmp, model_config, host_params,
                          this_process_only=jax.process_count() > 1)
    if epath.Path(directory).exists():
      epath.Path(directory).rmtree()
    # On a bucket this copies the objects: no atomic rename there, but the
    # model is small and an interrupted export is redone by the next run.
    epath.Path(tmp).rename(directory)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("mambaeye_export_model")


_SHAPE_NEUTRAL_MODEL_FIELDS = ("dtype", "ssd_impl", "remat", "chunk_size")


def check_resumable(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Refuses to resume a workdir whose checkpoints hold another model.

  Compares the model fields of WORKDIR/train_config.json with the config's
  (dtype, ssd_impl, remat and chunk_size may change: they keep the
  parameters' shapes). Nothing is written, so the workdir stays usable.

  Raises:
    ValueError: naming each differing field, its stored and its new value.
  """
  path = os.path.join(workdir, work_dir.TRAIN_CONFIG_FILE)
  if not epath.Path(path).is_file() or not work_dir.checkpoint_steps(workdir):
    return
  try:
    stored = dict(work_dir.read_train_config(workdir).model)
  except (ValueError, KeyError, AttributeError) as e:
    raise ValueError(f"cannot read {path} to check the resumed model: {e}") from e
  new = dict(config.model)
  differ = [f"model.{k} {stored.get(k)!r} -> {new.get(k)!r}"
            for k in sorted(set(stored) | set(new))
            if k not in _SHAPE_NEUTRAL_MODEL_FIELDS and stored.get(k) != new.get(k)]
  if differ:
    raise ValueError(
        f"{workdir} holds checkpoints of another model ({'; '.join(differ)}; stored in "
        f"{path}): resume with the stored model settings, or train in a new --workdir; "
        "the workdir was left unchanged")


def restore_or_explain(manager: ocp.CheckpointManager, step: int,
                        abstract: train_step.TrainState, iterator,
                        workdir: str) -> train_step.TrainState:
  """_restore, with a failure that says which checkpoint and what to do."""
  try:
    return _restore(manager, step, abstract, iterator)
  except _DataStateError:
    raise
  except (ValueError, KeyError, TypeError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(
        f"cannot resume from checkpoint {step} in {manager.directory} ({first}); it was "
        f"probably written with another model or optimizer config (see "
        f"{os.path.join(workdir, work_dir.TRAIN_CONFIG_FILE)}): use a new --workdir or the same "
        "config; the workdir was left unchanged") from e
