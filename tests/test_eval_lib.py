"""Tests for mambaeye_jax.eval_lib: scoring, the pipeline, datasets, reports."""

import dataclasses
import functools
import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from mambaeye_jax import eval_data
from mambaeye_jax import eval_lib
from mambaeye_jax import eval_reports
from mambaeye_jax import eval_workers
from mambaeye_jax import model as model_lib
from mambaeye_jax import progress as progress_lib
from mambaeye_jax.data import geometry

K = 10
T = 12
CANVAS = 32


@functools.lru_cache(maxsize=None)
def tiny_model(seed: int = 0) -> model_lib.MambaEye:
  """Built once per seed (model init costs seconds on a busy CPU); the
  evaluator never changes it."""
  config = model_lib.ModelConfig(depth=1, dim=32, num_classes=K, d_state=16,
                                 headdim=16, chunk_size=16)
  return model_lib.MambaEye(config, rngs=nnx.Rngs(seed))


@dataclasses.dataclass(frozen=True)
class FakeConfig:
  num_classes: int = K


class GreyLevelModel(nnx.Module):
  """Logits known in closed form: reads the class off a patch's grey level.

  A patch of grey level 20 k + 10 "shows" class k. From step `t0` on the
  prediction is that class; before it, class (k + 1) % K. Logits are 10 on
  the prediction and -0.01 j on every other class j, so the ranking of the
  others is by index.
  """

  def __init__(self, t0: int):
    self.config = FakeConfig()
    self.t0 = t0

  def __call__(self, patches, positions, segment_ids=None):
    del positions, segment_ids
    # The brightest pixel: a patch may hang past the image onto the zero
    # padding, but its corner, and so one pixel at least, is in the image.
    seen = jnp.round((patches.astype(jnp.float32).max(-1) - 10.0) / 20.0)
    seen = jnp.clip(seen, 0, K - 1).astype(jnp.int32)  # (b, T)
    steps = jnp.arange(patches.shape[1])[None, :]
    pred = jnp.where(steps >= self.t0, seen, (seen + 1) % K)
    others = -0.01 * jnp.arange(K, dtype=jnp.float32)
    return jnp.where(jax.nn.one_hot(pred, K) > 0, 10.0, others)


class GreySource:
  """Uniform grey images of class k, some deliberately mislabelled."""

  def __init__(self, n: int):
    self.n = n
    self.num_classes = K
    self.class_map = None
    self.description = "grey"

  def __len__(self):
    return self.n

  def true_class(self, i):
    return (3 * i) % K

  def __getitem__(self, i):
    rng = np.random.default_rng(i)
    h, w = rng.integers(40, 60, 2)  # Short side >= 16 px on any canvas here.
    image = np.full((h, w, 3), 20 * self.true_class(i) + 10, np.uint8)
    label = self.true_class(i) if i % 4 else (self.true_class(i) + 2) % K
    return {"image": image, "label": label, "key": f"grey[{i}]"}


def expected_curves(source, t0):
  """Top-1 / top-5 curves of GreyLevelModel on GreySource, in numpy."""
  top1 = np.zeros(T)
  top5 = np.zeros(T)
  for i in range(len(source)):
    k, label = source.true_class(i), source[i]["label"]
    for t in range(T):
      pred = k if t >= t0 else (k + 1) % K
      order = [pred] + [j for j in range(K) if j != pred]
      top1[t] += order[0] == label
      top5[t] += label in order[:5]
  return top1 / len(source), top5 / len(source)


def config(**kw):
  base = dict(canvas_sizes=(CANVAS,), scan_patterns=("random",),
              glimpse_counts=(4, T), batch_size=4, num_workers=0)
  base.update(kw)
  return eval_lib.EvalConfig(**base)


def test_score_logits_on_known_logits():
  logits = jnp.array([
      [[5., 1., 0.], [0., 5., 1.]],   # label 1: wrong at t0, right at t1
      [[0., 0., 9.], [0., 9., 0.]],   # label 2: right at t0, wrong at t1
      [[9., 0., 0.], [9., 0., 0.]],   # padding row: never counted
  ])
  out = eval_lib.score_logits(logits, jnp.array([1, 2, 0]),
                              jnp.array([True, True, False]))
  np.testing.assert_array_equal(out["top1"], [1, 1])
  np.testing.assert_array_equal(out["top5"], [2, 2])  # K = 3 < 5
  np.testing.assert_array_equal(out["last_pred"], [1, 1, 0])


def test_accuracy_of_a_model_with_known_logits():
  source = GreySource(11)  # 3 batches of 4, the last padded by one.
  t0 = 5
  results = eval_lib.evaluate(GreyLevelModel(t0), source, config(),
                              progress_stream=False)
  (r,) = results
  want1, want5 = expected_curves(source, t0)
  np.testing.assert_allclose(r.top1_curve, want1)
  np.testing.assert_allclose(r.top5_curve, want5)
  assert r.num_examples == 11 and r.num_skipped == 0
  assert r.top1_at(T) == pytest.approx(want1[-1])
  assert r.top1_at(4) == pytest.approx(want1[3])
  labels = np.array([source[i]["label"] for i in range(11)])
  np.testing.assert_array_equal(r.labels, labels)
  np.testing.assert_array_equal(r.predictions,
                                [source.true_class(i) for i in range(11)])


def test_batch_size_padding_and_workers_agree():
  model = tiny_model()
  source = eval_data.open_source("synthetic:10")
  runs = {}
  for name, kw in {"b4": dict(batch_size=4), "b10": dict(batch_size=10),
                   "b4_workers": dict(batch_size=4, num_workers=1)}.items():
    (runs[name],) = eval_lib.evaluate(model, source, config(**kw),
                                      progress_stream=False)
  for name in ("b10", "b4_workers"):
    np.testing.assert_array_equal(runs[name].predictions, runs["b4"].predictions)
    np.testing.assert_allclose(runs[name].top1_curve, runs["b4"].top1_curve)
    np.testing.assert_allclose(runs[name].top5_curve, runs["b4"].top5_curve)
  assert runs["b4"].num_examples == 10


def test_max_examples_and_settings_order():
  cfg = config(canvas_sizes=(32, 48), resize_modes=("fit", "none"),
               scan_patterns=("random", "hilbert"), max_examples=3)
  settings = cfg.settings()
  assert [s.canvas_size for s in settings] == [32] * 4 + [48] * 4
  assert all(s.num_glimpses == T for s in settings)
  done = []
  results = eval_lib.evaluate(GreyLevelModel(0), GreySource(8), cfg,
                              progress_stream=False, on_setting_done=done.append)
  assert [r.setting for r in results] == settings
  assert all(r.num_examples == 3 for r in results)
  # The results so far after every setting but the last, which the caller
  # gets as the return value.
  assert [len(d) for d in done] == list(range(1, len(settings)))
  assert [r.setting for r in done[-1]] == settings[:-1]


@pytest.mark.parametrize("kw, match", [
    (dict(scan_patterns=("nope",)), "unknown scan pattern 'nope'"),
    (dict(resize_modes=("crop",)), "unknown resize mode 'crop'"),
    (dict(canvas_sizes=(8,)), "smaller than one"),
    (dict(glimpse_counts=(0, 4)), "must be >= 1"),
])
def test_bad_config(kw, match):
  with pytest.raises(ValueError, match=match):
    config(**kw)


def test_labels_beyond_the_model_are_refused():
  source = GreySource(4)
  source.num_classes = 20
  with pytest.raises(eval_data.DataError, match="20 classes but the model only 10"):
    eval_lib.evaluate(GreyLevelModel(0), source, config(), progress_stream=False)


def test_corrupt_image_stops_or_is_skipped(tmp_path):
  for cls in ("a", "b"):
    os.makedirs(tmp_path / cls)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / cls / "good.png")
  (tmp_path / "b" / "bad.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
  source = eval_data.open_source(str(tmp_path))
  assert len(source) == 3
  with pytest.raises(eval_data.DataError, match="bad.jpg"):
    eval_lib.evaluate(GreyLevelModel(0), source, config(), progress_stream=False)
  (r,) = eval_lib.evaluate(GreyLevelModel(0), source,
                           config(skip_bad_images=True), progress_stream=False)
  assert r.num_examples == 2 and r.num_skipped == 1
  assert (r.predictions == -1).sum() == 1


def test_prepare_example_is_deterministic_per_index():
  source = GreySource(3)
  setting = eval_workers.Setting(CANVAS, "fit", "random", T)
  a = eval_workers.prepare_example(source[1], setting, 7, 1)
  b = eval_workers.prepare_example(source[1], setting, 7, 1)
  c = eval_workers.prepare_example(source[1], setting, 7, 2)
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[1], c[1])
  assert a[1].max() <= CANVAS - geometry.PATCH_SIZE


def test_reports_and_plots(tmp_path):
  cfg = config(canvas_sizes=(32, 48), scan_patterns=("random", "spiral"))
  results = eval_lib.evaluate(GreyLevelModel(3), GreySource(5), cfg,
                              progress_stream=False)
  paths = eval_reports.write_reports(results, cfg, {"checkpoint": "fake"}, str(tmp_path))
  report = json.loads(open(paths["json"]).read())
  assert len(report["results"]) == 4
  first = report["results"][0]
  assert set(first["top1"]) == {"4", str(T)} and len(first["top1_curve"]) == T
  assert first["top1"][str(T)] == pytest.approx(first["top1_curve"][-1], abs=1e-6)
  md = open(paths["markdown"]).read()
  assert "| scan | resize | glimpses | 32 | 48 |" in md
  assert "| spiral | fit | 12 |" in md
  for key in ("resolution_plot", "glimpses_plot"):
    with Image.open(paths[key]) as im:
      assert im.format == "PNG" and im.size[0] > 100


def _grid_report(scans=("random", "spiral", "hilbert", "horizontal_raster"),
                 counts=(16, 64, 256), canvases=(32, 64, 128)):
  """A report of every (scan, canvas): accuracy rising with the count."""
  results = []
  for scan in scans:
    for canvas in canvases:
      curve = list(np.linspace(0.1, 0.9, max(counts)))
      results.append({"canvas_size": canvas, "resize": "fit", "scan": scan,
                      "num_glimpses": max(counts), "top1_curve": curve,
                      "top1": {str(g): curve[g - 1] for g in counts}})
  return {"results": results}


def test_resolution_plot_has_a_panel_per_scan_and_a_colour_per_count(tmp_path, plot_figures):
  from mambaeye_jax import plots  # pylint: disable=g-import-not-at-top
  report = _grid_report()
  plots.accuracy_vs_resolution(report, str(tmp_path / "r.png"))
  axes = plot_figures[0].axes
  assert [ax.get_title() for ax in axes] == ["random, fit", "spiral, fit", "hilbert, fit",
                                             "horizontal_raster, fit"]
  for ax in axes:
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == ["16", "64", "256"]
    assert list(lines[0].get_xdata()) == [32, 64, 128]
    assert len({str(line.get_color()) for line in lines}) == 3  # A colour per count ...
  # ... the same in every panel, so the one legend reads for all.
  assert axes[0].get_lines()[1].get_color() == axes[3].get_lines()[1].get_color()
  (legend,) = plot_figures[0].legends
  assert legend.get_title().get_text() == "glimpses"
  assert [t.get_text() for t in legend.get_texts()] == ["16", "64", "256"]


def test_glimpses_plot_has_a_curve_per_canvas_in_each_panel(tmp_path, plot_figures):
  from mambaeye_jax import plots  # pylint: disable=g-import-not-at-top
  plots.accuracy_vs_glimpses(_grid_report(scans=("random", "hilbert")), str(tmp_path / "g.png"))
  axes = plot_figures[0].axes
  assert [ax.get_title() for ax in axes] == ["random, fit", "hilbert, fit"]
  for ax in axes:
    assert [line.get_label() for line in ax.get_lines()] == [
        "canvas 32", "canvas 64", "canvas 128"]
    assert ax.get_lines()[0].get_ydata()[-1] == pytest.approx(90.0)


def test_progress_line():
  stream = io.StringIO()
  progress = progress_lib.Progress(100, stream, interval=0.0)
  progress.update(10, "random/fit/512", 10, 50)
  progress.update(10, "random/fit/512", 20, 50, force=True)
  line = stream.getvalue().strip().splitlines()[-1]
  assert "[random/fit/512] 20/50 images, 20/100 total" in line
  assert "img/s" in line and "ETA" in line
  assert progress_lib.format_duration(3725) == "1h02m"
  assert progress_lib.format_duration(float("nan")) == "?"


def test_device_gather_matches_a_per_image_host_reference():
  model = tiny_model()
  source = eval_data.open_source("synthetic:5")
  cfg = config(scan_patterns=("hilbert",), batch_size=2)
  (r,) = eval_lib.evaluate(model, source, cfg, progress_stream=False)
  setting = cfg.settings()[0]
  patches, positions, labels = [], [], []
  for i in range(len(source)):
    record = source[i]
    canvas, pos, _ = eval_workers.prepare_example(record, setting, cfg.seed, i)
    patches.append(geometry.extract_patches(canvas, pos))  # numpy gather
    positions.append(pos)
    labels.append(record["label"])
  forward = nnx.jit(lambda m, p, q: m(p, q))
  logits = np.asarray(forward(model, jnp.asarray(np.stack(patches)),
                              jnp.asarray(np.stack(positions))))  # (N, T, K)
  correct = logits.argmax(-1) == np.array(labels)[:, None]
  np.testing.assert_allclose(r.top1_curve, correct.mean(0))
  np.testing.assert_array_equal(r.predictions, logits[:, -1].argmax(-1))


def test_official_checkpoint_evaluates(golden):
  _, pt_path, _ = golden
  model = eval_lib.load_eval_model(checkpoint_path=pt_path, dtype="float32")
  assert model.config.num_classes == 1000
  (r,) = eval_lib.evaluate(model, eval_data.open_source("synthetic:3"),
                           config(batch_size=2), progress_stream=False)
  assert r.num_examples == 3 and r.top1_curve.shape == (T,)


def test_shards_combine_to_the_whole():
  source = GreySource(11)
  cfg = config(batch_size=2)
  model = GreyLevelModel(4)
  (whole,) = eval_lib.evaluate(model, source, cfg, progress_stream=False)
  setting = cfg.settings()[0]
  runner = eval_lib.DeviceRunner(model, cfg.batch_size, K)
  parts = []
  with eval_workers.WorkerPool(source, 0) as pool:
    for index in range(3):  # 6 batches over 3 "processes"
      part = eval_lib.evaluate_setting(runner, pool, source, setting, cfg,
                                       shard=(index, 3))
      assert 0 < part.num_examples < 11
      parts.append(part.counts)
  merged = eval_lib.result_from_counts(setting, eval_lib.combine_counts(parts))
  np.testing.assert_allclose(merged.top1_curve, whole.top1_curve)
  np.testing.assert_allclose(merged.top5_curve, whole.top5_curve)
  np.testing.assert_array_equal(merged.predictions, whole.predictions)
  np.testing.assert_array_equal(merged.labels, whole.labels)
  assert merged.num_examples == 11
