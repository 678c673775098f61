"""MambaOut baseline: sizes, shapes, gradients, the block formula, dtypes."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mambaeye_jax import macs
from mambaeye_jax import mambaout

# The compiled tests' model: a stem, two stages of one block (so one
# downsample) and the head, the parts every preset repeats; compile time on a
# CPU grows with the block count. The presets' four-stage geometry is checked
# by tracing them (test_output_shapes, test_forward_macs_...).
TINY = mambaout.MambaOutConfig(depths=(1, 1), widths=(8, 16), num_classes=10)


@functools.cache
def _builder(config):
  # Under jit (eager init dispatches each initializer op on its own), one
  # compile per config whatever the seed. The unsafe_rbg keys compile a few
  # times faster on a CPU than the default threefry, for the same model.
  return nnx.jit(lambda seed: mambaout.MambaOut(
      config, rngs=nnx.Rngs(jax.random.key(seed, impl="unsafe_rbg"))))


def build(config, seed=0):
  return _builder(config)(jnp.int32(seed))


def with_params(config, source):
  """A model of config holding source's parameters (no initialisation)."""
  model = nnx.eval_shape(lambda: mambaout.MambaOut(config, rngs=nnx.Rngs(0)))
  nnx.update(model, params_of(source))
  return model


def random_images(seed, b, h, w):
  return jnp.asarray(np.random.default_rng(seed).random((b, h, w, 3)), jnp.float32)


def params_of(model):
  return nnx.state(model, nnx.Param)


forward = jax.jit(lambda m, x: m(x))


@pytest.fixture(scope="module")
def tiny():
  return build(TINY)


@pytest.fixture(scope="module")
def pico():
  # Four stages like every paper size, and the fewest blocks to trace.
  return nnx.eval_shape(lambda: mambaout.MambaOut(mambaout.get_config("pico"),
                                                  rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("variant,params,millions", [
    ("femto", 7_304_536, 7.3), ("kobe", 9_141_208, 9.1), ("tiny", 26_545_096, 26.5),
    ("pico", 2_497_484, 2.5)])
def test_published_sizes(variant, params, millions):
  # The original's published parameter counts at 1000 classes, in millions to
  # 0.1 M (Femto 7.3 M: 7.25e6 <= count < 7.35e6); pico is this project's own
  # size. Small (48,488,072) and Base (84,813,092) match 48.5 and 84.8 M too,
  # but take seconds to trace.
  abstract = nnx.eval_shape(lambda: mambaout.MambaOut(mambaout.get_config(variant),
                                                      rngs=nnx.Rngs(0)))
  count = mambaout.param_count(abstract)
  assert count == params
  assert round(count / 1e6, 1) == millions


@pytest.mark.parametrize("height,width", [(32, 32), (48, 48), (64, 64), (40, 72), (37, 64)])
def test_output_shapes(pico, height, width):
  logits, feats = jax.eval_shape(lambda m, x: (m(x), m.features(x)), pico,
                                 jax.ShapeDtypeStruct((2, height, width, 3), jnp.float32))
  assert logits.shape == (2, 1000) and logits.dtype == jnp.float32
  assert feats.shape == (2, -(-height // 32), -(-width // 32), 192)


def test_runs_at_any_size(tiny):
  for height, width in (32, 32), (40, 72):
    logits = forward(tiny, random_images(0, 2, height, width))
    assert logits.shape == (2, TINY.num_classes) and bool(jnp.all(jnp.isfinite(logits)))


def test_uint8_is_scaled_to_unit_range(tiny):
  pixels = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3)), jnp.uint8)
  np.testing.assert_allclose(forward(tiny, pixels),
                             forward(tiny, pixels.astype(jnp.float32) / 255.0),
                             atol=1e-6, rtol=1e-6)


def test_rejects_channels_first(tiny):
  with pytest.raises(ValueError, match="height, width, 3"):
    jax.eval_shape(lambda m, x: m(x), tiny, jax.ShapeDtypeStruct((1, 3, 32, 32), jnp.float32))


def _loss_of_logits(logits, labels):
  """Mean cross-entropy; logits (b, K), labels (b,) int."""
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))


def test_gradients_match_finite_differences(tiny):
  # float64 compute, so that a small step's central difference is exact to
  # ~1e-8 (errors seen <= 2e-8): in float32 the stem's 4-channel LayerNorm
  # bends the loss too much within a step large enough to rise above rounding. One random direction
  # per parameter array: the difference along it against the gradient's
  # projection on it. (Also checks every array's gradient is finite, nonzero.)
  with jax.enable_x64(True):
    model = with_params(dataclasses.replace(TINY, dtype="float64"), tiny)
    graphdef, params = nnx.split(model)
    params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
    images = random_images(3, 2, 32, 32).astype(jnp.float64)  # Stem 8 x 8, stage 2 4 x 4.
    labels = jnp.array([3, 5])

    @jax.jit
    def loss(p):
      return _loss_of_logits(nnx.merge(graphdef, p)(images), labels)

    grads = jax.jit(jax.grad(loss))(params)
    assert_finite_nonzero_grads(grads, tiny)
    # numpy from here: jnp's eager ops would compile once per leaf shape.
    flat, treedef = jax.tree.flatten(jax.tree.map(np.asarray, params))
    flat_grads = [np.asarray(g) for g in jax.tree.leaves(grads)]
    rng = np.random.default_rng(0)
    eps = 1e-5
    for i, (p, g) in enumerate(zip(flat, flat_grads)):
      v = rng.standard_normal(p.shape)
      v /= np.linalg.norm(v)
      shifted = [jax.tree.unflatten(treedef, flat[:i] + [p + s * eps * v] + flat[i + 1:])
                 for s in (1.0, -1.0)]
      numeric = (float(loss(shifted[0])) - float(loss(shifted[1]))) / (2 * eps)
      analytic = float(np.vdot(g, v))
      assert abs(numeric - analytic) <= 1e-7 + 1e-5 * abs(analytic), (i, numeric, analytic)


def _layer_norm(x, scale, bias):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / jnp.sqrt(var + 1e-6) * scale + bias


def _gelu(x):
  return 0.5 * x * (1.0 + jax.scipy.special.erf(x / np.sqrt(2.0)))


@jax.jit
def _gated_block_reference(x, p):
  """The block's formula in plain jnp; p: the block's parameters by name."""
  d = x.shape[-1]
  e = int(8 / 3 * d)
  h = _layer_norm(x, p["norm_scale"], p["norm_bias"]) @ p["fc1_kernel"] + p["fc1_bias"]
  g, i, c = h[..., :e], h[..., e:2 * e - d], h[..., 2 * e - d:]
  # Depthwise 7x7 with padding 3, as a sum of 49 shifted copies.
  rows, cols = x.shape[1:3]
  padded = jnp.pad(c, ((0, 0), (3, 3), (3, 3), (0, 0)))
  conv = sum(padded[:, dy:dy + rows, dx:dx + cols, :] * p["conv_kernel"][dy, dx, 0]
             for dy in range(7) for dx in range(7)) + p["conv_bias"]
  gated = _gelu(g) * jnp.concatenate([i, conv], -1)  # (b, h, w, e)
  return x + gated @ p["fc2_kernel"] + p["fc2_bias"]


def test_gated_block_matches_formula():
  dim = 6  # e = 16: g, i, c have 16, 10, 6 channels.
  block = mambaout.GatedCNNBlock(dim, jnp.float32, rngs=nnx.Rngs(0))
  assert block.fc1.kernel.shape == (6, 32) and block.fc2.kernel.shape == (16, 6)
  # Nonzero biases and norm affine terms, so that each one's place is checked.
  rng = np.random.default_rng(0)
  params = {}
  for path, var in nnx.iter_graph(block):
    if isinstance(var, nnx.Param):
      var[...] = jnp.asarray(rng.normal(0.0, 0.3, var.shape), jnp.float32)
      params["_".join(str(k) for k in path)] = var[...]
  x = jnp.asarray(rng.normal(size=(2, 5, 9, dim)), jnp.float32)
  np.testing.assert_allclose(nnx.jit(lambda b, x: b(x))(block, x),
                             _gated_block_reference(x, params), atol=2e-5, rtol=2e-5)


def test_same_rngs_same_model(tiny):
  again, other = build(TINY, 0), build(TINY, 1)
  images = random_images(4, 2, 32, 32)
  for x, y in zip(jax.tree.leaves(params_of(tiny)), jax.tree.leaves(params_of(again))):
    np.testing.assert_array_equal(x, y)
  np.testing.assert_array_equal(forward(tiny, images), forward(again, images))
  assert not np.allclose(forward(tiny, images), forward(other, images))


def assert_finite_nonzero_grads(grads, model):
  leaves = jax.tree.leaves_with_path(nnx.state(grads, nnx.Param))
  assert len(leaves) == len(jax.tree.leaves(params_of(model)))
  for path, g in leaves:
    # numpy: jnp's eager ops would compile once per leaf shape (seconds).
    g = np.asarray(g, np.float32)
    name = jax.tree_util.keystr(path)
    assert np.all(np.isfinite(g)), name
    assert np.max(np.abs(g)) > 0, name


def test_bfloat16_compute_and_gradients(tiny):
  # Mixed precision is the training path: its gradients are checked for every
  # parameter array too (float64's are in the finite-difference test; one
  # gradient compile per dtype is most of this file's run time).
  config = dataclasses.replace(TINY, dtype="bfloat16")
  abstract = nnx.eval_shape(lambda: mambaout.MambaOut(config, rngs=nnx.Rngs(0)))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params_of(abstract)))
  model = with_params(config, tiny)
  images, labels = random_images(5, 2, 32, 32), jnp.array([1, 7])

  def loss(m):
    logits = m(images)
    return _loss_of_logits(logits, labels), logits

  (_, logits), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
  assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
  # The same float32 parameters: only the rounding differs.
  np.testing.assert_allclose(logits, forward(tiny, images), atol=0.05)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
  assert_finite_nonzero_grads(grads, tiny)


def test_drop_path(tiny):
  model = build(dataclasses.replace(TINY, drop_path_rate=0.5))
  # The parameters do not depend on the rate.
  for x, y in zip(jax.tree.leaves(params_of(model)), jax.tree.leaves(params_of(tiny))):
    np.testing.assert_array_equal(x, y)
  # Rates rise linearly from 0: only the last of TINY's two blocks drops.
  assert model.stages[0][0].drop_path is None
  assert model.stages[-1][-1].drop_path.rate == 0.5
  images = random_images(6, 2, 32, 32)
  step = nnx.jit(lambda m, x: m(x))
  calls = [step(model, images) for _ in range(4)]
  assert not all(np.allclose(calls[0], c) for c in calls[1:])  # A fresh mask each call.
  model.eval()
  np.testing.assert_allclose(step(model, images), forward(tiny, images), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("config", [TINY, mambaout.get_config("femto")], ids=["tiny", "femto"])
def test_forward_macs_counts_the_traced_products(config):
  model = nnx.eval_shape(lambda: mambaout.MambaOut(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(
      state, jax.ShapeDtypeStruct((1, 40, 72, 3), jnp.float32))
  assert macs.jaxpr_macs(jaxpr) == mambaout.forward_macs(config, 40, 72)


@pytest.mark.parametrize("fields,match", [
    (dict(dtype="float16"), "dtype"),
    (dict(depths=(1, 1), widths=(8, 16, 24)), "one width per stage"),
    (dict(depths=(), widths=()), "at least one stage"),
    (dict(depths=(1, 0)), "every stage"),
    (dict(widths=(9, 16)), "must be even"),
    (dict(num_classes=0), "num_classes"),
    (dict(drop_path_rate=1.0), "drop_path_rate"),
])
def test_config_validation(fields, match):
  base = dict(depths=(1, 1), widths=(8, 16))
  base.update(fields)
  with pytest.raises(ValueError, match=match):
    mambaout.MambaOutConfig(**base)


def test_rng_streams():
  # A params-only Rngs is enough without drop path; drop path needs a stream.
  nnx.eval_shape(lambda: mambaout.MambaOut(TINY, rngs=nnx.Rngs(params=0)))
  dropping = dataclasses.replace(TINY, drop_path_rate=0.1)
  with pytest.raises(ValueError, match="needs a 'dropout' or default rng stream"):
    nnx.eval_shape(lambda: mambaout.MambaOut(dropping, rngs=nnx.Rngs(params=0)))
  nnx.eval_shape(lambda: mambaout.MambaOut(dropping, rngs=nnx.Rngs(params=0, dropout=1)))


def test_config_lists_become_tuples_and_variants():
  config = mambaout.MambaOutConfig(depths=[1, 2], widths=[8, 16])
  assert config.depths == (1, 2) and hash(config) is not None
  assert mambaout.get_config("femto", num_classes=10).num_classes == 10
  with pytest.raises(ValueError, match="unknown MambaOut variant"):
    mambaout.get_config("kobe-mini")
