"""The step-wise ("diffusion-inspired") loss and per-step accuracy.

Dimension letters: b batch, t glimpses, K classes.

    p_t = r_t * onehot(y) + (1 - r_t) / K
    L   = mean over real (b, t) of CE(p_t, logits_t)

r_t, the information ratio, is the fraction of the image covered by the
glimpses up to step t (see `geometry.information_ratio`): early steps are
pulled toward the uniform prior, later ones toward the label.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def stepwise_targets(labels: jax.Array, ratio: jax.Array, num_classes: int) -> jax.Array:
  """Soft targets p_t.

  Args:
    labels: (b, t) int class of the sequence each step belongs to.
    ratio: (b, t) float information ratio in [0, 1].
    num_classes: K.

  Returns:
    (b, t, K) float32.
  """
  ratio = ratio.astype(jnp.float32)[..., None]
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  return ratio * onehot + (1.0 - ratio) / num_classes


def stepwise_cross_entropy(logits: jax.Array, labels: jax.Array,
                           ratio: jax.Array) -> jax.Array:
  """Per-step soft-target cross-entropy, without materialising the targets.

  CE(p, logits) = -sum_k p_k log_softmax_k
                = -(r * logp_y + (1 - r) * mean_k logp_k).

  Args:
    logits: (b, t, K).
    labels: (b, t) int.
    ratio: (b, t) float.

  Returns:
    (b, t) float32 losses.
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  logp_label = jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
  ratio = ratio.astype(jnp.float32)
  return -(ratio * logp_label + (1.0 - ratio) * jnp.mean(logp, axis=-1))


def masked_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Mean of values (b, t) over the steps where mask (b, t) is True."""
  if mask is None:
    return jnp.mean(values)
  mask = mask.astype(jnp.float32)
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def stepwise_loss(logits: jax.Array, labels: jax.Array, ratio: jax.Array,
                  mask: jax.Array | None = None) -> jax.Array:
  """The MambaEye training loss: mean step-wise CE over real steps.

  Args:
    logits: (b, t, K).
    labels: (b, t) int (or (b,), broadcast over t).
    ratio: (b, t) information ratio.
    mask: (b, t) bool real steps, or None (all real).

  Returns:
    () float32.
  """
  if labels.ndim == 1:
    labels = jnp.broadcast_to(labels[:, None], ratio.shape)
  return masked_mean(stepwise_cross_entropy(logits, labels, ratio), mask)


def plain_cross_entropy(logits: jax.Array, labels: jax.Array,
                        mask: jax.Array | None = None) -> jax.Array:
  """Ordinary CE at every step (the paper's ablation baseline): ratio = 1."""
  if labels.ndim == 1:
    labels = jnp.broadcast_to(labels[:, None], logits.shape[:2])
  return masked_mean(stepwise_cross_entropy(logits, labels, jnp.ones(labels.shape)), mask)


# Training objectives: the paper's step-wise loss and its Table 4 ablation,
# ordinary cross-entropy at every step or at the last step of each sequence.
LOSSES = ("stepwise", "ce_every_step", "ce_last_step")


def training_loss(kind: str, logits: jax.Array, labels: jax.Array, ratio: jax.Array,
                  mask: jax.Array | None, last: jax.Array | None = None) -> jax.Array:
  """The training objective `kind` (one of LOSSES).

  Args:
    kind: "stepwise" (soft targets by information ratio), "ce_every_step"
      (ratio 1 at every real step) or "ce_last_step" (ordinary CE at the
      last glimpse of each sequence only, the usual classifier objective).
    logits: (b, t, K).
    labels: (b, t) int (or (b,)).
    ratio: (b, t) information ratio.
    mask: (b, t) bool real steps, or None.
    last: (b, t) bool last real step of each sequence ("ce_last_step").

  Returns:
    () float32.
  """
  if kind == "stepwise":
    return stepwise_loss(logits, labels, ratio, mask)
  if kind == "ce_every_step":
    return plain_cross_entropy(logits, labels, mask)
  if kind == "ce_last_step":
    if last is None:
      raise ValueError("loss 'ce_last_step' needs the last-step mask")
    return plain_cross_entropy(logits, labels, last)
  raise ValueError(f"unknown loss {kind!r}; known: {', '.join(LOSSES)}")


def correct_at_steps(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """(b, t) bool: argmax of logits_t equals the label."""
  if labels.ndim == 1:
    labels = jnp.broadcast_to(labels[:, None], logits.shape[:2])
  return jnp.argmax(logits, axis=-1) == labels
