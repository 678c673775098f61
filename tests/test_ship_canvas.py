"""DataConfig.ship="canvas": batches carry canvases, the train step gathers.

The canvas mode must give the model exactly the patches the workers gather
in the default mode (same seed, same stream), and a training run the same
losses, resumable from its checkpoints.
"""

import os
import signal

import conftest
import jax
import numpy as np
import pytest

from mambaeye_jax import metrics as metrics_lib
from mambaeye_jax import train_data
from mambaeye_jax import train_lib
from mambaeye_jax import train_step
from mambaeye_jax.data import batching
from mambaeye_jax.data import pipeline

pytestmark = pytest.mark.usefixtures("compilation_cache")

SMALL = dict(source="synthetic", synthetic_size=24, batch_size=4,
             num_glimpses=32, canvas_min=32, canvas_max=64, seed=3)
SHARED = ("positions", "ratio", "labels", "mask", "segment_ids")

_device_patches = jax.jit(train_step.batch_patches)


def _assert_same_patches(patch_batch, canvas_batch, canvas_max):
  """The canvas batch, gathered on the device, is the patch batch."""
  assert "patches" not in canvas_batch and "canvas" not in patch_batch
  b = patch_batch["patches"].shape[0]
  assert canvas_batch["canvas"].shape == (b, canvas_max, canvas_max, 3)
  assert canvas_batch["canvas"].dtype == np.uint8
  for k in SHARED:
    np.testing.assert_array_equal(patch_batch[k], canvas_batch[k], err_msg=k)
  got = np.asarray(_device_patches(canvas_batch))
  assert got.dtype == np.uint8
  np.testing.assert_array_equal(got, patch_batch["patches"])


@pytest.mark.parametrize("extra", [
    {},
    # Varying T and rows longer than T: padding steps, which must stay zero.
    {"min_glimpses": 4, "num_glimpses": 20, "seq_len": 24},
    # Canvases that always fill the padded side, and a larger padded side.
    {"canvas_min": 48, "canvas_max": 48},
    {"canvas_min": 16, "canvas_max": 80},
])
def test_canvas_batches_gather_the_host_patches_on_the_device(extra):
  config = {**SMALL, **extra}
  patches = pipeline.make_train_iterator(config)
  canvases = pipeline.make_train_iterator({**config, "ship": "canvas"})
  for _ in range(3):
    a, b = next(patches), next(canvases)
    _assert_same_patches(a, b, config["canvas_max"])
  assert patches.get_state() == canvases.get_state()  # The same stream.


def test_canvas_batches_with_empty_rows():
  """A partial batch (drop_remainder False) pads with all-zero rows."""
  cfg = pipeline.DataConfig(**{**SMALL, "min_glimpses": 5, "num_glimpses": 12})
  source = pipeline.make_source(cfg)
  examples = {}
  for ship in ("patches", "canvas"):
    transform = pipeline.TrainTransform(pipeline.DataConfig.from_any(cfg, ship=ship))
    examples[ship] = [transform.random_map(source[i], np.random.default_rng([7, i]))
                      for i in range(3)]
  (a,) = batching.batch_examples(examples["patches"], batch_size=5, seq_len=16)
  (b,) = batching.batch_examples(examples["canvas"], batch_size=5, seq_len=16,
                                 row_arrays=pipeline.row_arrays(
                                     pipeline.DataConfig.from_any(cfg, ship="canvas")))
  assert not b["canvas"][3:].any() and not a["mask"][3:].any()
  assert not a["mask"][:3].all()  # Some padding steps in the real rows too.
  _assert_same_patches(a, b, cfg.canvas_max)


def test_folder_source_with_cached_images_matches(tmp_path):
  """The CIFAR configuration's source: JPEG folders, decoded once."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(2)
  for i in range(8):
    path = tmp_path / f"c{i % 2}" / f"{i}.jpg"
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (32, 32, 3) if i % 3 else (24, 40, 3)  # One non-square image in three.
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path, "JPEG")
  config = {**SMALL, "source": "folder", "path": str(tmp_path), "batch_size": 4,
            "cache_decoded": True}
  patches = pipeline.make_train_iterator(config)
  canvases = pipeline.make_train_iterator({**config, "ship": "canvas"})
  for _ in range(4):
    _assert_same_patches(next(patches), next(canvases), config["canvas_max"])


def test_ship_errors_are_clear():
  with pytest.raises(ValueError, match=r"ship='canvases' must be one of \('patches', 'canvas', 'source'\)"):
    pipeline.DataConfig(ship="canvases")
  with pytest.raises(ValueError, match="ship='canvas'.*cannot pack"):
    pipeline.DataConfig(ship="canvas", packing=True)
  with pytest.raises(ValueError, match="packing is not supported"):
    batching.BatchIterDataset(None, batch_size=2, seq_len=4, packing=True,
                              row_arrays={"canvas": ((32, 32, 3), np.uint8)})
  c = conftest.fake_train_config(2)
  c.data.ship = "canvases"
  with pytest.raises(ValueError, match="ship='canvases' must be one of"):
    train_lib.validate_config(c)
  c.data.source = "synthetic"
  c.data.ship = "canvas"
  c.data.packing = True
  with pytest.raises(ValueError, match="cannot pack"):
    train_lib.validate_config(c)


def test_canvas_must_fit_the_padded_side():
  cfg = pipeline.DataConfig(**SMALL)
  transform = pipeline.TrainTransform(pipeline.DataConfig.from_any(cfg, ship="canvas"))
  examples = [transform.random_map(pipeline.make_source(cfg)[0], np.random.default_rng(0))]
  with pytest.raises(ValueError, match="canvas .* is not"):
    batching.batch_examples(examples, batch_size=1, seq_len=32,
                            row_arrays={"canvas": ((32, 32, 3), np.uint8)})


def _losses(workdir) -> dict[int, float]:
  return {r["step"]: r["train/loss"] for r in metrics_lib.read_metrics(str(workdir))}


def test_training_in_canvas_mode_matches_and_resumes(tmp_path):
  """Same losses as shipping patches, also across a stop and a resume."""
  c = conftest.fake_train_config(4)
  c.data.source = "synthetic"  # The real Grain pipeline, its state restored.
  train_lib.train_and_evaluate(c, str(tmp_path / "patches"))
  c.data.ship = "canvas"

  def interrupt(step):
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)  # Through the real handler.

  stopped = train_lib.train_and_evaluate(c, str(tmp_path / "canvas"), step_hook=interrupt)
  assert stopped["step"] == 2
  final = train_lib.train_and_evaluate(c, str(tmp_path / "canvas"))
  assert final["step"] == 4
  want, got = _losses(tmp_path / "patches"), _losses(tmp_path / "canvas")
  assert sorted(got) == [1, 2, 3, 4]
  np.testing.assert_allclose([got[s] for s in range(1, 5)], [want[s] for s in range(1, 5)],
                             rtol=1e-6)


def test_fake_batches_in_canvas_mode():
  batch = next(train_data.FakeBatches(2, 4, 3, ship="canvas"))
  assert batch["canvas"].shape == (2, 64, 64, 3) and "patches" not in batch
  assert (batch["positions"] <= 64 - 16).all()
  with pytest.raises(ValueError, match="ship='x' must be one of"):
    train_data.FakeBatches(2, 4, 3, ship="x")
