"""Every SSD path against the sequential oracle: outputs and gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import ssd_reference
from mambaeye_jax import ssd as ssd_lib

# (batch, length, heads, headdim, groups, d_state, chunk)
SHAPES = [
    (2, 37, 4, 8, 2, 6, 8),     # odd length, groups > 1
    (1, 64, 2, 16, 1, 8, 16),   # length a multiple of the chunk
    (3, 5, 4, 4, 4, 4, 16),     # length shorter than one chunk, groups == heads
    (1, 100, 6, 8, 3, 16, 32),
]


def make_inputs(seed, b, l, h, p, g, n, segments=False, dtype=jnp.float32):
  keys = jax.random.split(jax.random.PRNGKey(seed), 9)
  inputs = dict(
      x=jax.random.normal(keys[0], (b, l, h, p), dtype),
      dt=jax.random.normal(keys[1], (b, l, h)) - 1.0,
      A=-jnp.exp(jax.random.normal(keys[2], (h,))),
      B=jax.random.normal(keys[3], (b, l, g, n), dtype),
      C=jax.random.normal(keys[4], (b, l, g, n), dtype),
      D=jax.random.normal(keys[5], (h,)),
      dt_bias=jax.random.normal(keys[6], (h,)) * 0.5,
      initial_state=jax.random.normal(keys[7], (b, h, p, n)),
  )
  if segments:
    # Random segment boundaries, ids non-decreasing along each row.
    starts = jax.random.bernoulli(keys[8], 0.1, (b, l)).at[:, 0].set(False)
    inputs["segment_ids"] = jnp.cumsum(starts, axis=1).astype(jnp.int32) + 1
  return inputs


def call(fn, inputs, chunk):
  """fn on a dict of inputs, jitted (eager dispatch of the many small ops is slow)."""
  inputs = dict(inputs)
  args = [inputs.pop(k) for k in ("x", "dt", "A", "B", "C", "D")]
  jitted = jax.jit(functools.partial(fn, dt_softplus=True, return_final_state=True,
                                     chunk_size=chunk))
  return jitted(*args, **inputs)


PATHS = [ssd_reference.ssd_chunked, ssd_reference.ssd_associative]


@pytest.mark.parametrize("fn", PATHS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("segments", [False, True], ids=["plain", "segments"])
def test_forward_matches_oracle(fn, shape, segments):
  *dims, chunk = shape
  inputs = make_inputs(1, *dims, segments=segments)
  y, final = call(fn, inputs, chunk)
  y_ref, final_ref = call(ssd_reference.ssd_sequential, inputs, chunk)
  np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(final, final_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fn", PATHS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("shape", SHAPES[:2], ids=str)
@pytest.mark.parametrize("segments", [False, True], ids=["plain", "segments"])
def test_gradients_match_oracle(fn, shape, segments):
  *dims, chunk = shape
  inputs = make_inputs(2, *dims, segments=segments)
  seg = inputs.pop("segment_ids", None)
  key = jax.random.PRNGKey(3)
  cot_y = jax.random.normal(key, inputs["x"].shape)
  cot_s = jax.random.normal(jax.random.fold_in(key, 1), inputs["initial_state"].shape)

  def loss(f, args):
    y, final = call(f, dict(args, segment_ids=seg) if seg is not None else args, chunk)
    return jnp.sum(y * cot_y) + jnp.sum(final * cot_s)

  grads = jax.grad(lambda a: loss(fn, a))(inputs)
  grads_ref = jax.grad(lambda a: loss(ssd_reference.ssd_sequential, a))(inputs)
  for name in inputs:
    np.testing.assert_allclose(grads[name], grads_ref[name], rtol=2e-3, atol=2e-3,
                               err_msg=f"gradient wrt {name}")


def test_bf16_operands_stay_close():
  inputs = make_inputs(4, 2, 70, 4, 16, 1, 16, dtype=jnp.bfloat16)
  y, _ = call(ssd_reference.ssd_chunked, inputs, 32)
  y_ref, _ = call(ssd_reference.ssd_sequential, inputs, 32)
  assert y.dtype == jnp.bfloat16
  rel = jnp.linalg.norm((y - y_ref).astype(jnp.float32)) / jnp.linalg.norm(y_ref.astype(jnp.float32))
  assert float(rel) < 2e-2


def test_segments_isolate_sequences():
  """Two sequences packed in one row give what each gives alone."""
  a = make_inputs(5, 1, 23, 2, 8, 1, 4)
  b = make_inputs(6, 1, 17, 2, 8, 1, 4)
  keys = ("x", "dt", "B", "C")
  packed = {k: jnp.concatenate([a[k], b[k]], axis=1) for k in keys}
  packed.update(A=a["A"], D=a["D"], dt_bias=a["dt_bias"])
  packed["segment_ids"] = jnp.array([[1] * 23 + [2] * 17])
  for fn in [ssd_reference.ssd_sequential] + PATHS:
    fn = jax.jit(functools.partial(fn, dt_softplus=True, chunk_size=16))
    y = fn(packed["x"], packed["dt"], a["A"], packed["B"], packed["C"], a["D"],
           dt_bias=a["dt_bias"], segment_ids=packed["segment_ids"])
    y_a = fn(a["x"], a["dt"], a["A"], a["B"], a["C"], a["D"], dt_bias=a["dt_bias"])
    y_b = fn(b["x"], b["dt"], a["A"], b["B"], b["C"], a["D"], dt_bias=a["dt_bias"])
    np.testing.assert_allclose(y[:, :23], y_a, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(y[:, 23:], y_b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fn", PATHS, ids=lambda f: f.__name__)
def test_reused_segment_ids_are_new_segments(fn):
  """Ids 0, 1, 0 are three segments: the state resets at every change."""
  inputs = make_inputs(10, 1, 30, 2, 4, 1, 4)
  inputs["segment_ids"] = jnp.array([[0] * 10 + [1] * 10 + [0] * 10])
  y, final = call(fn, inputs, 32)
  y_ref, final_ref = call(ssd_reference.ssd_sequential, inputs, 32)
  np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(final, final_ref, rtol=1e-4, atol=1e-4)


def test_no_full_state_tensor_materialised():
  """The chunked paths never build a (b, l, h, p, n) array."""
  b, l, h, p, g, n, chunk = 1, 256, 2, 8, 1, 16, 64
  inputs = make_inputs(7, b, l, h, p, g, n)
  forbidden = b * l * h * p * n
  for fn in PATHS:
    jaxpr = jax.make_jaxpr(lambda i: jax.grad(
        lambda i2: jnp.sum(call(fn, i2, chunk)[0]))(i))(inputs)
    sizes = [int(np.prod(v.aval.shape)) for eqn in jaxpr.jaxpr.eqns for v in eqn.outvars
             if hasattr(v.aval, "shape")]
    assert max(sizes) < forbidden, f"{fn.__name__} built an array of {max(sizes)} elements"


def test_bad_shapes_named():
  inputs = make_inputs(8, 1, 8, 2, 4, 1, 4)
  with pytest.raises(ValueError, match="dt must be"):
    ssd_reference.ssd_chunked(inputs["x"], inputs["dt"][:, :4], inputs["A"], inputs["B"],
                              inputs["C"])
  with pytest.raises(ValueError, match="multiple of groups"):
    ssd_reference.ssd_chunked(inputs["x"], inputs["dt"], inputs["A"],
                              jnp.ones((1, 8, 3, 4)), jnp.ones((1, 8, 3, 4)))


def test_dispatch_resolves_auto_in_one_place():
  assert ssd_lib.resolve_impl("auto", backend="cpu") is ssd_lib.SSDImpl.CHUNKED
  assert ssd_lib.resolve_impl("associative") is ssd_lib.SSDImpl.ASSOCIATIVE
  with pytest.raises(ValueError, match="unknown SSD implementation 'fast'"):
    ssd_lib.resolve_impl("fast")
  inputs = make_inputs(9, 1, 12, 2, 4, 1, 4)
  args = [inputs[k] for k in ("x", "dt", "A", "B", "C", "D")]
  run = jax.jit(ssd_lib.ssd, static_argnames=("impl", "chunk_size"))
  np.testing.assert_allclose(run(*args, impl="sequential", chunk_size=4),
                             run(*args, impl="auto", chunk_size=4), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", ["chunked", "pallas_interpret"])
def test_packed_b_and_c(impl):
  """ssd(..., B=packed BC, C=None) equals B and C apart, for every impl."""
  ks = jax.random.split(jax.random.PRNGKey(3), 4)
  x = jax.random.normal(ks[0], (1, 32, 2, 16))
  dt = jax.nn.softplus(jax.random.normal(ks[1], (1, 32, 2)) - 2.0)
  A = -jnp.ones((2,))
  bc = jax.random.normal(ks[2], (1, 32, 2, 16))
  want = ssd_lib.ssd(x, dt, A, bc[:, :, :1], bc[:, :, 1:], impl="sequential")
  got = ssd_lib.ssd(x, dt, A, bc, None, impl=impl, chunk_size=16)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="2 \\* groups"):
    ssd_lib.ssd(x, dt, A, bc[:, :, :1], None, impl=impl)
