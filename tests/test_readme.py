"""The README's Python usage block runs as written."""

import os
import re
import time

import conftest
import numpy as np
from PIL import Image

from mambaeye_jax import model as model_lib
from mambaeye_jax import model_dir

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_python_blocks() -> list[str]:
  with open(os.path.join(REPO_ROOT, "README.md")) as f:
    text = f.read()
  return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def tiny_params(seed: int = 0):
  """A tiny config and random parameters of its shapes: (config, params).

  Drawn directly (`MambaEye(...)`'s eager initialisation takes seconds).
  """
  config = model_lib.ModelConfig(depth=1, dim=32, num_classes=10, d_state=16,
                                 headdim=16, chunk_size=16)
  params = conftest.random_params(config, seed)
  return config, params


def test_readme_usage_block_runs(tmp_path, monkeypatch):
  blocks = readme_python_blocks()
  assert blocks, "README.md has no ```python block"
  # The block's files, in a scratch working directory: a photo, and in
  # place of the official checkpoint a tiny random model directory (the
  # only substitution: the checkpoint path; loading goes through the same
  # `load_model`).
  monkeypatch.chdir(tmp_path)
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (90, 120, 3), np.uint8)).save("photo.jpg")
  config, params = tiny_params()
  model_dir.save_params("tiny_model", config, params)
  for block in blocks:
    assert '"mambaeye_tiny.pt"' in block
    code = block.replace('"mambaeye_tiny.pt"', '"tiny_model"')
    namespace = {"__name__": "readme"}
    start = time.perf_counter()
    exec(compile(code, "README.md", "exec"), namespace)  # pylint: disable=exec-used
    # The streaming loop is compiled: T steps of a tiny model in seconds.
    assert time.perf_counter() - start < 60
    T, batch = namespace["T"], namespace["batch"]
    assert namespace["patches"].shape == (batch, T, 768)
    assert namespace["positions"].shape == (batch, T, 2)
    # The streamed logits after the last glimpse are the parallel forward's.
    np.testing.assert_allclose(namespace["logits_t"], namespace["logits"][:, -1],
                               atol=1e-4, rtol=1e-4)
