"""The training work directory's layout, read by the trainer and by loaders.

    train_config.json   the whole training config ("model": the ModelConfig)
    checkpoints/<step>/ orbax: params, train (opt_state, step, rng), data
    model/              the final parameters as a model directory (model_dir)

`mambaeye_jax.train_lib` writes a work directory; `restore_model` reads the
model of one of its checkpoints (what `load_model` and eval.py do).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from mambaeye_jax import model as model_lib
from mambaeye_jax import model_dir

TRAIN_CONFIG_FILE = "train_config.json"
CHECKPOINT_DIR = "checkpoints"
MODEL_DIR = "model"


def model_config_from(config: ml_collections.ConfigDict) -> model_lib.ModelConfig:
  """The ModelConfig of config.model (errors name the bad field)."""
  return model_dir.config_from_dict(dict(config.model), "config.model")


def write_train_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  if jax.process_index() != 0:
    return
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  with epath.Path(workdir, TRAIN_CONFIG_FILE).open("w") as f:
    f.write(config.to_json_best_effort(indent=2))


def read_train_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, TRAIN_CONFIG_FILE)
  if not epath.Path(path).exists():
    raise FileNotFoundError(f"{workdir} is not a training workdir (no {TRAIN_CONFIG_FILE})")
  with epath.Path(path).open() as f:
    return ml_collections.ConfigDict(json.load(f))


def checkpoint_steps(workdir: str) -> list[int]:
  directory = epath.Path(workdir, CHECKPOINT_DIR)
  if not directory.is_dir():
    return []
  return sorted(int(d.name) for d in directory.iterdir() if d.name.isdigit())


def checkpoint_manager(workdir: str, config: ml_collections.ConfigDict | None = None,
                       read_only: bool = False) -> ocp.CheckpointManager:
  """Orbax manager of WORKDIR/checkpoints (asynchronous saves)."""
  keep = config.keep_checkpoints if config is not None else None
  directory = os.path.join(model_dir.absolute(workdir), CHECKPOINT_DIR)
  # Readers open it read-only on purpose: orbax's two warnings about that
  # (from the options and from the manager) are noise.
  quiet = _DropMessage(("Given directory is read only",
                        "CheckpointManagerOptions.read_only=True"))
  if read_only:
    logging.getLogger("absl").addFilter(quiet)
  try:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=not read_only, read_only=read_only,
        enable_async_checkpointing=True,
        # Synchronous step directories: a directory that cannot be created
        # raises in save(), on the loop's thread. Created in the background,
        # the error stays in orbax's thread and the next save waits 20
        # minutes for it.
        async_options=ocp.AsyncOptions(create_directories_asynchronously=False))
    return ocp.CheckpointManager(directory, options=options)
  finally:
    logging.getLogger("absl").removeFilter(quiet)


class _DropMessage(logging.Filter):
  """Drops log records whose message starts with one of the given texts."""

  def __init__(self, prefixes: tuple[str, ...]):
    super().__init__()
    self._prefix = prefixes  # str.startswith takes a tuple.

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(self._prefix)


def restore_model(workdir: str, step: int | None = None, **overrides) -> model_lib.MambaEye:
  """The model of a training workdir's checkpoint, for evaluation.

  Args:
    workdir: a directory `train_and_evaluate` wrote.
    step: checkpoint step; the latest when None.
    **overrides: ModelConfig fields that keep parameter shapes (dtype,
      ssd_impl, remat, chunk_size).

  Returns:
    A MambaEye with the checkpoint's parameters on the default device.
  """
  config = model_config_from(read_train_config(workdir))
  config = dataclasses.replace(config, **overrides)
  manager = checkpoint_manager(workdir, read_only=True)
  try:
    if step is None:
      step = manager.latest_step()
      if step is None:
        raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    if step not in manager.all_steps():
      raise FileNotFoundError(f"no checkpoint of step {step} in {manager.directory}; "
                              f"steps: {sorted(manager.all_steps())}")
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    expected = nnx.to_pure_dict(nnx.state(model_dir.abstract_model(config), nnx.Param))
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          expected)
    restored = manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(target)))
  finally:
    manager.close()
  return model_dir.model_from_params(config, restored["params"], source=f"{workdir}@{step}")
