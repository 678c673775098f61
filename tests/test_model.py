"""Model behaviour: sizes, streaming, padding, packing, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mambaeye_jax import model as model_lib


def tiny_model(**overrides):
  fields = dict(depth=2, num_classes=10, d_state=16, headdim=32, chunk_size=16)
  fields.update(overrides)
  return model_lib.MambaEye(model_lib.ModelConfig(**fields), rngs=nnx.Rngs(0))


def random_glimpses(seed, b, t, canvas=200):
  rng = np.random.default_rng(seed)
  patches = jnp.asarray(rng.integers(0, 256, (b, t, 768)), jnp.uint8)
  positions = jnp.asarray(rng.integers(0, canvas - 16, (b, t, 2)), jnp.int32)
  return patches, positions


forward = jax.jit(lambda m, p, q, s=None: m(p, q, s))


@pytest.mark.parametrize("variant,params", [("tiny", 5_769_480), ("small", 10_953_768),
                                            ("base", 21_322_344)])
def test_published_sizes(variant, params):
  # DESIGN.md: Tiny 5.77 M, Small 10.95 M, Base 21.32 M parameters.
  abstract = nnx.eval_shape(lambda: model_lib.MambaEye(model_lib.get_config(variant),
                                                       rngs=nnx.Rngs(0)))
  assert model_lib.count_params(abstract) == params


def test_streaming_equals_parallel():
  model = tiny_model()
  patches, positions = random_glimpses(0, 2, 45)
  parallel = forward(model, patches, positions)
  step = jax.jit(lambda m, p, q, c: m.step(p, q, c))
  cache = model.init_cache(2)
  outs = []
  for t in range(45):
    logits, cache = step(model, patches[:, t], positions[:, t], cache)
    outs.append(logits)
  np.testing.assert_allclose(jnp.stack(outs, 1), parallel, atol=2e-5, rtol=1e-5)
  assert int(cache.steps[0]) == 45


def test_padding_never_changes_real_steps():
  model = tiny_model()
  patches, positions = random_glimpses(1, 1, 30)
  junk_p, junk_q = random_glimpses(2, 1, 10)
  short = forward(model, patches, positions)
  padded = forward(model, jnp.concatenate([patches, junk_p], 1),
                   jnp.concatenate([positions, junk_q], 1))
  np.testing.assert_allclose(padded[:, :30], short, atol=1e-5, rtol=1e-5)


def test_packed_sequences_do_not_interact():
  model = tiny_model()
  pa, qa = random_glimpses(3, 1, 21)
  pb, qb = random_glimpses(4, 1, 19)
  seg = jnp.array([[1] * 21 + [2] * 19])
  packed = forward(model, jnp.concatenate([pa, pb], 1), jnp.concatenate([qa, qb], 1), seg)
  np.testing.assert_allclose(packed[:, :21], forward(model, pa, qa), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(packed[:, 21:], forward(model, pb, qb), atol=1e-5, rtol=1e-5)


def test_reused_segment_ids_still_separate():
  """Ids 1, 1, 2, 1: the last token starts a new sequence, not segment 1 again."""
  model = tiny_model()
  patches, positions = random_glimpses(10, 1, 4)
  out = forward(model, patches, positions, jnp.array([[1, 1, 2, 1]]))
  alone = forward(model, patches[:, 3:], positions[:, 3:])
  np.testing.assert_allclose(out[:, 3], alone[:, 0], atol=1e-5, rtol=1e-5)


def test_moves_not_absolute_positions_matter():
  """Shifting every glimpse's position changes nothing: only moves are seen."""
  model = tiny_model()
  patches, positions = random_glimpses(5, 1, 12)
  np.testing.assert_allclose(forward(model, patches, positions + 7),
                             forward(model, patches, positions), atol=1e-6)
  moved = positions.at[:, 5].add(3)
  assert not np.allclose(forward(model, patches, moved), forward(model, patches, positions))


def test_uint8_and_float_pixels_agree():
  model = tiny_model()
  patches, positions = random_glimpses(6, 1, 8)
  np.testing.assert_allclose(forward(model, patches, positions),
                             forward(model, patches.astype(jnp.float32) / 255.0, positions),
                             atol=1e-6)


def test_bf16_compute_close_to_f32():
  patches, positions = random_glimpses(7, 2, 40)
  f32 = tiny_model()
  bf16 = tiny_model(dtype="bfloat16")
  out32, out16 = forward(f32, patches, positions), forward(bf16, patches, positions)
  assert out16.dtype == jnp.float32
  rel = jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32)
  assert float(rel) < 3e-2


def test_ssd_implementations_agree_in_the_model():
  patches, positions = random_glimpses(8, 1, 33)
  ref = forward(tiny_model(ssd_impl="sequential"), patches, positions)
  for impl in ("chunked", "associative"):
    np.testing.assert_allclose(forward(tiny_model(ssd_impl=impl), patches, positions), ref,
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", [dict(remat=True), dict(scan_layers=True),
                                     dict(remat=True, scan_layers=True)])
def test_remat_and_scanned_layers_give_same_gradients(variant):
  patches, positions = random_glimpses(9, 1, 20)

  def grads(model):
    def loss(m):
      return jnp.mean(m(patches, positions) ** 2)
    return nnx.grad(loss)(model)

  g0 = jax.tree.leaves(grads(tiny_model()))
  g1 = jax.tree.leaves(grads(tiny_model(**variant)))
  for a, b in zip(g0, g1):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_kernel_path_gives_same_gradients():
  # Every Pallas kernel of the block (add + norm with one input copy per
  # in_proj product, conv, SSD, gated norm) in interpret mode, against XLA.
  patches, positions = random_glimpses(10, 2, 32)

  def grads(model):
    def loss(m):
      return jnp.mean(m(patches, positions) ** 2)
    return nnx.grad(loss)(model)

  g0 = jax.tree.leaves(grads(tiny_model(ssd_impl="chunked")))
  g1 = jax.tree.leaves(grads(tiny_model(ssd_impl="pallas_interpret")))
  assert len(g0) == len(g1)
  for a, b in zip(g0, g1):
    assert float(jnp.linalg.norm(a)) > 0
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


def test_config_errors_are_clear():
  with pytest.raises(ValueError, match="unknown MambaEye variant 'huge'"):
    model_lib.get_config("huge")
  with pytest.raises(ValueError, match="dtype='float16'"):
    model_lib.ModelConfig(dtype="float16")
  with pytest.raises(ValueError, match="must be a multiple of self.headdim"):
    model_lib.ModelConfig(headdim=48)
  model = tiny_model()
  with pytest.raises(ValueError, match="patches must be"):
    model(jnp.zeros((1, 4, 700)), jnp.zeros((1, 4, 2), jnp.int32))


def test_initialisation_follows_the_official_model():
  # mamba_ssm's `_init_weights` runs on the backbone only: init_fc and the
  # head keep PyTorch's Linear default, U(+-1/sqrt(fan_in)) for weights and
  # biases alike; the mixer draws A in U(1, 16), dt in [1e-3, 1e-1], D = 1,
  # and out_proj at 1/sqrt(depth) of the default scale.
  model = tiny_model(depth=4, dim=64)
  fc_bias = np.asarray(model.init_fc.bias[...])
  head_bias = np.asarray(model.head.bias[...])
  assert np.abs(fc_bias).max() <= 1 / np.sqrt(1280) and fc_bias.std() > 0.3 / np.sqrt(1280)
  assert np.abs(head_bias).max() <= 1 / np.sqrt(64) and head_bias.std() > 0.3 / np.sqrt(64)
  fc_kernel = np.asarray(model.init_fc.kernel[...])
  assert np.abs(fc_kernel).max() <= 1 / np.sqrt(1280)
  mixer = model.blocks.mixer
  a = np.exp(np.asarray(mixer.A_log[...]))
  assert a.min() >= 1.0 and a.max() <= 16.0
  dt = np.asarray(jax.nn.softplus(mixer.dt_bias[...]))
  assert dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 0.1 * (1 + 1e-4)
  np.testing.assert_array_equal(np.asarray(mixer.D[...]), 1.0)
  out = np.asarray(mixer.out_proj.kernel[...])  # fan_in = d_inner = 128.
  assert np.abs(out).max() <= 1 / np.sqrt(128) / np.sqrt(4) * (1 + 1e-6)
  assert out.std() > 0.9 / np.sqrt(3 * 128 * 4)
