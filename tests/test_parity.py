"""The whole model against the official PyTorch outputs in ../shared/golden.

Every pair official_<name>.pt + official_<name>_io.npz in MAMBAEYE_GOLDEN_DIR
is checked, in float32 on the CPU: the glimpse tensors rebuilt from the
canvas, the logits of the converted weights and the step-wise loss.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mambaeye_jax import checkpoint
from mambaeye_jax import glimpse
from mambaeye_jax import loss as loss_lib
from mambaeye_jax.data import geometry


def _sample(npz_path):
  data = dict(np.load(npz_path))
  positions = np.stack([data["rows"], data["cols"]], axis=1).astype(np.int32)
  box = geometry.ImageBox(int(data["row_offset"]), int(data["col_offset"]),
                         int(data["img_h"]), int(data["img_w"]))
  return data, positions, box


def test_glimpse_tensors_match(golden):
  _, _, npz = golden
  data, positions, box = _sample(npz)
  canvas = data["canvas"].transpose(1, 2, 0)  # (3, H, W) -> (H, W, 3)
  np.testing.assert_array_equal(geometry.extract_patches(canvas, positions),
                                data["img_sequence"])
  device_patches = glimpse.extract_patches_jax(jnp.asarray(canvas)[None],
                                               jnp.asarray(positions)[None])[0]
  np.testing.assert_array_equal(np.asarray(device_patches), data["img_sequence"])
  np.testing.assert_allclose(geometry.information_ratio(positions, box),
                             data["information_ratio"], rtol=0, atol=1e-6)
  moves = geometry.moves_from_positions(positions)
  np.testing.assert_allclose(geometry.move_embedding(moves), data["move_embedding"],
                             rtol=0, atol=1e-4)
  in_jit = glimpse.move_embedding_jax(
      glimpse.moves_from_positions_jax(jnp.asarray(positions)[None]))[0]
  np.testing.assert_allclose(np.asarray(in_jit), data["move_embedding"], rtol=0, atol=1e-4)


# The whole model through the plain-XLA SSD and through the Pallas kernel
# (compiled on an accelerator, the kernel's own logic interpreted on the CPU).
_KERNEL_IMPL = "pallas_interpret" if jax.default_backend() == "cpu" else "pallas"


@pytest.mark.parametrize("ssd_impl", ["chunked", _KERNEL_IMPL])
def test_logits_and_loss_match(golden, ssd_impl):
  _, pt, npz = golden
  data, positions, _ = _sample(npz)
  model = checkpoint.load_model(pt, ssd_impl=ssd_impl)
  with jax.default_matmul_precision("highest"):
    logits = jax.jit(lambda m, p, q: m(p, q))(
        model, jnp.asarray(data["img_sequence"])[None], jnp.asarray(positions)[None])
  err = float(jnp.max(jnp.abs(logits - data["logits"])))
  print(f"golden {golden[0]} via {ssd_impl}: logits max abs error {err:.2e}")
  assert err < 2e-3
  loss = loss_lib.stepwise_loss(logits, jnp.asarray(data["label"]),
                                jnp.asarray(data["information_ratio"])[None])
  np.testing.assert_allclose(float(loss), float(data["loss"]), rtol=1e-5)


def test_streaming_matches_official(golden):
  """The constant-memory step function reproduces the official logits too."""
  _, pt, npz = golden
  data, positions, _ = _sample(npz)
  model = checkpoint.load_model(pt)
  num_steps = 40  # a prefix keeps the test fast; the recurrence is the same.
  with jax.default_matmul_precision("highest"):
    step = jax.jit(lambda m, p, q, c: m.step(p, q, c))
    cache = model.init_cache(1)
    for t in range(num_steps):
      logits, cache = step(model, jnp.asarray(data["img_sequence"][t])[None],
                           jnp.asarray(positions[t])[None], cache)
      np.testing.assert_allclose(np.asarray(logits[0]), data["logits"][0, t], atol=2e-3)
