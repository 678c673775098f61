"""The optimiser: decay mask, schedule and clipping of the official recipe."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mambaeye_jax import model as model_lib
from mambaeye_jax import optim


def small_params():
  config = model_lib.get_config("tiny", depth=2, dim=32, d_state=8, headdim=32,
                                num_classes=10, chunk_size=8)
  model = model_lib.MambaEye(config, rngs=nnx.Rngs(0))
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def test_decay_mask_follows_mamba_ssm():
  mask = optim.decay_mask(small_params())
  flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
  decayed = sorted(k for k, v in flat.items() if v)
  assert decayed == sorted([
      "['blocks']['mixer']['conv_kernel']", "['blocks']['mixer']['in_proj']['kernel']",
      "['blocks']['mixer']['out_proj']['kernel']", "['head']['kernel']",
      "['init_fc']['kernel']"])
  for name in ("A_log", "D", "dt_bias", "conv_bias"):
    assert flat[f"['blocks']['mixer']['{name}']"] is False


def test_schedule_warms_up_then_follows_the_cosine():
  config = optim.OptimConfig(learning_rate=1e-3, warmup_steps=20, total_steps=300)
  lr = optim.learning_rate_schedule(config)
  assert float(lr(0)) == 0.0
  np.testing.assert_allclose(float(lr(10)), 5e-4, rtol=1e-6)
  np.testing.assert_allclose(float(lr(20)), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(float(lr(160)), 5e-4, rtol=1e-5)  # Cosine midpoint.
  np.testing.assert_allclose(float(lr(300)), 0.0, atol=1e-9)


def test_adamw_step_decays_only_masked_weights_and_clips():
  params = {"layer": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}, "A_log": jnp.ones((3,))}
  config = optim.OptimConfig(learning_rate=0.1, weight_decay=0.5, warmup_steps=0,
                             total_steps=10, clip_norm=1.0)
  tx = optim.make_optimizer(config)
  state = tx.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, state, params)
  # Zero gradients: only decoupled decay moves anything, lr * wd * p.
  np.testing.assert_allclose(updates["layer"]["kernel"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
  np.testing.assert_array_equal(updates["layer"]["bias"], 0.0)
  np.testing.assert_array_equal(updates["A_log"], 0.0)
  # Huge gradients are clipped to global norm 1 before Adam (which then
  # normalises them anyway; check the clip itself).
  clip = optax.clip_by_global_norm(1.0)
  big = jax.tree.map(lambda p: 1e6 * jnp.ones_like(p), params)
  clipped, _ = clip.update(big, clip.init(params))
  np.testing.assert_allclose(optax.tree.norm(clipped), 1.0, rtol=1e-5)


def test_bad_optim_config_names_the_field():
  with pytest.raises(ValueError, match="warmup_steps"):
    optim.OptimConfig(warmup_steps=20, total_steps=10)
  with pytest.raises(ValueError, match="learning_rate"):
    optim.OptimConfig(learning_rate=0.0)


def test_decay_all_decays_every_parameter_as_torch_adamw():
  params = {"layer": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}, "A_log": jnp.ones((3,))}
  config = optim.OptimConfig(learning_rate=0.1, weight_decay=0.5, warmup_steps=0,
                             total_steps=10, decay="all")
  tx = optim.make_optimizer(config)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  for leaf in jax.tree.leaves(updates):
    np.testing.assert_allclose(leaf, -0.1 * 0.5, rtol=1e-6)
  with pytest.raises(ValueError, match="decay"):
    optim.OptimConfig(decay="biases")
