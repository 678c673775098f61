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

import dataclasses
import functools
import io
import json
import logging
import math
import os
import queue
import re
import signal
import tempfile
import threading
import time
from typing import Callable, Iterator

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from mambaeye_jax import config_fields as config_fields_lib
from mambaeye_jax import loss as loss_lib
from mambaeye_jax import metrics as metrics_lib
from mambaeye_jax import model as model_lib
from mambaeye_jax import model_dir
from mambaeye_jax import optim
from mambaeye_jax import progress as progress_lib
from mambaeye_jax import sharding as sharding_lib
from mambaeye_jax import work_dir
from mambaeye_jax.data import augment
from mambaeye_jax.data import pipeline

BATCH_KEYS = ("patches", "positions", "ratio", "labels", "mask", "segment_ids")

TrainState = dict  # {"params": tree, "opt_state": tree, "step": () int32, "rng": (2,) uint32}


# ----------------------------------------------------------------------------
# Configuration.


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
  # "fake": FakeBatches below, for tests.
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
    data_config_from(checked, local_batch_size=1)  # Pipeline checks every field.
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


# ----------------------------------------------------------------------------
# Data.


class FakeBatches:
  """A tiny deterministic batch source with the pipeline's batch contract.

  For tests and the "fake" source: batch i is a pure function of (seed,
  process index, i), labels are random, and every patch carries a faint
  label-dependent brightness so a model can learn. Checkpointable like a
  Grain iterator (get_state / set_state).

  Yields dicts of host arrays: patches (b_local, T, 768) uint8, positions
  (b_local, T, 2) int32, ratio (b_local, T) f32, labels (b_local, T) int32,
  mask (b_local, T) bool, segment_ids (b_local, T) int32.
  """

  def __init__(self, batch_size: int, num_glimpses: int, num_classes: int,
               seed: int = 0, process_index: int = 0, canvas: int = 64):
    self.batch_size = batch_size
    self.num_glimpses = num_glimpses
    self.num_classes = num_classes
    self.seed = seed
    self.process_index = process_index
    self.canvas = canvas
    self.index = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    rng = np.random.default_rng((self.seed, self.process_index, self.index))
    self.index += 1
    b, t = self.batch_size, self.num_glimpses
    labels = rng.integers(0, self.num_classes, size=(b,), dtype=np.int32)
    level = (labels * (200 // max(self.num_classes, 1)) + 20).astype(np.int32)
    noise = rng.integers(-20, 21, size=(b, t, 768), dtype=np.int32)
    patches = np.clip(level[:, None, None] + noise, 0, 255).astype(np.uint8)
    positions = rng.integers(0, self.canvas - 16, size=(b, t, 2), dtype=np.int32)
    ratio = np.broadcast_to(np.linspace(0.05, 1.0, t, dtype=np.float32), (b, t))
    return {
        "patches": patches,
        "positions": positions,
        "ratio": np.ascontiguousarray(ratio),
        "labels": np.repeat(labels[:, None], t, axis=1),
        "mask": np.ones((b, t), bool),
        "segment_ids": np.ones((b, t), np.int32),
    }

  def get_state(self) -> bytes:
    return json.dumps({"index": self.index}).encode()

  def set_state(self, state: bytes) -> None:
    self.index = int(json.loads(state.decode())["index"])

  def start_prefetch(self) -> None:  # Grain's checkpoint handler calls this.
    pass


def data_config_from(config: ml_collections.ConfigDict, local_batch_size: int):
  """The pipeline's DataConfig for this process (None for the fake source)."""
  fields = config.data.to_dict()
  if fields["source"] == "fake":
    return None
  return pipeline.DataConfig.from_any(fields, batch_size=local_batch_size,
                                      seed=config.seed, num_epochs=0)


def make_source(config: ml_collections.ConfigDict):
  """The configured random-access source (None for "fake"), built once.

  Listing a folder or opening TFDS, and decoding it all with cache_decoded,
  takes time: train_and_evaluate builds it once for its length, its class
  count and the iterator.
  """
  data_config = data_config_from(config, 1)
  if data_config is None:
    return None
  return pipeline.make_source(data_config)


def num_train_examples(config: ml_collections.ConfigDict, source=None) -> int:
  """Images per epoch, for epoch-based schedules (`source`: make_source's)."""
  if config.train_examples > 0:
    return int(config.train_examples)
  if config.data.source in ("fake", "synthetic"):
    return int(config.data.synthetic_size)
  return len(make_source(config) if source is None else source)


def check_num_classes(source, model_config: model_lib.ModelConfig) -> None:
  """Refuses a source with more classes than the model has outputs.

  Labels beyond num_classes would otherwise surface only as a NaN loss.
  Fewer classes are fine (e.g. 10 folders on a 1000-way model).
  """
  have = getattr(source, "num_classes", None)
  if have is None or have <= model_config.num_classes:
    return
  where = getattr(source, "root", None) or getattr(source, "paths", None) or repr(source)
  if isinstance(where, list):
    where = where[0] if len(where) == 1 else f"{where[0]} (+{len(where) - 1} shards)"
  raise ValueError(f"{have} classes in {where} but model.num_classes is "
                   f"{model_config.num_classes}; set --config.model.num_classes={have}")


def check_labels(local_batch: dict, num_classes: int, step: int) -> None:
  """Refuses labels outside [0, num_classes) (sources without a class count)."""
  labels = local_batch["labels"][np.asarray(local_batch["mask"], bool)]
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    bad = int(labels.max() if labels.max() >= num_classes else labels.min())
    raise ValueError(f"label {bad} in the batch of step {step} is outside model.num_classes="
                     f"{num_classes} (labels must be 0..{num_classes - 1})")


def make_train_iterator(config: ml_collections.ConfigDict, local_batch_size: int,
                        model_config: model_lib.ModelConfig, source=None) -> Iterator[dict]:
  """This process's batches, (b_local, T, ...) host arrays (see FakeBatches).

  The returned object has get_state / set_state (for the checkpoint) and,
  from the real pipeline, `num_skipped` (bad records left out). `source`:
  make_source's, to reuse it (built here when None).
  """
  data_config = data_config_from(config, local_batch_size)
  if data_config is None:
    return FakeBatches(local_batch_size, config.data.num_glimpses, model_config.num_classes,
                       seed=config.seed, process_index=jax.process_index())
  return pipeline.make_train_iterator(data_config, data_source=source)


def _pipeline_stats(iterator) -> dict[str, float]:
  """Skip counters of the pipeline, cumulative, summed over processes.

  Collective when there are several processes: all call it at the same step.
  """
  skipped = getattr(iterator, "num_skipped", None)
  if skipped is None:
    return {}
  if jax.process_count() > 1:
    skipped = multihost_utils.process_allgather(np.int64(skipped)).sum()
  return {"data/num_skipped": int(skipped)}


class BatchPrefetcher:
  """Reads batches and places them on the mesh ahead of the loop.

  With depth > 0 a background thread keeps up to `depth` global batches
  ready, so reading, host-to-device copies and the step overlap. Each batch
  travels with the iterator's state just after it was read: `get_state()`
  returns the position after the last batch the loop took, not the last one
  read ahead, so a checkpoint resumes exactly there. Saved through Grain's
  checkpoint handler (`get_state` returns JSON bytes, the same file Grain
  writes for its own iterators); restore the underlying iterator instead,
  before building the prefetcher.

  `next(prefetcher)` -> (local, batch): this process's host rows (b_local, ...)
  and the global arrays (b, ...) sharded over "data".
  """

  _DONE = object()

  def __init__(self, iterator, mesh: jax.sharding.Mesh, depth: int):
    self.iterator = iterator
    self._mesh = mesh
    self._depth = depth
    self._state = iterator.get_state()
    self._queue = queue.Queue(maxsize=max(depth, 1))
    self._stop = threading.Event()
    self._thread = None
    if depth > 0:
      self._thread = threading.Thread(target=self._fill, name="batch_prefetch", daemon=True)
      self._thread.start()

  def _read(self):
    local = next(self.iterator)
    batch = sharding_lib.global_batch({k: local[k] for k in BATCH_KEYS}, self._mesh)
    return local, batch, self.iterator.get_state()

  def _fill(self):
    while not self._stop.is_set():
      try:
        item = self._read()
      except StopIteration:
        item = self._DONE
      except Exception as e:  # pylint: disable=broad-except
        item = e  # Raised on the loop's thread by __next__.
      while not self._stop.is_set():
        try:
          self._queue.put(item, timeout=0.1)
          break
        except queue.Full:
          continue
      if item is self._DONE or isinstance(item, Exception):
        return

  def __iter__(self):
    return self

  def __next__(self):
    if self._thread is None:
      local, batch, self._state = self._read()
      return local, batch
    item = self._queue.get()
    if item is self._DONE:
      raise StopIteration
    if isinstance(item, Exception):
      raise item
    local, batch, self._state = item
    return local, batch

  def get_state(self) -> bytes:
    state = self._state
    return state if isinstance(state, bytes) else json.dumps(state, indent=4).encode()

  def start_prefetch(self) -> None:  # Part of Grain's handler protocol.
    pass

  @property
  def num_skipped(self):
    return getattr(self.iterator, "num_skipped", None)

  def close(self) -> None:
    """Stops the thread and Grain's workers and frees the batches read ahead.

    Grain's worker batches live in shared memory, freed when the arrays are;
    batches still queued at exit are what Python reports as "leaked
    shared_memory objects".
    """
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=10)
    while True:
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    _close_quietly(self.iterator)  # Stops Grain's worker processes.


# ----------------------------------------------------------------------------
# State and step.


def _init_state(model_config: model_lib.ModelConfig, tx: optax.GradientTransformation,
                rng: jax.Array) -> TrainState:
  """rng: (2,) uint32 key data -> the initial TrainState (pure function)."""
  key = jax.random.wrap_key_data(rng)
  init_key, carry_key = jax.random.split(key)
  model = model_lib.MambaEye(model_config, rngs=nnx.Rngs(params=init_key))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  return {"params": params, "opt_state": tx.init(params),
          "step": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(carry_key)}


def model_graphdef(model_config: model_lib.ModelConfig):
  """The NNX graph definition (structure, no arrays) of a MambaEye."""
  graphdef, _ = nnx.split(model_dir.abstract_model(model_config))
  return graphdef


def create_train_state(model_config: model_lib.ModelConfig, tx: optax.GradientTransformation,
                       seed: int, mesh: jax.sharding.Mesh):
  """Builds the state directly in its sharding (replicated for pure DP).

  Returns:
    (state, shardings, abstract): the TrainState, its sharding tree, and its
    ShapeDtypeStructs (with shardings) for restoring checkpoints.
  """
  rng = jax.random.key_data(jax.random.key(seed))
  init = functools.partial(_init_state, model_config, tx)
  shapes = jax.eval_shape(init, rng)
  shardings = jax.tree.map(lambda _: sharding_lib.replicated(mesh), shapes)
  abstract = jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
  state = jax.jit(init, out_shardings=shardings)(rng)
  return state, shardings, abstract


def _glimpse_index(segment_ids: jax.Array) -> jax.Array:
  """(b, T) int -> (b, T) int32: 0-based index of each step in its sequence."""
  b, t = segment_ids.shape
  steps = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  prev = jnp.concatenate([jnp.full((b, 1), -1, segment_ids.dtype), segment_ids[:, :-1]], 1)
  first = jax.lax.cummax(jnp.where(segment_ids != prev, steps, 0), axis=1)
  return steps - first


def _is_last(segment_ids: jax.Array, mask: jax.Array) -> jax.Array:
  """(b, T) bool: the last real step of each packed sequence."""
  b = segment_ids.shape[0]
  nxt = jnp.concatenate([segment_ids[:, 1:], jnp.full((b, 1), -1, segment_ids.dtype)], 1)
  nxt_mask = jnp.concatenate([mask[:, 1:], jnp.zeros((b, 1), bool)], 1)
  return mask & ((nxt != segment_ids) | ~nxt_mask)


def step_metrics(logits: jax.Array, batch: dict, accuracy_at: tuple[int, ...]) -> dict:
  """Sums for accuracy at glimpse counts, images and tokens of one batch.

  Args:
    logits: (b, T, K).
    batch: the batch contract (labels, mask, segment_ids (b, T)).
    accuracy_at: glimpse counts k; step k - 1 of each sequence is scored.

  Returns:
    name -> () arrays: correct_at_<k>, count_at_<k>, correct_last,
    count_last (= images), tokens.
  """
  mask = batch["mask"].astype(bool)
  correct = loss_lib.correct_at_steps(logits, batch["labels"]) & mask
  index = _glimpse_index(batch["segment_ids"])
  out = {}
  for k in accuracy_at:
    at = mask & (index == k - 1)
    out[f"correct_at_{k}"] = jnp.sum(correct & at, dtype=jnp.int32)
    out[f"count_at_{k}"] = jnp.sum(at, dtype=jnp.int32)
  last = _is_last(batch["segment_ids"], mask)
  out["correct_last"] = jnp.sum(correct & last, dtype=jnp.int32)
  out["count_last"] = jnp.sum(last, dtype=jnp.int32)
  out["tokens"] = jnp.sum(mask, dtype=jnp.int32)
  return out


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    accuracy_at: tuple[int, ...], packed: bool = True,
                    loss: str = "stepwise") -> Callable:
  """(state, batch) -> (state, metrics), to be jitted.

  batch: the contract's global arrays, (b, T, ...). metrics: () arrays,
  "loss", "grad_norm", "learning_rate" and the sums of `step_metrics`.
  packed: whether rows may hold several sequences. When they cannot (padded
  batches), the model is not given segment ids: a row's padding comes after
  its real steps, which a causal model never lets it reach, so the ids would
  only cost masking work in the conv and the SSD kernel.
  loss: the objective, one of `loss_lib.LOSSES`.
  """

  loss_kind = loss
  if loss_kind not in loss_lib.LOSSES:
    raise ValueError(f"unknown loss {loss_kind!r}; known: {', '.join(loss_lib.LOSSES)}")

  def train_step(state: TrainState, batch: dict):
    def loss_fn(params):
      model = nnx.merge(graphdef, params)
      segment_ids = batch["segment_ids"] if packed else None
      logits = model(batch["patches"], batch["positions"], segment_ids)
      last = (_is_last(batch["segment_ids"], batch["mask"]) if loss_kind == "ce_last_step"
              else None)
      value = loss_lib.training_loss(loss_kind, logits, batch["labels"], batch["ratio"],
                                     batch["mask"], last)
      return value, logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
               "learning_rate": schedule(state["step"]),
               # A finite loss can still come with an overflowing update (a
               # huge learning rate): the loop never saves such a state.
               "nonfinite_state": _count_nonfinite((params, opt_state))}
    metrics.update(step_metrics(jax.lax.stop_gradient(logits), batch, accuracy_at))
    new_state = {"params": params, "opt_state": opt_state,
                 "step": state["step"] + 1, "rng": state["rng"]}
    return new_state, metrics

  return train_step


def _count_nonfinite(tree) -> jax.Array:
  """() int32: NaN or infinite entries in a tree's floating-point leaves."""
  counts = [jnp.sum(~jnp.isfinite(x), dtype=jnp.int32) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return sum(counts, jnp.zeros((), jnp.int32))


def compile_train_step(train_step: Callable, state_shardings, mesh: jax.sharding.Mesh):
  """jax.jit with the state donated and the batch split over "data".

  Calls run under `jax.set_mesh(mesh)` so that the Pallas SSD kernel, which
  XLA cannot partition, is split over the batch (`ssd.shard_over_batch`).
  """
  jitted = jax.jit(
      train_step, donate_argnums=(0,),
      in_shardings=(state_shardings, sharding_lib.batch_sharding(mesh)),
      out_shardings=(state_shardings, sharding_lib.replicated(mesh)))

  @functools.wraps(train_step)
  def step(state, batch):
    with jax.set_mesh(mesh):
      return jitted(state, batch)

  step.jitted = jitted  # For lowering (HLO dumps, cost analysis).
  return step


def summarize(window: list[dict], accuracy_at: tuple[int, ...]) -> dict[str, float]:
  """Host metrics of several steps -> the logged train/* scalars."""
  total = lambda name: float(sum(np.asarray(m[name]) for m in window))
  out = {
      "train/loss": float(np.mean([m["loss"] for m in window])),
      "train/grad_norm": float(np.mean([m["grad_norm"] for m in window])),
      "train/learning_rate": float(window[-1]["learning_rate"]),
  }
  for k in accuracy_at:
    count = total(f"count_at_{k}")
    if count:
      out[f"train/accuracy_at_{k}"] = total(f"correct_at_{k}") / count
  out["train/accuracy_last"] = total("correct_last") / max(total("count_last"), 1.0)
  return out


# ----------------------------------------------------------------------------
# Checkpoints.


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


def _save(manager: ocp.CheckpointManager, step: int, state: TrainState, iterator) -> None:
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


def _wait_for_saves(manager: ocp.CheckpointManager) -> None:
  """Waits for the asynchronous saves; their errors become CheckpointWriteError."""
  try:
    manager.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointWriteError(f"writing a checkpoint in {manager.directory} failed: "
                               f"{type(e).__name__}: {e}") from e


class _DataStateError(ValueError):
  """A checkpoint's data iterator state does not fit this config's pipeline."""


def _restore(manager: ocp.CheckpointManager, step: int, abstract: TrainState,
             iterator) -> TrainState:
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


# ----------------------------------------------------------------------------
# The loop.


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
    CheckpointWriteError: a checkpoint cannot be written.
    sources.TooManyBadRecordsError: the data is mostly unreadable.
  """
  # Everything that can be checked is, before anything is written.
  validate_config(config)
  workdir = model_dir.absolute(workdir)  # A bucket's gs://... stays as it is.
  model_config = work_dir.model_config_from(config)
  check_resumable(workdir, config)
  source = make_source(config)
  check_num_classes(source, model_config)
  mesh = sharding_lib.make_mesh(None if config.num_devices < 0 else config.num_devices)
  local_bs = sharding_lib.local_batch_size(config.global_batch_size, mesh)
  num_examples = num_train_examples(config, source)
  ocfg = optim_config_from(config, num_examples)
  total_steps = ocfg.total_steps
  tx = optim.make_optimizer(ocfg)
  schedule = optim.learning_rate_schedule(ocfg)
  accuracy_at = tuple(int(k) for k in config.accuracy_at)
  is_chief = jax.process_index() == 0
  check_checkpoint_dir(workdir)
  logging.info("MambaEye %s, %d devices on %d processes, global batch %d, %d steps",
               model_config, mesh.size, jax.process_count(), config.global_batch_size,
               total_steps)

  iterator = make_train_iterator(config, local_bs, model_config, source=source)
  manager = None
  try:
    state, state_shardings, abstract = create_train_state(model_config, tx, config.seed, mesh)
    manager = work_dir.checkpoint_manager(workdir, config)
    start = manager.latest_step()
    if start is not None:
      logging.info("resuming from checkpoint step %d", start)
      del state  # Free it before the restored copy arrives.
      state = _restore_or_explain(manager, start, abstract, iterator, workdir)
    # Written once the run is known to start or resume: a failed resume
    # leaves the workdir's record of its model as it was.
    work_dir.write_train_config(workdir, config)
    batches = BatchPrefetcher(iterator, mesh, config.prefetch_to_device)
  except BaseException:
    _close_quietly(iterator)
    if manager is not None:
      manager.close()
    raise
  step = int(start or 0)
  last_checkpoint = start
  export_dir = os.path.join(workdir, work_dir.MODEL_DIR)
  already_done = step >= total_steps
  graphdef = model_graphdef(model_config)
  p_step = compile_train_step(make_train_step(graphdef, tx, schedule, accuracy_at,
                                              packed=bool(config.data.packing),
                                              loss=config.loss),
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
            _save(manager, step, state, batches)
            last_checkpoint = step
          break
        data_wait += time.perf_counter() - t0
        check_labels(local, model_config.num_classes, step + 1)
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
          scalars = summarize(host, accuracy_at)
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
          scalars.update(_pipeline_stats(batches))
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
          _save(manager, step, state, batches)
          last_checkpoint = step
        if stopping:
          logging.warning("stopped at step %d; checkpoint saved", step)
          break
      check_pending()
    _wait_for_saves(manager)
    finished = step >= total_steps
    # A finished run re-run exports again only if its model is missing.
    if (finished and config.export_model
        and not (already_done and epath.Path(export_dir).is_dir())):
      export_model(export_dir, model_config, state["params"])
    if finished and is_chief:
      print(finished_message(workdir, step, config, already=already_done), flush=True)
  finally:
    local = batch = pending = window = None  # The last batches' shared memory.
    try:
      _wait_for_saves(manager)
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


def _close_quietly(iterator) -> None:
  close = getattr(iterator, "close", None)
  if close is not None:
    try:
      close()
    except Exception:  # pylint: disable=broad-except
      logging.exception("closing the data iterator failed")


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


def _restore_or_explain(manager: ocp.CheckpointManager, step: int, abstract: TrainState,
                        iterator, workdir: str) -> TrainState:
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

