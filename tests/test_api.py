"""The public API: image -> glimpses -> logits, and compiled streaming."""

import subprocess
import sys

import conftest
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import mambaeye_jax
from mambaeye_jax import checkpoint
from mambaeye_jax import eval_workers
from mambaeye_jax import model as model_lib
from mambaeye_jax import model_dir
from mambaeye_jax.data import geometry
from mambaeye_jax.data import glimpses


def tiny_model(seed: int = 0) -> model_lib.MambaEye:
  """A tiny MambaEye with random parameters, drawn directly (the eager
  initialisation of `MambaEye(...)` takes seconds on a busy CPU)."""
  config = model_lib.ModelConfig(depth=2, dim=32, num_classes=10, d_state=16,
                                 headdim=16, chunk_size=8)
  params = conftest.random_params(config, seed)
  return model_dir.model_from_params(config, params)


def test_import_is_light_and_exports_resolve():
  # `import mambaeye_jax` must not pull JAX, orbax or PIL in.
  code = ("import sys, mambaeye_jax; "
          "print(sorted(m for m in ('jax', 'orbax', 'PIL') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, check=True).stdout.strip()
  assert out == "[]"
  assert mambaeye_jax.glimpses_from_image is glimpses.glimpses_from_image
  assert mambaeye_jax.load_model is checkpoint.load_model
  assert mambaeye_jax.MambaEye is model_lib.MambaEye
  with pytest.raises(AttributeError, match="no attribute 'nope'"):
    mambaeye_jax.nope  # pylint: disable=pointless-statement


def test_glimpses_from_image_matches_eval_pipeline(tmp_path):
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (30, 70, 3), np.uint8)
  g = mambaeye_jax.glimpses_from_image(pixels, canvas_size=48, resize="fit",
                                       scan="random", num_glimpses=20, seed=3,
                                       index=5)
  assert g.patches.shape == (20, 768) and g.patches.dtype == np.uint8
  assert g.positions.shape == (20, 2) and g.positions.dtype == np.int32
  assert g.canvas.shape == (48, 48, 3)
  np.testing.assert_array_equal(g.patches, geometry.extract_patches(g.canvas, g.positions))
  # The same canvas and corners as eval.py's dataset mode for example 5.
  setting = eval_workers.Setting(48, "fit", "random", 20)
  canvas, positions, box = eval_workers.prepare_example(
      {"image": pixels, "label": 0}, setting, seed=3, index=5)
  np.testing.assert_array_equal(g.canvas, canvas)
  np.testing.assert_array_equal(g.positions, positions)
  assert g.box == box
  # A path, a PIL image and an array give the same glimpses.
  path = tmp_path / "photo.png"
  Image.fromarray(pixels).save(path)
  for image in (str(path), path, Image.fromarray(pixels)):
    again = mambaeye_jax.glimpses_from_image(image, canvas_size=48, num_glimpses=20,
                                             seed=3, index=5)
    np.testing.assert_array_equal(again.patches, g.patches)


def test_glimpses_from_image_errors(tmp_path):
  pixels = np.zeros((20, 20, 3), np.uint8)
  with pytest.raises(ValueError, match="unknown scan pattern 'zigzagzoom'.*hilbert"):
    mambaeye_jax.glimpses_from_image(pixels, scan="zigzagzoom")
  with pytest.raises(ValueError, match="unknown resize mode 'crop'"):
    mambaeye_jax.glimpses_from_image(pixels, resize="crop")
  with pytest.raises(ValueError, match="num_glimpses=0"):
    mambaeye_jax.glimpses_from_image(pixels, num_glimpses=0)
  with pytest.raises(FileNotFoundError, match="nope.jpg does not exist"):
    mambaeye_jax.glimpses_from_image(str(tmp_path / "nope.jpg"))
  bad = tmp_path / "bad.jpg"
  bad.write_bytes(b"\xff\xd8\xff garbage")
  with pytest.raises(ValueError, match="bad.jpg"):
    mambaeye_jax.glimpses_from_image(str(bad))


def test_compiled_streaming_equals_parallel_forward():
  model = tiny_model()
  rng = np.random.default_rng(1)
  b, t = 2, 11
  patches = rng.integers(0, 256, (b, t, 768), np.uint8)
  positions = rng.integers(0, 100, (b, t, 2)).astype(np.int32)
  # The compiled parallel forward (eager `model(...)` is the same function,
  # seconds slower on a CPU).
  parallel = np.asarray(model.jit_forward()(patches, positions))
  step = model.jit_step()
  cache = model.init_cache(b)
  streamed = []
  for i in range(t):
    logits, cache = step(patches[:, i], positions[:, i], cache)
    streamed.append(logits)
  np.testing.assert_allclose(np.stack(streamed, 1), parallel, atol=1e-5, rtol=1e-5)
  assert int(cache.steps[0]) == t
  # One compilation for every step, and for a second jit_step of the model.
  compiled = model_lib._compiled_step(nnx.graphdef(model))  # pylint: disable=protected-access
  model.jit_step()(patches[:, 0], positions[:, 0], model.init_cache(b))
  assert compiled._cache_size() == 1  # pylint: disable=protected-access
  # Pieces of the sequence continue from each other's cache.
  first, cache = model.stream(patches[:, :4], positions[:, :4])
  rest, cache = model.stream(patches[:, 4:], positions[:, 4:], cache)
  np.testing.assert_allclose(np.concatenate([first, rest], 1), parallel,
                             atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="patches must be"):
    model.stream(patches[0], positions[0])
