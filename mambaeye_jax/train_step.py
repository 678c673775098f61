"""The train state and the jitted train step.

Dimension letters: b global batch, T glimpses, K classes.

`create_train_state` builds the state sharded from its abstract shape,
`make_train_step` is one step over the NNX functional API (loss, gradients,
update, metrics), `compile_train_step` jits it with the state donated, and
`summarize` averages a window of step metrics for logging.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mambaeye_jax import glimpse
from mambaeye_jax import loss as loss_lib
from mambaeye_jax import model as model_lib
from mambaeye_jax import model_dir
from mambaeye_jax import sharding as sharding_lib


TrainState = dict  # {"params": tree, "opt_state": tree, "step": () int32, "rng": (2,) uint32}


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


def batch_patches(batch: dict, render: Callable | None = None) -> jax.Array:
  """The batch's patches, gathered on the device when it carries canvases.

  A batch of `DataConfig.ship` "canvas" holds each row's canvas instead of
  its patches; the gather here (`glimpse.extract_patches_jax`) gives the
  workers' patches exactly: corners index the canvas at its top-left, and
  padding steps, which the host leaves zero, are zeroed. A batch of ship
  "source" holds each row's decoded image and transform plan: `render`
  draws the canvases from them first (`device_augment.renderer`).

  Args:
    batch: "patches" (b, T, 768) uint8, or "canvas" (b, S, S, 3) uint8, or
      "source" (b, s, s, 3) uint8 and "plan" (b, P) float32; with
      "positions" (b, T, 2) int32 and "mask" (b, T) bool.
    render: (source, plan) -> (b, S, S, 3) uint8 canvases; needed for
      "source" batches.

  Returns:
    (b, T, 768) uint8.

  Raises:
    ValueError: a "source" batch without `render`.
  """
  if "patches" in batch:
    return batch["patches"]
  if "source" in batch:
    if render is None:
      raise ValueError("a ship='source' batch needs the device renderer: pass render="
                       "device_augment.renderer(canvas_max, blur_kernel)")
    canvas = render(batch["source"], batch["plan"])
  else:
    canvas = batch["canvas"]
  patches = glimpse.extract_patches_jax(canvas, batch["positions"])
  return jnp.where(batch["mask"][..., None], patches, jnp.zeros((), patches.dtype))


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
                    loss: str = "stepwise", render: Callable | None = None) -> Callable:
  """(state, batch) -> (state, metrics), to be jitted.

  batch: the contract's global arrays, (b, T, ...), with "patches" or
  "canvas" (`batch_patches`). metrics: () arrays,
  "loss", "grad_norm", "learning_rate" and the sums of `step_metrics`.
  packed: whether rows may hold several sequences. When they cannot (padded
  batches), the model is not given segment ids: a row's padding comes after
  its real steps, which a causal model never lets it reach, so the ids would
  only cost masking work in the conv and the SSD kernel.
  loss: the objective, one of `loss_lib.LOSSES`.
  render: the canvas renderer of ship "source" batches (`batch_patches`).
  """

  loss_kind = loss
  if loss_kind not in loss_lib.LOSSES:
    raise ValueError(f"unknown loss {loss_kind!r}; known: {', '.join(loss_lib.LOSSES)}")

  def train_step(state: TrainState, batch: dict):
    patches = batch_patches(batch, render)

    def loss_fn(params):
      model = nnx.merge(graphdef, params)
      segment_ids = batch["segment_ids"] if packed else None
      logits = model(patches, batch["positions"], segment_ids)
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
