"""MAC counts of traced functions: dots, convolutions, nesting, scans, MambaEye."""

import conftest
import jax
import jax.numpy as jnp
from flax import nnx

from mambaeye_jax import macs
from mambaeye_jax import model as mambaeye_model


def _spec(*shape, dtype=jnp.float32):
  return jax.ShapeDtypeStruct(shape, dtype)


def test_dot_counts_output_times_contraction():
  # (3, 5) @ (5, 7): 21 outputs of 5 products; a batched einsum likewise.
  assert macs.traced_macs(jnp.dot, _spec(3, 5), _spec(5, 7)) == 3 * 7 * 5
  assert macs.traced_macs(lambda a, b: jnp.einsum("bij,bjk->bik", a, b),
                          _spec(2, 3, 4), _spec(2, 4, 6)) == 2 * 3 * 6 * 4


def test_conv_counts_kernel_window_and_groups():
  def conv(x, w, groups):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", feature_group_count=groups,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
  # 8x8 outputs of 6 channels, each summing 3x3 taps of 4 input channels.
  assert macs.traced_macs(lambda x, w: conv(x, w, 1), _spec(1, 8, 8, 4),
                          _spec(3, 3, 4, 6)) == 8 * 8 * 6 * 3 * 3 * 4
  # Depthwise: each output sums its own channel's 3x3 taps only.
  assert macs.traced_macs(lambda x, w: conv(x, w, 4), _spec(1, 8, 8, 4),
                          _spec(3, 3, 1, 4)) == 8 * 8 * 4 * 3 * 3


def test_elementwise_is_free_and_nested_and_scanned_work_counts():
  assert macs.traced_macs(lambda a: jnp.tanh(a) * a + 1, _spec(16, 16)) == 0
  assert macs.traced_macs(jax.jit(jnp.dot), _spec(3, 5), _spec(5, 7)) == 105

  def scanned(w, xs):
    return jax.lax.scan(lambda c, x: (c @ w + x, None), xs[0], xs)[0]
  # Nine iterations of a (4,) @ (4, 4) product.
  assert macs.traced_macs(scanned, _spec(4, 4), _spec(9, 4)) == 9 * 4 * 4


def test_mambaeye_cost_is_linear_in_glimpses_past_one_chunk():
  config = mambaeye_model.get_config("tiny", depth=2, num_classes=10, chunk_size=32,
                                     ssd_impl="chunked")
  graphdef, state = nnx.split(nnx.eval_shape(
      lambda: mambaeye_model.MambaEye(config, rngs=nnx.Rngs(0))))

  def count(t):
    return macs.traced_macs(lambda s, p, q: nnx.merge(graphdef, s)(p, q), state,
                            _spec(1, t, 768, dtype=jnp.uint8), _spec(1, t, 2, dtype=jnp.int32))
  one, two, four = count(32), count(64), count(128)
  assert two == 2 * one and four == 4 * one
  # Most of it is the parameters' products: each glimpse multiplies every
  # projection weight once (embedding, in/out projections, head).
  params = mambaeye_model.count_params(nnx.merge(graphdef, state))
  assert 0.5 * params < one / 32 < 2 * params
  # Shorter than a chunk: the projections run on the 8 glimpses, the SSD on
  # the padded chunk, so a glimpse costs more than in whole chunks.
  assert one / 4 < count(8) < one


def test_compute_per_image_table():
  script = conftest.load_benchmark("compute_per_image")
  eye, out = script.main(["--glimpses", "128,256", "--canvases", "32,64", "--mambaeye", "tiny"])
  assert eye[256] == 2 * eye[128]  # Linear in glimpses, whatever the canvas.
  assert 3.5 < out[64] / out[32] < 4.5  # MambaOut grows with the pixels.
