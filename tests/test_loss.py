"""The step-wise loss against its definition."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mambaeye_jax import loss as loss_lib


def test_matches_explicit_soft_target_cross_entropy():
  key = jax.random.PRNGKey(0)
  logits = jax.random.normal(key, (3, 7, 11)) * 3
  labels = jnp.array([1, 5, 10])
  ratio = jnp.sort(jax.random.uniform(jax.random.fold_in(key, 1), (3, 7)), axis=1)
  targets = loss_lib.stepwise_targets(jnp.broadcast_to(labels[:, None], (3, 7)), ratio, 11)
  np.testing.assert_allclose(targets.sum(-1), 1.0, atol=1e-6)
  explicit = -jnp.sum(targets * jax.nn.log_softmax(logits), axis=-1).mean()
  np.testing.assert_allclose(loss_lib.stepwise_loss(logits, labels, ratio), explicit, rtol=1e-6)


def test_ratio_one_is_plain_cross_entropy_and_zero_is_uniform():
  logits = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 5))
  labels = jnp.array([0, 3])
  ones = jnp.ones((2, 4))
  np.testing.assert_allclose(loss_lib.stepwise_loss(logits, labels, ones),
                             loss_lib.plain_cross_entropy(logits, labels), rtol=1e-6)
  uniform = -jax.nn.log_softmax(logits).mean()
  np.testing.assert_allclose(loss_lib.stepwise_loss(logits, labels, 0 * ones), uniform, rtol=1e-6)


def test_mask_excludes_padding():
  logits = jax.random.normal(jax.random.PRNGKey(2), (1, 6, 4))
  labels = jnp.array([2])
  ratio = jnp.linspace(0, 1, 6)[None]
  mask = jnp.array([[1, 1, 1, 1, 0, 0]], bool)
  garbage = logits.at[:, 4:].set(1e4)
  np.testing.assert_allclose(loss_lib.stepwise_loss(garbage, labels, ratio, mask),
                             loss_lib.stepwise_loss(logits[:, :4], labels, ratio[:, :4]),
                             rtol=1e-6)


def test_training_loss_kinds_of_the_ablation():
  logits = jax.random.normal(jax.random.PRNGKey(3), (2, 5, 4))
  labels = jnp.array([1, 3])
  ratio = jnp.linspace(0, 1, 5)[None].repeat(2, 0)
  mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
  last = jnp.array([[0, 0, 1, 0, 0], [0, 0, 0, 0, 1]], bool)
  np.testing.assert_allclose(
      loss_lib.training_loss("stepwise", logits, labels, ratio, mask),
      loss_lib.stepwise_loss(logits, labels, ratio, mask), rtol=1e-6)
  np.testing.assert_allclose(
      loss_lib.training_loss("ce_every_step", logits, labels, ratio, mask),
      loss_lib.plain_cross_entropy(logits, labels, mask), rtol=1e-6)
  # CE at the last real glimpse only: the mean of two ordinary CEs.
  logp = jax.nn.log_softmax(logits)
  want = -(logp[0, 2, 1] + logp[1, 4, 3]) / 2
  np.testing.assert_allclose(
      loss_lib.training_loss("ce_last_step", logits, labels, ratio, mask, last), want,
      rtol=1e-6)
  with pytest.raises(ValueError, match="known: stepwise"):
    loss_lib.training_loss("focal", logits, labels, ratio, mask)
