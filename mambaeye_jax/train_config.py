"""The training config: its schema, defaults and checks.

`default_config()` is every field with its default (configs/*.py start
from it; train.py's --help lists them), `validate_config` checks a config
before anything starts, and the rest derive what the loop needs from it
(steps, the optimizer's config).
"""

from __future__ import annotations

import dataclasses
import math
import re

import ml_collections

from mambaeye_jax import config_fields as config_fields_lib
from mambaeye_jax import loss as loss_lib
from mambaeye_jax import model as model_lib
from mambaeye_jax import optim
from mambaeye_jax import work_dir
from mambaeye_jax.data import augment
from mambaeye_jax.data import pipeline

from mambaeye_jax import train_data


def model_config_dict(variant: str = "tiny", **overrides) -> ml_collections.ConfigDict:
  """Every ModelConfig field of a named size, as a ConfigDict."""
  return ml_collections.ConfigDict(
      dataclasses.asdict(model_lib.get_config(variant, **overrides)))


_LOOP_DATA_FIELDS = ("batch_size", "seed", "num_epochs")


def data_config_dict(**overrides) -> ml_collections.ConfigDict:
  """The pipeline's DataConfig defaults (less the loop's fields), as a ConfigDict."""
  fields = dataclasses.asdict(pipeline.DataConfig(source="synthetic"))
  for name in _LOOP_DATA_FIELDS:
    del fields[name]
  # Every augmentation field, so `--config.data.augment.<typo>` fails loudly.
  fields["augment"] = {f.name: getattr(augment.AugmentConfig(), f.name)
                       for f in dataclasses.fields(augment.AugmentConfig)
                       if f.name not in ("canvas_min", "canvas_max")}
  unknown = sorted(set(overrides) - set(fields))
  if unknown:
    raise ValueError(f"unknown data config fields {unknown}; known: {sorted(fields)}")
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def default_config() -> ml_collections.ConfigDict:
  """All fields a training config may set, with the official recipe's values.

  Config files (configs/*.py) start from this and change what differs, so a
  misspelt field is an error, never a silently ignored setting.
  """
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = model_config_dict("tiny")

  # The data pipeline's DataConfig fields (mambaeye_jax.data.pipeline), less
  # those the loop sets itself (batch_size: global / processes; seed: the
  # top-level seed; num_epochs: the loop counts steps). source may also be
  # "fake": train_data.FakeBatches below, for tests.
  c.data = data_config_dict()
  # Images per epoch for epoch-based schedules (ImageNet-1K: 1,281,167);
  # 0 = the source's length.
  c.train_examples = 0

  c.global_batch_size = 1024
  c.num_epochs = 300.0
  c.num_train_steps = -1  # > 0 overrides num_epochs.

  c.optim = optim.config_dict(warmup_epochs=20.0)

  c.log_every_steps = 100
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  # The objective: "stepwise" (the paper's), or the ablation's plain
  # cross-entropy, "ce_every_step" or "ce_last_step" (loss.LOSSES).
  c.loss = "stepwise"
  c.accuracy_at = (16, 64, 256)  # glimpse counts reported besides the last.
  c.num_devices = -1  # -1: every device of every process.
  c.sync_stop_every_steps = 10  # multi-process: how often hosts agree to stop.
  c.export_model = True
  # Batches read and placed on the devices ahead of the step, by a background
  # thread (0: read on the loop's thread, between steps).
  c.prefetch_to_device = 2
  return c


def config_fields(config: ml_collections.ConfigDict | None = None) -> dict[str, object]:
  """Every leaf field of a config (default_config() when None) -> its value,
  by dotted name; the CLI lists them and suggests them on a typo."""
  return config_fields_lib.leaf_fields(default_config() if config is None else config)


def unknown_field_message(name: str, known: list[str] | None = None) -> str:
  """"config field 'x' does not exist; did you mean ...?" with the valid names
  (default_config()'s when `known` is None)."""
  known = list(config_fields()) if known is None else known
  return config_fields_lib.unknown_field_message(name, known,
                                                 "train.py --help lists them all")


def _check_range(name: str, value, low=None, high=None, *, low_open: bool = False) -> None:
  """Raises ValueError "name=value must be ..." unless low <= value <= high."""
  if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
    raise ValueError(f"{name}={value!r} must be a finite number")
  if low is not None and (value <= low if low_open else value < low):
    raise ValueError(f"{name}={value} must be {'>' if low_open else '>='} {low}")
  if high is not None and value > high:
    raise ValueError(f"{name}={value} must be <= {high}")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad field, before anything is built.

  Checks every field's name, type and range, so that a run fails at once and
  writes nothing, never after minutes of work or with a silently odd setting.
  """
  known = list(config_fields())
  for name in config_fields(config):
    if name not in known:
      raise ValueError(unknown_field_message(name, known))
  for group in ("model", "data", "optim"):
    want = set(default_config()[group].keys())
    extra = sorted(set(config[group].keys()) - want)
    if extra:
      raise ValueError(unknown_field_message(f"{group}.{extra[0]}", known))
  extra = sorted(set(config.data.augment.keys()) - set(default_config().data.augment.keys()))
  if extra:
    raise ValueError(unknown_field_message(f"data.augment.{extra[0]}", known))
  model = work_dir.model_config_from(config)
  for name in ("depth", "dim", "num_classes", "d_state", "d_conv", "expand", "headdim",
               "ngroups", "chunk_size"):
    _check_range(f"model.{name}", getattr(model, name), 1)
  _check_range("seed", config.seed, 0)
  _check_range("global_batch_size", config.global_batch_size, 1)
  try:
    checked = config
    if config.data.source == "fake":  # The pipeline's fields are checked all the same.
      checked = config.copy_and_resolve_references()
      with checked.unlocked():
        checked.data.source = "synthetic"
    train_data.data_config_from(checked, local_batch_size=1)  # Pipeline checks every field.
  except (TypeError, ValueError) as e:
    message = str(e).removeprefix("self.")
    # "worker_count=-2 must ..." names a field: give its config path.
    prefix = "data." if re.match(r"[\w.]+=", message) else "config.data: "
    raise ValueError(prefix + message) from e
  if config.data.source in ("folder", "arrayrecord") and not config.data.path:
    raise ValueError(f"data.source={config.data.source!r} needs data.path (the "
                     f"{'image folder' if config.data.source == 'folder' else 'shard glob'})")
  if config.data.source == "tfds" and not config.data.tfds_name:
    raise ValueError("data.source='tfds' needs data.tfds_name (e.g. 'cifar10')")
  _check_range("train_examples", config.train_examples, 0)
  _check_range("num_epochs", config.num_epochs)
  _check_range("num_train_steps", config.num_train_steps)
  if config.num_train_steps <= 0 and config.num_epochs <= 0:
    raise ValueError("set num_epochs > 0 or num_train_steps > 0")
  o = config.optim
  _check_range("optim.learning_rate", o.learning_rate, 0)
  _check_range("optim.b1", o.b1, 0, 1)
  _check_range("optim.b2", o.b2, 0, 1)
  _check_range("optim.eps", o.eps, 0)
  _check_range("optim.weight_decay", o.weight_decay, 0)
  _check_range("optim.clip_norm", o.clip_norm)  # <= 0 turns clipping off.
  _check_range("optim.warmup_epochs", o.warmup_epochs, 0)
  _check_range("optim.warmup_steps", o.warmup_steps, -1)
  _check_range("optim.end_lr_ratio", o.end_lr_ratio, 0, 1)
  for name in ("log_every_steps", "checkpoint_every_steps", "sync_stop_every_steps"):
    _check_range(name, config[name], 1)
  # 0 would let orbax delete every checkpoint, the last one included.
  if config.keep_checkpoints is not None:  # None keeps every checkpoint.
    if config.keep_checkpoints < 1:
      raise ValueError(f"keep_checkpoints={config.keep_checkpoints} must be >= 1 (0 would "
                       "delete every checkpoint, the last one included)")
    _check_range("keep_checkpoints", config.keep_checkpoints, 1)
  _check_range("prefetch_to_device", config.prefetch_to_device, 0)
  if config.num_devices != -1:
    _check_range("num_devices", config.num_devices, 1)
  if not all(isinstance(k, int) and k >= 1 for k in config.accuracy_at):
    raise ValueError(f"accuracy_at={tuple(config.accuracy_at)} must be glimpse counts >= 1")
  if config.loss not in loss_lib.LOSSES:
    raise ValueError(f"loss={config.loss!r} must be one of {', '.join(loss_lib.LOSSES)}")
  if not isinstance(config.export_model, bool):
    raise ValueError(f"export_model={config.export_model!r} must be True or False")


def steps_per_epoch(config: ml_collections.ConfigDict, num_examples: int) -> float:
  return num_examples / config.global_batch_size


def total_train_steps(config: ml_collections.ConfigDict, num_examples: int) -> int:
  """num_train_steps if set, else ceil(num_epochs * examples / global batch)."""
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  return max(1, math.ceil(config.num_epochs * steps_per_epoch(config, num_examples)))


def optim_config_from(config: ml_collections.ConfigDict, num_examples: int) -> optim.OptimConfig:
  total = total_train_steps(config, num_examples)
  if config.optim.warmup_steps >= 0:
    warmup = int(config.optim.warmup_steps)
  else:
    warmup = int(round(config.optim.warmup_epochs * steps_per_epoch(config, num_examples)))
  o = config.optim
  return optim.OptimConfig(
      learning_rate=o.learning_rate, b1=o.b1, b2=o.b2, eps=o.eps,
      weight_decay=o.weight_decay, clip_norm=o.clip_norm,
      warmup_steps=min(warmup, total), total_steps=total, end_lr_ratio=o.end_lr_ratio,
      decay=o.decay)
