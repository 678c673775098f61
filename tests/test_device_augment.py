"""DataConfig.ship="source": the training transform rendered on the device.

The renderer (`device_augment`) runs the official chain, so on the same
plan it must give `augment.apply_reference`'s pixels (the host's step-by-step
chain, "pil" filters) to rounding, in every path; the pipeline must draw the
same plans, erase boxes, corners and ratios as the other ship modes from the
same seed; and the samples must match the official transform's statistics
as the host backends do (tests/test_transform_fidelity.py).
"""

import glob
import os

import conftest
import jax
import numpy as np
import pytest
from PIL import Image

import test_transform_fidelity as fidelity
from mambaeye_jax import device_augment
from mambaeye_jax import train_data
from mambaeye_jax import train_lib
from mambaeye_jax import train_step
from mambaeye_jax.data import augment
from mambaeye_jax.data import batching
from mambaeye_jax.data import pipeline
from mambaeye_jax.data import source_plan

pytestmark = pytest.mark.usefixtures("compilation_cache")

CIFAR = "/tmp/data/cifar10/train"
CFG = augment.AugmentConfig(canvas_min=32, canvas_max=64)
SIDE = 64

# Bounds against apply_reference, gray levels: the mean absolute difference
# over a path's samples, and the largest of one sample. Measured here on
# CIFAR images (2026-12-06, 28-40 samples a path): means 0.02-0.06, sample
# maxima 0.13-0.47 in every path (float32 against PIL's fixed-point
# weights: a value near a rounding boundary rounds the other way). The
# host's fast "pil" path is 1.1 levels from the chain on the same plans (5
# with perspective).
MEAN_BOUND = 0.15
SAMPLE_BOUND = 1.0

_render = jax.jit(device_augment.renderer(SIDE, CFG.blur_kernel, CFG.perspective_distortion))


def _images(n: int) -> list[Image.Image]:
  """CIFAR training images when present, else smooth synthetic 32x32 ones."""
  files = sorted(glob.glob(os.path.join(CIFAR, "*", "*.jpg")))
  if files:
    return [Image.open(f).convert("RGB") for f in files[:n * 25:25]]
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[0:32, 0:32] / 31.0
  out = []
  for _ in range(n):
    a = rng.uniform(0, 1, (6, 3))
    pixels = 255 * (0.5 + 0.25 * np.sin(a[0] * 6 * xx[..., None] + a[1] * 6)
                    * np.cos(a[2] * 6 * yy[..., None] + a[3] * 6) + 0.2 * (a[4] - 0.5))
    out.append(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)))
  return out


# Each path: the plans it keeps, and what it forces in them (only choices
# that do not change later draws' meaning: geometry plans stay consistent).
PATHS = {
    "axis-aligned": (lambda p: p["perspective"] is None,
                     dict(flip=False, jitter=None, gray=False, blur_sigma=None, erase=False)),
    "flip": (lambda p: p["perspective"] is None,
             dict(flip=True, jitter=None, gray=False, blur_sigma=None, erase=False)),
    "perspective": (lambda p: p["perspective"] is not None,
                    dict(jitter=None, gray=False, blur_sigma=None, erase=False)),
    "blur": (lambda p: p["perspective"] is None,
             dict(jitter=None, gray=False, blur_sigma=2.5, erase=False)),
    "jitter": (lambda p: p["jitter"] is not None,
               dict(gray=False, blur_sigma=None, erase=False)),
    "gray": (lambda p: True, dict(jitter=None, blur_sigma=None, gray=True, erase=False)),
    "erase": (lambda p: True, dict(erase=True)),
    "all": (lambda p: True, {}),
    # 48-pixel images on canvases of 32..40: the fit shrinks (LANCZOS).
    "shrinking fit": (lambda p: True, {}),
}


def _path_samples(path: str, n: int = 40):
  """(rendered canvases, reference pixels, boxes, erase boxes) of a path."""
  keep, force = PATHS[path]
  cfg, side = CFG, 32
  if path == "shrinking fit":
    cfg, side = augment.AugmentConfig(canvas_min=32, canvas_max=40), 48
  sources, plans, refs, boxes, erases = [], [], [], [], []
  for i, image in enumerate(_images(n * 2)):
    image = image.resize((side, side), Image.Resampling.BICUBIC)
    rng = np.random.default_rng([1, i])
    params = augment.plan(rng, *image.size, cfg)
    if not keep(params):
      continue
    params.update(force)
    state = rng.bit_generator.state
    refs.append(augment.apply_reference(image, params, rng, cfg))
    rng.bit_generator.state = state  # The same erase draws for the device.
    rw, rh = params["out_size"]
    erase = augment.erase_box(rng, rh, rw, cfg) if params["erase"] else None
    plans.append(source_plan.encode_plan(params, erase, image.size[::-1]))
    source = np.zeros((side, side, 3), np.uint8)
    source[:image.size[1], :image.size[0]] = np.asarray(image)
    sources.append(source)
    boxes.append(augment.centred_box(params["canvas"], (rh, rw)))
    erases.append(erase)
    if len(refs) == n:
      break
  return np.asarray(_render(np.stack(sources), np.stack(plans))), refs, boxes, erases


@pytest.mark.parametrize("path", list(PATHS))
def test_render_is_the_reference_chain(path):
  canvases, refs, boxes, erases = _path_samples(path)
  assert len(refs) >= 10, f"too few {path} samples"
  diffs = []
  assert canvases.dtype == np.uint8
  for canvas, ref, box, erase in zip(canvases, refs, boxes, erases):
    inside = canvas[box.top:box.top + box.height, box.left:box.left + box.width]
    outside = canvas.copy()
    outside[box.top:box.top + box.height, box.left:box.left + box.width] = 0
    assert not outside.any(), "pixels outside the centred box"
    if erase is not None:
      top, left, eh, ew = erase
      assert not inside[top:top + eh, left:left + ew].any()
      assert not ref[top:top + eh, left:left + ew].any()
    diffs.append(np.abs(inside.astype(np.float64) - ref).mean())
  assert np.mean(diffs) < MEAN_BOUND and max(diffs) < SAMPLE_BOUND, (
      path, np.mean(diffs), max(diffs))


def test_erase_box_is_the_host_erase():
  """One generator state: `apply` zeroes exactly `erase_box`'s box."""
  for seed in range(20):
    pixels = np.full((40, 30, 3), 7, np.uint8)
    augment._random_erase(pixels, np.random.default_rng(seed), CFG)  # pylint: disable=protected-access
    box = augment.erase_box(np.random.default_rng(seed), 40, 30, CFG)
    want = np.full((40, 30, 3), 7, np.uint8)
    if box is not None:
      top, left, eh, ew = box
      want[top:top + eh, left:left + ew] = 0
    np.testing.assert_array_equal(pixels, want)


def test_padding_rows_render_zero():
  source = np.full((2, 32, 32, 3), 200, np.uint8)
  plan = np.zeros((2, source_plan.PLAN_SIZE), np.float32)
  assert not np.asarray(_render(source, plan)).any()


SMALL = dict(source="folder", batch_size=4, num_glimpses=32, canvas_min=32, canvas_max=64,
             seed=3, cache_decoded=True, transform_backend="pil")
SHARED = ("positions", "ratio", "labels", "mask", "segment_ids")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("images")
  for i, image in enumerate(_images(12)):
    path = root / f"c{i % 2}" / f"{i}.png"  # Lossless: both modes see the same pixels.
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
  return str(root)


def test_source_batches_render_the_canvas_patches(image_folder):
  """Same stream as ship="canvas": the same corners, ratios and labels
  exactly; the patches within the fast host path's distance of the chain."""
  config = {**SMALL, "path": image_folder}
  canvases = pipeline.make_train_iterator({**config, "ship": "canvas"})
  sources = pipeline.make_train_iterator({**config, "ship": "source"})
  render = device_augment.renderer(64, perspective_distortion=0.5)
  gather = jax.jit(lambda b: train_step.batch_patches(b, render))
  host = jax.jit(train_step.batch_patches)
  diffs = []
  for _ in range(3):
    a, b = next(canvases), next(sources)
    assert b["source"].shape == (4, 32, 32, 3) and b["source"].dtype == np.uint8
    assert b["plan"].shape == (4, source_plan.PLAN_SIZE) and b["plan"].dtype == np.float32
    assert "canvas" not in b and "patches" not in b
    for k in SHARED:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    want, got = np.asarray(host(a)), np.asarray(gather(b))
    assert got.dtype == np.uint8 and got.shape == want.shape
    assert not got[~b["mask"]].any(), "padding steps must stay zero"
    diffs.append(np.abs(got.astype(np.float64) - want).mean())
  # Host "pil" path vs the chain: ~1 level on the image, 5 with perspective;
  # the patches include the zero border, which dilutes it.
  assert np.mean(diffs) < 3.0, diffs
  assert canvases.get_state() == sources.get_state()


def test_source_mode_errors_are_clear(image_folder):
  with pytest.raises(ValueError, match="ship='source'.*cannot pack"):
    pipeline.DataConfig(ship="source", packing=True)
  with pytest.raises(ValueError, match="source_side=0 must be >= 1"):
    pipeline.DataConfig(ship="source", source_side=0)
  it = pipeline.make_train_iterator({**SMALL, "path": image_folder, "ship": "source",
                                     "source_side": 24, "on_error": "raise"})
  with pytest.raises(ValueError, match=r"record .*: decoded image 32x32 is larger than "
                     r"source_side=24"):
    next(it)
  with pytest.raises(ValueError, match="ship='source'.*renderer"):
    train_step.batch_patches({"source": np.zeros((1, 32, 32, 3), np.uint8),
                              "plan": np.zeros((1, source_plan.PLAN_SIZE), np.float32),
                              "positions": np.zeros((1, 1, 2), np.int32),
                              "mask": np.ones((1, 1), bool)})
  with pytest.raises(ValueError, match="fake source.*ship='source'"):
    train_data.FakeBatches(2, 4, 3, ship="source")
  with pytest.raises(ValueError, match="packing is not supported"):
    batching.BatchIterDataset(None, batch_size=2, seq_len=4, packing=True,
                              row_arrays=pipeline.row_arrays(pipeline.DataConfig(ship="source")))
  c = conftest.fake_train_config(2)
  c.data.source = "synthetic"
  c.data.ship = "source"
  c.data.packing = True
  with pytest.raises(ValueError, match="cannot pack"):
    train_lib.validate_config(c)


def _device_samples(name: str, num_samples: int) -> dict[str, np.ndarray]:
  """`fidelity.project_samples` for ship="source": the pipeline's own
  TrainTransform draws the plans, the device renders them."""
  setting = fidelity.ots.SETTINGS[name]
  images = fidelity.ots.read_images(os.path.join(fidelity.DATA_DIR, setting["archive"]),
                                    fidelity.ots.image_names(name))
  lo, hi = setting["canvas"]
  transform = pipeline.TrainTransform(pipeline.DataConfig(
      canvas_min=lo, canvas_max=hi, num_glimpses=setting["num_glimpses"],
      seed=fidelity.SEED, ship="source"))
  render = jax.jit(device_augment.renderer(hi, perspective_distortion=0.5))
  records, extra = [], []
  for start in range(0, num_samples, 250):
    examples = []
    for i in range(start, min(num_samples, start + 250)):
      rel, data = images[i % len(images)]
      examples.append(transform.random_map({"image": data, "label": 0, "key": rel},
                                           np.random.default_rng([fidelity.SEED, i])))
    canvases = np.asarray(render(np.stack([e["source"] for e in examples]),
                                 np.stack([e["plan"] for e in examples])))
    for example, canvas in zip(examples, canvases):
      plan = example["plan"].astype(np.float64)
      rw, rh = int(plan[source_plan.OUT_W]), int(plan[source_plan.OUT_H])
      side = int(plan[source_plan.CANVAS])
      box = augment.centred_box(side, (rh, rw))
      pixels = canvas[box.top:box.top + rh, box.left:box.left + rw]
      records.append(fidelity.ots.sample_stats(pixels, side, box, example["positions"],
                                               example["ratio"], setting["ratio_steps"]))
      fit = tuple(int(v) for v in plan[[source_plan.FIT_W, source_plan.FIT_H]])
      warped = tuple(int(v) for v in plan[[source_plan.WARP_W, source_plan.WARP_H]])
      perspective = not np.allclose(plan[source_plan.WARP][[1, 3, 6, 7]], 0)
      crop = tuple(int(v) for v in plan[source_plan.CROP][2:])
      extra.append({"perspective": perspective,
                    "warp": (*fit, *warped) if perspective else (-1,) * 4,
                    "crop": crop != warped, "short": fidelity._short_axis(*warped)})  # pylint: disable=protected-access
  arrays = fidelity.ots.stack_stats(records, records[0])
  for key in ("perspective", "warp", "crop", "short"):
    arrays[key] = np.array([row[key] for row in extra])
  return arrays


def test_device_samples_match_the_official_statistics():
  """The CIFAR setting of tests/test_transform_fidelity.py, rendered on the
  device: every statistic within its bound (the official chain, so closer to
  the official's sharpness and black fraction than the host's single
  resampling)."""
  fidelity._need_data()  # pylint: disable=protected-access
  official = fidelity.official_samples("cifar")
  project = _device_samples("cifar", fidelity.PROJECT_SAMPLES["cifar"])
  rows = fidelity.compare("cifar", official, project)
  assert all(r["ok"] for r in rows), fidelity.format_rows(rows)


def _losses(workdir) -> dict[int, float]:
  from mambaeye_jax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  return {r["step"]: r["train/loss"] for r in metrics_lib.read_metrics(str(workdir))}


def test_training_in_source_mode_runs_as_canvas_mode(tmp_path):
  """The real trainer renders on the device: the losses of ship="canvas"
  to the pixels' rounding (the same stream, corners and labels), also
  across a resume."""
  c = conftest.fake_train_config(3)
  c.data.source = "synthetic"  # Images up to 160 a side: the fit shrinks (LANCZOS).
  c.data.source_side = 160
  c.data.ship = "canvas"
  train_lib.train_and_evaluate(c, str(tmp_path / "canvas"))
  c.data.ship = "source"
  c.num_train_steps = 2
  train_lib.train_and_evaluate(c, str(tmp_path / "source"))
  c.num_train_steps = 3
  assert train_lib.train_and_evaluate(c, str(tmp_path / "source"))["step"] == 3
  want, got = _losses(tmp_path / "canvas"), _losses(tmp_path / "source")
  assert sorted(got) == [1, 2, 3]
  np.testing.assert_allclose([got[s] for s in (1, 2, 3)], [want[s] for s in (1, 2, 3)],
                             rtol=0.02)


def test_bench_device_augment_runs(capsys):
  import sys  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.join(conftest.REPO_ROOT, "benchmarks"))
  import bench_device_augment  # pylint: disable=g-import-not-at-top
  bench_device_augment.main(["--batch", "4", "--num_glimpses", "8", "--repeats", "1",
                             "--inner", "1"])
  out = capsys.readouterr().out
  assert "ship=source  render + gather" in out and "render alone" in out
