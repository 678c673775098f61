"""Metric files and the console progress line."""

import os

from mambaeye_jax import metrics
from mambaeye_jax import progress


def test_writer_appends_json_lines_and_tensorboard_events(tmp_path):
  with metrics.MetricWriter(str(tmp_path)) as writer:
    writer.write(1, {"train/loss": 2.5, "data/num_skipped": 0})
  with metrics.MetricWriter(str(tmp_path)) as writer:  # A resumed run appends.
    writer.write(2, {"train/loss": 2.0})
  records = metrics.read_metrics(str(tmp_path))
  assert [(r["step"], r["train/loss"]) for r in records] == [(1, 2.5), (2, 2.0)]
  assert isinstance(records[0]["data/num_skipped"], int)
  if metrics.tensorboardX is not None:
    assert os.listdir(tmp_path / metrics.TB_DIR)


def test_disabled_writer_writes_nothing(tmp_path):
  with metrics.MetricWriter(str(tmp_path / "w"), enabled=False) as writer:
    writer.write(1, {"train/loss": 1.0})
  assert not (tmp_path / "w").exists()


def test_progress_line_shows_speed_and_eta():
  line = progress.progress_line(
      100, 1100, {"train/loss": 2.0, "train/accuracy_last": 0.25,
                  "perf/images_per_sec": 2100.0, "perf/data_wait_fraction": 0.02}, 0.5)
  assert line == ("step 100/1100 (9.1%) | loss 2.0000 | acc@last 25.0% | 2100 img/s | "
                  "500.0 ms/step | data wait 2% | ETA 8m20s")
  assert progress.format_duration(2 * 3600 + 3 * 60 + 9) == "2h03m"
  assert progress.format_duration(float("nan")) == "?"
