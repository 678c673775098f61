"""MambaOut baseline trainer: decay mask, transforms, overfitting, the whole run, errors.

Every compiled test uses one tiny MambaOut (a stem, two stages of one block,
widths 8 and 16) on a generated folder of 48 images of 3 classes (CIFAR's
layout root/<split>/<class>/<n>.png), so the module runs in seconds on a CPU.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from mambaeye_jax import mambaout
from mambaeye_jax import mambaout_train
from mambaeye_jax import optim
from mambaeye_jax import sharding

# The eval-only rerun and the states' initialisation compile the same
# programs again: the persistent cache makes those hits.
pytestmark = pytest.mark.usefixtures("compilation_cache")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ("cat", "dog", "ship")
TINY_MODEL = {"depths": (1, 1), "widths": (8, 16), "num_classes": len(CLASSES),
              "dtype": "float32"}


@pytest.fixture(scope="module", autouse=True)
def fast_init_keys():
  """unsafe_rbg keys: the parameter initialisation compiles ~4x faster on a
  CPU than with threefry (as tests/test_mambaout.py); the trainer itself
  keeps JAX's default."""
  old = jax.config.jax_default_prng_impl
  jax.config.update("jax_default_prng_impl", "unsafe_rbg")
  yield
  jax.config.update("jax_default_prng_impl", old)


def write_folder(root, per_class: int, classes=CLASSES, seed: int = 0):
  """root/<class>/<n>.png: 32x32 images, one dominant colour channel per class."""
  rng = np.random.default_rng(seed)
  for label, name in enumerate(classes):
    os.makedirs(os.path.join(root, name))
    for i in range(per_class):
      pixels = rng.integers(0, 60, (32, 32, 3)).astype(np.uint8)
      pixels[..., label % 3] += 180
      Image.fromarray(pixels).save(os.path.join(root, name, f"{i}.png"))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  write_folder(os.path.join(root, "cifar10", "train"), per_class=12)
  write_folder(os.path.join(root, "cifar10", "test"), per_class=4, seed=1)
  return str(root)


def tiny_config(data_root: str = "", **overrides):
  """configs/cifar10_mambaout.py on data_root with the tiny model, small batches."""
  sys.path.insert(0, REPO_ROOT)
  from configs import cifar10_mambaout  # pylint: disable=g-import-not-at-top
  c = cifar10_mambaout.get_config(data_root)
  c.model.update(TINY_MODEL)
  c.data.worker_count = 0
  c.data.read_threads = 2
  c.global_batch_size = 8
  c.eval_batch_size = 8
  c.eval_read_threads = 2
  c.num_train_steps = 3
  c.optim.warmup_steps = 1
  c.log_every_steps = 2
  c.eval_canvases = (32, 48)
  for name, value in overrides.items():
    target = c
    *parents, leaf = name.split(".")
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return c


def test_decay_mask_decays_conv_and_linear_kernels_only():
  model = nnx.eval_shape(lambda: mambaout.MambaOut(
      mambaout.MambaOutConfig(**TINY_MODEL), rngs=nnx.Rngs(0)))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  mask = jax.tree_util.tree_flatten_with_path(optim.decay_mask(params))[0]
  names = {"/".join(str(k.key) for k in path): decays for path, decays in mask}
  decayed = sorted(n for n, d in names.items() if d)
  assert all(n.endswith("/kernel") for n in decayed)
  # Every conv (stem, downsample, depthwise 7x7) and linear (block, head) kernel.
  for name in ("stem/conv1/kernel", "stem/conv2/kernel", "downsamples/0/conv/kernel",
               "stages/0/0/conv/kernel", "stages/0/0/fc1/kernel", "stages/1/0/fc2/kernel",
               "head/fc1/kernel", "head/fc2/kernel"):
    assert names[name], name
  kept = [n for n, d in names.items() if not d]
  assert kept and all(n.endswith(("/bias", "/scale")) for n in kept)
  assert len(decayed) + len(kept) == len(names)


def test_fit_to_canvas_and_pad_crop_flip():
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)
  image = Image.fromarray(pixels)
  np.testing.assert_array_equal(mambaout_train.fit_to_canvas(image, 32), pixels)
  np.testing.assert_array_equal(mambaout_train.fit_to_canvas(image, 48),
                                np.asarray(image.resize((48, 48), Image.Resampling.BICUBIC)))
  # A 10-wide, 20-high image: 16 x 32 after the fit, centred, zeros beside it.
  tall = mambaout_train.fit_to_canvas(Image.fromarray(pixels[:20, :10]), 32, "lanczos")
  assert tall.shape == (32, 32, 3) and not tall[:, :8].any() and not tall[:, 24:].any()

  np.testing.assert_array_equal(mambaout_train.pad_crop_flip(pixels, rng, 0, False), pixels)
  shifts = set()
  for _ in range(20):
    out = mambaout_train.pad_crop_flip(pixels, rng, 4, True)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    # Each output is a window of the zero-padded image, possibly mirrored.
    padded = np.pad(pixels, ((4, 4), (4, 4), (0, 0)))
    found = [(t, l, f) for t in range(9) for l in range(9) for f in (False, True)
             if np.array_equal(padded[t:t + 32, l:l + 32][:, ::-1] if f else
                               padded[t:t + 32, l:l + 32], out)]
    assert found
    shifts.add(found[0])
  assert len(shifts) > 5


def test_overfits_a_repeated_batch():
  config = tiny_config()
  model_config = mambaout_train.model_config_from(config)
  mesh = sharding.make_mesh()
  optim_config = optim.OptimConfig(learning_rate=1e-2, warmup_steps=0, total_steps=1000)
  tx = optim.make_optimizer(optim_config)
  state, shardings = mambaout_train.create_train_state(model_config, tx, 0, mesh)
  step = mambaout_train.compile_train_step(
      mambaout_train.make_train_step(mambaout_train.model_graphdef(model_config), tx,
                                     optim.learning_rate_schedule(optim_config)),
      shardings, mesh)
  rng = np.random.default_rng(0)
  batch = sharding.global_batch(
      {"image": rng.integers(0, 256, (8, 32, 32, 3)).astype(np.uint8),
       "label": rng.integers(0, 3, 8).astype(np.int32)}, mesh)
  losses = []
  for _ in range(30):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert np.isfinite(losses).all()
  assert losses[-1] < 0.3 * losses[0], losses
  assert int(metrics["correct"]) == 8
  assert int(state["step"]) == 30


def test_train_save_and_evaluate(data_root, tmp_path):
  workdir = str(tmp_path / "work")
  config = tiny_config(data_root)
  results = mambaout_train.train_and_evaluate(config, workdir)

  assert sorted(results) == [32, 48]
  for r in results.values():
    assert 0.0 <= r["top1"] <= 1.0 and r["count"] == 12
  with open(os.path.join(workdir, mambaout_train.RESULTS_FILE)) as f:
    doc = json.load(f)
  assert sorted(doc["eval"]) == ["32", "48"]
  assert doc["train"]["step"] == 3 and doc["train_image_size"] == 32
  assert doc["model"]["widths"] == [8, 16]
  with open(os.path.join(workdir, mambaout_train.RESULTS_TABLE_FILE)) as f:
    table = f.read()
  assert "| trained at | canvas 32 | canvas 48 |" in table
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert [json.loads(line)["step"] for line in f] == [1, 2, 3]  # First, every 2nd, last.

  model_config, params = mambaout_train.load_params(workdir)
  assert model_config == mambaout_train.model_config_from(config)
  assert mambaout.param_count(nnx.eval_shape(
      lambda: mambaout.MambaOut(model_config, rngs=nnx.Rngs(0)))) == doc["num_params"]
  # --eval_only reads the saved params back: the same answers.
  again = mambaout_train.train_and_evaluate(config, workdir, eval_only=True)
  assert {c: r["correct"] for c, r in again.items()} == \
      {c: r["correct"] for c, r in results.items()}


def test_a_cut_off_evaluation_keeps_the_canvases_it_scored(data_root, tmp_path, monkeypatch):
  workdir = str(tmp_path / "work")
  config = tiny_config(data_root)
  scored = mambaout_train.evaluate

  def evaluate_then_stop(model_config, params, source, canvases, **kwargs):
    if canvases == (48,):
      raise KeyboardInterrupt  # A time limit, during the second canvas.
    return scored(model_config, params, source, canvases, **kwargs)

  monkeypatch.setattr(mambaout_train, "evaluate", evaluate_then_stop)
  with pytest.raises(KeyboardInterrupt):
    mambaout_train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, mambaout_train.RESULTS_FILE)) as f:
    doc = json.load(f)
  assert sorted(doc["eval"]) == ["32"] and doc["eval"]["32"]["count"] == 12
  assert os.path.exists(os.path.join(workdir, mambaout_train.PARAMS_FILE))


@pytest.mark.parametrize("field, value, message", [
    ("global_batch_size", 0, "global_batch_size=0 must be >= 1"),
    ("label_smoothing", 1.0, r"label_smoothing=1.0 must be in \[0, 1\)"),
    ("eval_read_threads", -1, r"eval_read_threads=-1 must be >= 0 \(0: one a core\)"),
    ("eval_canvases", (32, 0), "eval_canvases"),
    ("data.resample", "cubic", "data.resample='cubic' must be one of"),
    ("data.crop_padding", -1, "data.crop_padding=-1 must be >= 0"),
    ("data.image_size", 0, "data.image_size=0 must be >= 1"),
    ("model.widths", (7, 16), "widths"),
    ("model.dtype", "float16", "dtype"),
    ("optim.learning_rate", 0.0, "learning_rate"),
    ("optim.decay", "some", "decay"),
])
def test_bad_config_values_are_named(field, value, message):
  with pytest.raises(ValueError, match=message):
    mambaout_train.validate_config(tiny_config(**{field: value}))


def test_bad_folders_are_named(data_root, tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    mambaout_train.train_and_evaluate(
        tiny_config(**{"data.train_path": str(tmp_path / "nowhere"),
                       "data.test_path": os.path.join(data_root, "cifar10", "test")}),
        str(tmp_path / "w"))
  other = str(tmp_path / "other")
  write_folder(other, per_class=1, classes=("cat", "dog", "truck"))
  with pytest.raises(ValueError, match="differ"):
    mambaout_train.train_and_evaluate(
        tiny_config(data_root, **{"data.test_path": other}), str(tmp_path / "w"))
  with pytest.raises(ValueError, match="3 classes but model.num_classes=2"):
    mambaout_train.train_and_evaluate(
        tiny_config(data_root, **{"model.num_classes": 2}), str(tmp_path / "w"))
  with pytest.raises(FileNotFoundError, match="train first"):
    mambaout_train.load_params(str(tmp_path / "empty"))


def test_command_line_names_a_misspelt_field(data_root, tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "mambaeye_jax.mambaout_train",
       "--config", f"configs/cifar10_mambaout.py:{data_root}", "--workdir", str(tmp_path),
       "--config.optim.lerning_rate=1"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False)
  assert proc.returncode == 1
  assert proc.stderr.startswith("error: config field 'optim.lerning_rate' does not exist; "
                                "did you mean 'optim.learning_rate'"), proc.stderr
