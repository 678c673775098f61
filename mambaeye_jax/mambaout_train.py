r"""Trains the MambaOut baseline at one input size and evaluates it at many.

    python -m mambaeye_jax.mambaout_train \
        --config configs/cifar10_mambaout.py:DATA_ROOT --workdir W
    python -m mambaeye_jax.mambaout_train --config ... --workdir W --eval_only

DESIGN.md section 7's gated CNN (mambaeye_jax/mambaout.py), trained on the
same data as MambaEye (an official folder layout root/<class>/<image>) at a
fixed input side S, then classified on the test folder at each evaluation
canvas C (the list MambaEye is evaluated at), each test image "fit" to C x C:

    train  : image -> fit to S x S -> zero-pad p, random S x S crop -> h-flip
             -> (b, S, S, 3) uint8 -> MambaOut -> (b, K) logits -> CE loss
    eval   : image -> fit to C x C (centred on a zero canvas) -> (b, C, C, 3)
             -> argmax logits, one C at a time

"Fit" is MambaEye's evaluation resize (data/eval_transforms.py): scale so
the longer side is C, paste centred on a zero square; a square image (CIFAR)
is simply resized to C x C. The filter is `data.resample` (bicubic by
default; MambaEye's own fit uses LANCZOS). The network is fully
convolutional with a global mean before its head, so one set of weights
takes every canvas.

Pieces reused from the project: the optimiser (optim.make_optimizer: AdamW,
warm-up + cosine, clipping, decay on "kernel" leaves only, which for
MambaOut are the conv, depthwise-conv and linear weights; biases and
LayerNorm scales do not decay), the folder source and its decoded-image
cache (data/sources.py), and the data-parallel mesh (sharding.py: one
"data" axis over every local device, batch split, parameters replicated).

The workdir receives: params.msgpack and model_config.json (the final
parameters, `load_params`), metrics.jsonl (the progress lines' numbers),
results.json and results.md (top-1 % per canvas, rewritten after each
canvas, so an evaluation cut off keeps what it scored; `--eval_only` scores
the saved parameters again). There is no training checkpoint: a run is
minutes long, and a rerun starts over. One process
only (every GPU of one host); an unreadable image stops the run naming its
file.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import re
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app
from absl import flags
from flax import nnx
from flax import serialization
from ml_collections import config_flags
from PIL import Image

from mambaeye_jax import config_fields as config_fields_lib
from mambaeye_jax import files
from mambaeye_jax import mambaout
from mambaeye_jax import metrics as metrics_lib
from mambaeye_jax import optim
from mambaeye_jax import sharding as sharding_lib
from mambaeye_jax import train_loop
from mambaeye_jax.data import augment
from mambaeye_jax.data import eval_transforms
from mambaeye_jax.data import pipeline
from mambaeye_jax.data import sources

PARAMS_FILE = "params.msgpack"
MODEL_CONFIG_FILE = "model_config.json"
RESULTS_FILE = "results.json"
RESULTS_TABLE_FILE = "results.md"
# MambaEye's evaluation canvases (docs/evaluation.md); the baseline is read
# at the same sides.
MAMBAEYE_CANVASES = (32, 48, 64, 96, 128, 192, 256)
RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
            "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}

TrainState = dict  # {"params": tree, "rngs": tree, "opt_state": tree, "step": () int32}


# ----------------------------------------------------------------------------
# Configuration.


def model_config_dict(variant: str = "femto", **overrides) -> ml_collections.ConfigDict:
  """Every MambaOutConfig field of a named size (mambaout.VARIANTS), as a ConfigDict."""
  return ml_collections.ConfigDict(
      dataclasses.asdict(mambaout.get_config(variant, **overrides)))


def default_config() -> ml_collections.ConfigDict:
  """Every field a config may set; config files start here and change what differs."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = model_config_dict("femto", num_classes=10)

  c.data = ml_collections.ConfigDict()
  c.data.train_path = ""  # root/<class>/<image> folders.
  c.data.test_path = ""
  c.data.image_size = 32  # S, the training input side.
  c.data.crop_padding = 4  # p: zero padding before the random S x S crop; 0: no crop.
  c.data.hflip = True  # Random horizontal flip (p = 0.5).
  c.data.resample = "bicubic"  # Filter of every resize (train fit to S, eval fit to C).
  # Decode every image once into shared memory (CIFAR-10: 154 MB train +
  # 31 MB test) instead of every epoch: a JPEG decode is ~0.2 ms of a core,
  # most of this transform's cost.
  c.data.cache_decoded = True
  c.data.worker_count = 0  # Grain worker processes for training (mp_prefetch).
  c.data.worker_buffer_size = 4  # Batches buffered per worker.
  c.data.read_threads = 4  # Threads per process running the transform.

  c.global_batch_size = 256
  c.num_epochs = 30.0
  c.num_train_steps = -1  # > 0 overrides num_epochs.
  c.label_smoothing = 0.0

  c.optim = optim.config_dict(warmup_epochs=1.0)

  c.eval_canvases = MAMBAEYE_CANVASES
  c.eval_batch_size = 512
  # Threads resizing the test images (PIL releases the GIL); 0: one a core.
  # The training's read_threads are per worker process; the evaluation has
  # no workers (canvas 32 took 26 s with two threads on an H100's host,
  # compilation included).
  c.eval_read_threads = 0
  c.log_every_steps = 100
  c.num_devices = -1  # -1: every local device.
  return c


def config_fields(config: ml_collections.ConfigDict | None = None) -> dict[str, Any]:
  """Dotted name -> value of every leaf field (default_config()'s when None)."""
  return config_fields_lib.leaf_fields(default_config() if config is None else config)


def unknown_field_message(name: str) -> str:
  """"config field 'x' does not exist; did you mean ...?"."""
  return config_fields_lib.unknown_field_message(name, list(config_fields()))


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ValueError(message)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks fields and ranges before any data is read or device used.

  Raises:
    ValueError: naming the field, its value and what it must be.
  """
  unknown = sorted(set(config_fields(config)) - set(config_fields()))
  _require(not unknown, unknown_field_message(unknown[0]) if unknown else "")
  model_config_from(config)  # MambaOutConfig's own checks (depths, widths, dtype...).
  d = config.data
  _require(d.image_size >= 1, f"data.image_size={d.image_size} must be >= 1")
  _require(d.crop_padding >= 0, f"data.crop_padding={d.crop_padding} must be >= 0")
  _require(d.resample in RESAMPLE,
           f"data.resample={d.resample!r} must be one of {sorted(RESAMPLE)}")
  for name in ("worker_count", "read_threads", "worker_buffer_size"):
    low = 0 if name == "worker_count" else 1
    _require(d[name] >= low, f"data.{name}={d[name]} must be >= {low}")
  _require(config.global_batch_size >= 1,
           f"global_batch_size={config.global_batch_size} must be >= 1")
  _require(config.eval_batch_size >= 1,
           f"eval_batch_size={config.eval_batch_size} must be >= 1")
  _require(config.eval_read_threads >= 0,
           f"eval_read_threads={config.eval_read_threads} must be >= 0 (0: one a core)")
  _require(config.num_train_steps > 0 or config.num_epochs > 0,
           f"num_epochs={config.num_epochs} must be > 0 (or num_train_steps > 0)")
  _require(0.0 <= config.label_smoothing < 1.0,
           f"label_smoothing={config.label_smoothing} must be in [0, 1)")
  _require(config.log_every_steps >= 1,
           f"log_every_steps={config.log_every_steps} must be >= 1")
  canvases = tuple(config.eval_canvases)
  _require(all(isinstance(s, int) and s >= 1 for s in canvases),
           f"eval_canvases={canvases} must be positive integers (may be empty)")
  _require(len(set(canvases)) == len(canvases), f"eval_canvases={canvases} repeats a side")
  optim_config_from(config, num_examples=1)  # OptimConfig's checks (lr > 0, decay...).
  _require(config.optim.weight_decay >= 0,
           f"optim.weight_decay={config.optim.weight_decay} must be >= 0")


def model_config_from(config: ml_collections.ConfigDict) -> mambaout.MambaOutConfig:
  return mambaout.MambaOutConfig(**config.model.to_dict())


def total_train_steps(config: ml_collections.ConfigDict, num_examples: int) -> int:
  """num_train_steps, or num_epochs of full global batches (at least 1)."""
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  return max(1, int(config.num_epochs * num_examples // config.global_batch_size))


def optim_config_from(config: ml_collections.ConfigDict, num_examples: int) -> optim.OptimConfig:
  o = config.optim
  total = total_train_steps(config, num_examples)
  if o.warmup_steps >= 0:
    warmup = int(o.warmup_steps)
  else:
    warmup = int(o.warmup_epochs * num_examples // config.global_batch_size)
  return optim.OptimConfig(
      learning_rate=o.learning_rate, b1=o.b1, b2=o.b2, eps=o.eps,
      weight_decay=o.weight_decay, clip_norm=o.clip_norm,
      warmup_steps=min(warmup, total), total_steps=total,
      end_lr_ratio=o.end_lr_ratio, decay=o.decay)


# ----------------------------------------------------------------------------
# Data.


def _to_rgb(record: Mapping[str, Any]) -> Image.Image:
  """A record's image (encoded bytes or decoded uint8 array) as RGB PIL."""
  image = record["image"]
  if isinstance(image, (bytes, bytearray, memoryview)):
    return sources.decode_image(bytes(image), record.get("key", "<record>"))
  return eval_transforms.to_rgb(np.asarray(image))


def fit_to_canvas(image: Image.Image, side: int, resample: str = "bicubic") -> np.ndarray:
  """MambaEye's "fit" with the given filter: (side, side, 3) uint8.

  The longer side becomes `side` (aspect kept, `augment.fit_size`'s
  rounding), the image is pasted centred on zeros. A square image is just
  resized to side x side; one already that size is returned unchanged.
  """
  size = augment.fit_size(*image.size, side)
  if image.size != size:
    image = image.resize(size, RESAMPLE[resample])
  canvas, _ = eval_transforms.paste_centred(np.asarray(image), side)
  return canvas


def pad_crop_flip(pixels: np.ndarray, rng: np.random.Generator, padding: int,
                  hflip: bool) -> np.ndarray:
  """The light CIFAR augmentation: zero-pad, random crop back, random h-flip.

  Args:
    pixels: (S, S, 3) uint8.
    rng: the record's generator.
    padding: p; the crop's corner is uniform in [0, 2p]^2 (torchvision's
      RandomCrop(S, padding=p), fill 0).
    hflip: flip left-right with probability 0.5.

  Returns:
    (S, S, 3) uint8.
  """
  side = pixels.shape[0]
  if padding:
    padded = np.zeros((side + 2 * padding, side + 2 * padding, 3), np.uint8)
    padded[padding:padding + side, padding:padding + side] = pixels
    top, left = rng.integers(0, 2 * padding + 1, size=2)
    pixels = padded[top:top + side, left:left + side]
  if hflip and rng.random() < 0.5:
    pixels = pixels[:, ::-1]
  return np.ascontiguousarray(pixels)


class TrainTransform(grain.transforms.RandomMap):
  """Record -> {"image": (S, S, 3) uint8, "label": () int32}."""

  def __init__(self, image_size: int, padding: int, hflip: bool, resample: str):
    self._size, self._padding, self._hflip = image_size, padding, hflip
    self._resample = resample

  def random_map(self, record: Mapping[str, Any], rng: np.random.Generator) -> dict:
    pixels = fit_to_canvas(_to_rgb(record), self._size, self._resample)
    return {"image": pad_crop_flip(pixels, rng, self._padding, self._hflip),
            "label": np.int32(record["label"])}


class EvalTransform(grain.transforms.Map):
  """Record -> {"image": (C, C, 3) uint8 fit, "label": () int32}."""

  def __init__(self, canvas: int, resample: str):
    self._canvas, self._resample = canvas, resample

  def map(self, record: Mapping[str, Any]) -> dict:
    return {"image": fit_to_canvas(_to_rgb(record), self._canvas, self._resample),
            "label": np.int32(record["label"])}


def open_folder(path: str, cache_decoded: bool):
  """(source for Grain, its ImageFolderSource) of a root/<class>/<image> folder.

  Raises:
    FileNotFoundError / ValueError: from ImageFolderSource, naming the path.
  """
  if not path:
    raise ValueError("no data path: set data.train_path / data.test_path (or give the "
                     "config file its DATA_ROOT argument)")
  folder = sources.ImageFolderSource(path)
  return (sources.DecodedImageCache(folder) if cache_decoded else folder), folder


def make_train_dataset(source, data: ml_collections.ConfigDict, batch_size: int,
                       num_steps: int, seed: int) -> grain.IterDataset:
  """Shuffled (per epoch), augmented batches; exactly `num_steps` of them.

  Returns:
    An IterDataset of {"image": (b, S, S, 3) uint8, "label": (b,) int32}.
  """
  epochs = math.ceil(num_steps * batch_size / len(source))
  ds = (grain.MapDataset.source(source)
        .shuffle(seed=seed)
        .repeat(epochs)
        .random_map(TrainTransform(data.image_size, data.crop_padding, data.hflip,
                                   data.resample), seed=seed + 1)
        .batch(batch_size, drop_remainder=True))
  ds = ds[:num_steps]
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=data.read_threads,
                                            prefetch_buffer_size=2 * data.read_threads))
  if data.worker_count > 0:
    pipeline.mark_absl_flags_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=data.worker_count, per_worker_buffer_size=data.worker_buffer_size))
  return ds


def make_eval_dataset(source, canvas: int, batch_size: int, resample: str,
                      read_threads: int) -> grain.IterDataset:
  """One pass in source order; the last batch may be short.

  Threads only, no worker processes: PIL's resize releases the GIL, and a
  pool of workers per canvas would cost its start-up seven times.

  Returns:
    An IterDataset of {"image": (b, C, C, 3) uint8, "label": (b,) int32}.
  """
  return (grain.MapDataset.source(source)
          .map(EvalTransform(canvas, resample))
          .batch(batch_size, drop_remainder=False)
          .to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                             prefetch_buffer_size=2 * read_threads)))


def check_classes(train_folder, test_folder, num_classes: int) -> None:
  """The model must have a logit per class, and both splits the same classes."""
  if train_folder.num_classes > num_classes:
    raise ValueError(f"{train_folder.root} has {train_folder.num_classes} classes but "
                     f"model.num_classes={num_classes}")
  if test_folder is not None and test_folder.class_names != train_folder.class_names:
    raise ValueError(f"the class folders of {test_folder.root} ({test_folder.class_names}) "
                     f"differ from {train_folder.root}'s ({train_folder.class_names}): "
                     "labels would not match")


# ----------------------------------------------------------------------------
# Model, state and steps.


def _split(model: mambaout.MambaOut):
  """(graphdef, params, rngs): pure dicts; rngs is drop path's stream (or empty)."""
  graphdef, params, rngs = nnx.split(model, nnx.Param, ...)
  return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(rngs)


def _new_model(config: mambaout.MambaOutConfig, seed) -> mambaout.MambaOut:
  key = jax.random.key(seed)
  return mambaout.MambaOut(config, rngs=nnx.Rngs(params=key, dropout=jax.random.fold_in(key, 1)))


def model_graphdef(config: mambaout.MambaOutConfig):
  return _split(nnx.eval_shape(lambda: _new_model(config, 0)))[0]


def create_train_state(config: mambaout.MambaOutConfig, tx: optax.GradientTransformation,
                       seed: int, mesh: jax.sharding.Mesh):
  """(state, shardings): the initial TrainState, built replicated on the mesh."""
  def init(seed):
    _, params, rngs = _split(_new_model(config, seed))
    return {"params": params, "rngs": rngs, "opt_state": tx.init(params),
            "step": jnp.zeros((), jnp.int32)}

  shapes = jax.eval_shape(init, 0)
  shardings = jax.tree.map(lambda _: sharding_lib.replicated(mesh), shapes)
  return jax.jit(init, out_shardings=shardings)(seed), shardings


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0
                  ) -> jax.Array:
  """Mean softmax cross-entropy: logits (b, K), labels (b,) int -> () float32."""
  targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return jnp.mean(optax.softmax_cross_entropy(logits.astype(jnp.float32), targets))


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    label_smoothing: float = 0.0) -> Callable:
  """(state, batch) -> (state, metrics); jit it with `compile_train_step`.

  batch: {"image": (b, S, S, 3) uint8, "label": (b,) int32}. metrics: ()
  arrays "loss", "correct" (count), "grad_norm", "learning_rate".
  """
  def train_step(state: TrainState, batch: dict):
    def loss_fn(params):
      model = nnx.merge(graphdef, params, state["rngs"])
      logits = model(batch["image"])  # (b, K); train mode: drop path on.
      rngs = nnx.to_pure_dict(nnx.state(model, nnx.RngState))
      return cross_entropy(logits, batch["label"], label_smoothing), (logits, rngs)

    (loss, (logits, rngs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
               "learning_rate": schedule(state["step"]),
               "correct": jnp.sum(jnp.argmax(logits, -1) == batch["label"], dtype=jnp.int32)}
    return {"params": optax.apply_updates(state["params"], updates), "rngs": rngs,
            "opt_state": opt_state, "step": state["step"] + 1}, metrics

  return train_step


def compile_train_step(train_step: Callable, state_shardings, mesh: jax.sharding.Mesh):
  """jax.jit with the state donated and replicated, the batch split over "data"."""
  return jax.jit(train_step, donate_argnums=(0,),
                 in_shardings=(state_shardings, sharding_lib.batch_sharding(mesh)),
                 out_shardings=(state_shardings, sharding_lib.replicated(mesh)))


def make_eval_step(graphdef) -> Callable:
  """(params, images (b, C, C, 3), labels (b,), mask (b,) bool) -> () int32 correct."""
  def eval_step(params, images, labels, mask):
    logits = nnx.merge(graphdef, params)(images)
    return jnp.sum((jnp.argmax(logits, -1) == labels) & mask, dtype=jnp.int32)

  return eval_step


def _device_batch(batch: Mapping[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  return sharding_lib.global_batch(batch, mesh)


# ----------------------------------------------------------------------------
# Parameters on disk.


def save_params(workdir: str, config: mambaout.MambaOutConfig, params) -> str:
  """Writes params.msgpack (flax serialization) and model_config.json; the params path."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, PARAMS_FILE)
  files.write_atomically(path, serialization.msgpack_serialize(
      serialization.to_state_dict(sharding_lib.to_host(params))))
  with open(os.path.join(workdir, MODEL_CONFIG_FILE), "w") as f:
    json.dump(dataclasses.asdict(config), f, indent=2)
  return path


def load_params(workdir: str) -> tuple[mambaout.MambaOutConfig, dict]:
  """(config, params pure dict of numpy arrays) written by `save_params`.

  Raises:
    FileNotFoundError: the workdir holds no params.msgpack / model_config.json.
  """
  for name in (PARAMS_FILE, MODEL_CONFIG_FILE):
    if not os.path.isfile(os.path.join(workdir, name)):
      raise FileNotFoundError(f"{os.path.join(workdir, name)} does not exist (train first)")
  with open(os.path.join(workdir, MODEL_CONFIG_FILE)) as f:
    config = mambaout.MambaOutConfig(**json.load(f))
  template = nnx.to_pure_dict(nnx.state(
      nnx.eval_shape(lambda: _new_model(config, 0)), nnx.Param))
  with open(os.path.join(workdir, PARAMS_FILE), "rb") as f:
    params = serialization.from_state_dict(template, serialization.msgpack_restore(f.read()))
  return config, params


# ----------------------------------------------------------------------------
# Loops.


def make_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  if jax.process_count() > 1:
    raise ValueError("mambaout_train runs as one process (every GPU of one host); "
                     f"{jax.process_count()} processes were started")
  return sharding_lib.make_mesh(None if config.num_devices < 0 else config.num_devices)


def train(config: ml_collections.ConfigDict, workdir: str, *, train_source=None,
          mesh: jax.sharding.Mesh | None = None) -> tuple[Any, dict[str, float]]:
  """Trains; returns (params replicated on the mesh, summary of the run).

  Args:
    config: as `default_config()`.
    workdir: metrics.jsonl is appended here.
    train_source: a random-access source to use instead of
      data.train_path (records {"image", "label", "key"}).
    mesh: default `make_mesh(config)`.
  """
  validate_config(config)
  if mesh is None:
    mesh = make_mesh(config)
  model_config = model_config_from(config)
  batch_size = config.global_batch_size
  sharding_lib.local_batch_size(batch_size, mesh)  # ValueError unless it splits evenly.
  if train_source is None:
    train_source, _ = open_folder(config.data.train_path, config.data.cache_decoded)
  num_examples = len(train_source)
  optim_config = optim_config_from(config, num_examples)
  total = optim_config.total_steps
  tx = optim.make_optimizer(optim_config)
  state, shardings = create_train_state(model_config, tx, config.seed, mesh)
  step_fn = compile_train_step(
      make_train_step(model_graphdef(model_config), tx,
                      optim.learning_rate_schedule(optim_config), config.label_smoothing),
      shardings, mesh)
  print(f"MambaOut {model_config.depths} x {model_config.widths}, "
        f"{sum(x.size for x in jax.tree.leaves(state['params'])):,} params, "
        f"{total} steps of {batch_size} at {config.data.image_size}x{config.data.image_size} "
        f"({total * batch_size / num_examples:.1f} epochs of {num_examples}) on {mesh.size} "
        f"{jax.devices()[0].platform} device(s)", flush=True)
  dataset = make_train_dataset(train_source, config.data, batch_size, total, config.seed)
  iterator = iter(dataset)
  step = 0
  summarize = functools.partial(_window_scalars, batch_size=batch_size)
  start = time.perf_counter()
  logger = None
  try:
    with metrics_lib.MetricWriter(workdir, tensorboard=False) as writer:
      logger = train_loop.TrainLogger(total, writer, config.log_every_steps)
      while step < total:
        t0 = time.perf_counter()
        try:
          batch = _device_batch(next(iterator), mesh)
        except StopIteration:
          raise RuntimeError(f"the data ended after {step} of {total} steps") from None
        data_wait = time.perf_counter() - t0
        state, out = step_fn(state, batch)
        logger.add(out, data_wait)
        step += 1
        if logger.due(step, force=step == total):
          logger.log(step, summarize)
      jax.block_until_ready(state)
  finally:
    batch = None
    if logger is not None:
      logger.clear()  # The unlogged steps' device metrics.
    close = getattr(iterator, "close", None)
    if close is not None:  # Stops Grain's worker processes.
      close()
    pipeline.release_shared_memory()
  summary = dict(logger.last)  # The last step is always logged.
  summary["train_seconds"] = time.perf_counter() - start
  summary["epochs"] = total * batch_size / num_examples
  return state["params"], summary


def _window_scalars(window: train_loop.Window, batch_size: int) -> dict[str, float]:
  """The scalars of one log line.

  Args:
    window: the steps since the last line (host metrics, seconds).
    batch_size: images per step (global).

  Returns:
    train/loss (mean), train/accuracy (fraction of the window's images),
    train/grad_norm (mean), train/learning_rate (the last step's),
    perf/step_time_ms (ms per step), perf/images_per_sec and
    perf/data_wait_fraction (of the wall time).

  Raises:
    FloatingPointError: a loss of the window is NaN or infinite.
  """
  host, elapsed = window.metrics, window.seconds
  losses = [float(m["loss"]) for m in host]
  n = len(host)
  if not all(map(math.isfinite, losses)):
    raise FloatingPointError(f"non-finite loss at step {window.step} (losses "
                             f"{losses[-5:]}); lower optim.learning_rate or use "
                             "model.dtype=float32")
  return {"train/loss": float(np.mean(losses)),
          "train/accuracy": sum(int(m["correct"]) for m in host) / (n * batch_size),
          "train/grad_norm": float(np.mean([m["grad_norm"] for m in host])),
          "train/learning_rate": float(host[-1]["learning_rate"]),
          "perf/step_time_ms": 1000.0 * elapsed / n,
          "perf/images_per_sec": n * batch_size / elapsed,
          "perf/data_wait_fraction": window.data_wait / elapsed}


def evaluate(model_config: mambaout.MambaOutConfig, params, source,
             canvases: Sequence[int], *, batch_size: int = 512, resample: str = "bicubic",
             read_threads: int = 4, mesh: jax.sharding.Mesh | None = None
             ) -> dict[int, dict[str, float]]:
  """Top-1 on every record of `source`, each image fit to each canvas.

  Args:
    model_config: the trained model's (drop path is turned off here).
    params: its parameters (pure dict, host or device arrays).
    source: random-access records {"image", "label", ...}.
    canvases: sides C to evaluate at.
    batch_size: images per step; short last batches are padded (masked), so
      each canvas compiles once. Must split evenly over the mesh.

  Returns:
    {C: {"top1": fraction in [0, 1], "correct": int, "count": int, "seconds": float}}.
  """
  if mesh is None:
    mesh = sharding_lib.make_mesh()
  sharding_lib.local_batch_size(batch_size, mesh)
  graphdef = model_graphdef(dataclasses.replace(model_config, drop_path_rate=0.0))
  params = jax.device_put(params, sharding_lib.replicated(mesh))
  batch_sharding = sharding_lib.batch_sharding(mesh)
  step = jax.jit(make_eval_step(graphdef),
                 in_shardings=(sharding_lib.replicated(mesh),) + (batch_sharding,) * 3)
  results = {}
  for canvas in canvases:
    t0 = time.perf_counter()
    correct, count = [], 0
    for batch in make_eval_dataset(source, canvas, batch_size, resample, read_threads):
      n = len(batch["label"])
      pad = batch_size - n  # Zero images, masked out.
      images = np.pad(batch["image"], ((0, pad), (0, 0), (0, 0), (0, 0)))
      labels = np.pad(batch["label"], (0, pad))
      mask = np.arange(batch_size) < n
      correct.append(step(params, *(jax.device_put(a, batch_sharding)
                                    for a in (images, labels, mask))))
      count += n
    total_correct = int(sum(int(c) for c in jax.device_get(correct)))
    results[int(canvas)] = {"top1": total_correct / max(count, 1), "correct": total_correct,
                            "count": count, "seconds": time.perf_counter() - t0}
    print(f"canvas {canvas}: top-1 {100.0 * results[canvas]['top1']:.2f}% of {count} "
          f"({results[canvas]['seconds']:.1f} s)", flush=True)
  return results


def results_table(results: Mapping[int, Mapping[str, float]], image_size: int) -> str:
  """Markdown: one row of top-1 % per canvas."""
  canvases = sorted(results)
  head = "| trained at | " + " | ".join(f"canvas {c}" for c in canvases) + " |"
  rule = "|---|" + "---|" * len(canvases)
  row = f"| {image_size} | " + " | ".join(f"{100.0 * results[c]['top1']:.2f}"
                                          for c in canvases) + " |"
  return "\n".join([head, rule, row]) + "\n"


def write_results(workdir: str, config: ml_collections.ConfigDict,
                  model_config: mambaout.MambaOutConfig, num_params: int,
                  train_summary: Mapping[str, float] | None,
                  results: Mapping[int, Mapping[str, float]]) -> None:
  """results.json (everything) and results.md (the top-1 table) in the workdir."""
  doc = {"model": dataclasses.asdict(model_config), "num_params": num_params,
         "train_image_size": config.data.image_size, "resample": config.data.resample,
         "test_path": config.data.test_path, "train": dict(train_summary or {}),
         "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
         "eval": {str(c): dict(r) for c, r in sorted(results.items())}}
  # Rewritten after every canvas: a run stopped mid-write keeps the last
  # complete files.
  files.write_atomically(os.path.join(workdir, RESULTS_FILE), json.dumps(doc, indent=2))
  title = (f"MambaOut {model_config.depths} x {model_config.widths}, trained at "
           f"{config.data.image_size}x{config.data.image_size}; top-1 % on "
           f"{config.data.test_path or 'the test set'}, each image fit ({config.data.resample}) "
           "to the canvas\n\n")
  files.write_atomically(os.path.join(workdir, RESULTS_TABLE_FILE),
                         title + results_table(results, config.data.image_size))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       eval_only: bool = False, train_source=None, test_source=None
                       ) -> dict[int, dict[str, float]]:
  """The command line's work: train (unless eval_only), save, evaluate, write.

  Both folders are opened (and their classes checked) before any training,
  so a wrong test path fails in seconds, not after the run.

  Returns:
    `evaluate`'s results (empty when eval_canvases is empty).
  """
  validate_config(config)
  mesh = make_mesh(config)
  model_config = model_config_from(config)
  sharding_lib.local_batch_size(config.eval_batch_size, mesh)
  if test_source is None and config.eval_canvases:
    test_source, test_folder = open_folder(config.data.test_path, config.data.cache_decoded)
  else:
    test_folder = None
  summary = None
  if eval_only:
    model_config, params = load_params(workdir)
  else:
    if train_source is None:
      train_source, train_folder = open_folder(config.data.train_path,
                                               config.data.cache_decoded)
      check_classes(train_folder, test_folder, model_config.num_classes)
    params, summary = train(config, workdir, train_source=train_source, mesh=mesh)
    print(f"params saved to {save_params(workdir, model_config, params)}", flush=True)
  num_params = sum(int(np.size(x)) for x in jax.tree.leaves(params))
  if not config.eval_canvases:
    return {}
  results = {}
  for canvas in config.eval_canvases:
    results.update(evaluate(model_config, params, test_source, (canvas,),
                            batch_size=config.eval_batch_size, resample=config.data.resample,
                            read_threads=config.eval_read_threads or os.cpu_count() or 1,
                            mesh=mesh))
    # After every canvas, so that an evaluation cut off (a time limit, a
    # lost machine) keeps the canvases it scored; each canvas compiles its
    # own step anyway, so one call per canvas costs nothing more.
    write_results(workdir, config, model_config, num_params, summary, results)
  print(f"results in {os.path.join(workdir, RESULTS_FILE)}:\n"
        f"{results_table(results, config.data.image_size)}", end="", flush=True)
  return results


# ----------------------------------------------------------------------------
# Command line.


def _check_overrides(argv: Sequence[str]) -> None:
  """A missing config file or misspelt --config.<field> as one clear error.

  ml_collections would raise a bare AttributeError for the field.
  """
  for i, arg in enumerate(argv):
    if arg == "--config" and i + 1 < len(argv) or arg.startswith("--config="):
      path = (argv[i + 1] if arg == "--config" else arg.split("=", 1)[1]).split(":", 1)[0]
      if not os.path.isfile(path):
        raise ValueError(f"config file {path!r} does not exist "
                         "(--config takes configs/<name>.py[:DATA_ROOT])")
  known = config_fields()
  for arg in argv:
    m = re.match(r"--config\.([\w.]+)", arg)
    if m and m.group(1) not in known:
      raise ValueError(unknown_field_message(m.group(1)))


def run(argv: Sequence[str]) -> int:
  """The command line; errors are one "error: ..." line and exit status 1."""
  config_flag = config_flags.DEFINE_config_file(
      "config", None, "Config file (configs/<name>.py[:DATA_ROOT]).", lock_config=True)
  workdir = flags.DEFINE_string("workdir", None, "Output directory (params, results).")
  eval_only = flags.DEFINE_bool("eval_only", False,
                                "Evaluate the params already in --workdir; no training.")
  flags.DEFINE_bool("verbose", False, "On an error, print the traceback.")
  flags.mark_flags_as_required(["config", "workdir"])

  def parse(args):
    _check_overrides(args)
    try:
      return flags.FLAGS(args)
    except flags.Error as e:
      raise ValueError(str(e)) from e

  def main(args):
    if len(args) > 1:
      raise app.UsageError(f"unexpected arguments: {args[1:]}")
    logging.getLogger().setLevel(logging.WARNING)
    train_and_evaluate(config_flag.value, workdir.value, eval_only=eval_only.value)

  try:
    app.run(main, argv=list(argv), flags_parser=parse)
  except SystemExit as e:
    return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
  except Exception as e:  # pylint: disable=broad-except
    if any(re.fullmatch(r"--verbose(=(true|True|1))?", a) for a in argv):
      raise
    message = " ".join(str(e).split()) or type(e).__name__
    known = isinstance(e, (ValueError, OSError, FloatingPointError, app.UsageError))
    print(f"error: {message if known else f'{type(e).__name__}: {message}'}",
          file=sys.stderr, flush=True)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(run(sys.argv))
