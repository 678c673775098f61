"""benchmarks/data_wait.py: training runs' data wait side by side."""

import json

import conftest
import pytest

data_wait = conftest.load_benchmark("data_wait")


def _write_metrics(workdir, rows):
  workdir.mkdir()
  with open(workdir / "metrics.jsonl", "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")


def _window(step, wait, step_ms, rate):
  return {"step": step, "train/loss": 2.0, "perf/data_wait_fraction": wait,
          "perf/step_time_ms": step_ms, "perf/images_per_sec": rate}


def test_means_over_the_windows_after_from_step(tmp_path):
  _write_metrics(tmp_path / "a", [
      {"step": 1, "perf/first_step_sec": 9.0},  # No window keys: left out.
      _window(100, 0.9, 90.0, 100.0),  # Before --from_step: left out.
      _window(600, 0.5, 28.0, 9000.0), _window(700, 0.3, 20.0, 11000.0)])
  _write_metrics(tmp_path / "b", [_window(600, 0.05, 16.0, 16000.0)])
  out = data_wait.main([f"patches={tmp_path / 'a'}", f"canvas={tmp_path / 'b' / 'metrics.jsonl'}",
                        "--from_step", "500"])
  lines = out.splitlines()
  assert lines[2] == "| patches | 40.0% | 24.0 | 10000 | - | - | - | 2 |"
  assert lines[3] == "| canvas | 5.0% | 16.0 | 16000 | - | - | - | 1 |"


def test_reading_thread_columns_when_every_window_has_them(tmp_path):
  def timed(step, read, put, not_ready):
    return dict(_window(step, 0.1, 18.0, 14000.0), **{
        "perf/batch_read_ms": read, "perf/batch_put_ms": put,
        "perf/batch_not_ready_fraction": not_ready})

  _write_metrics(tmp_path / "a", [timed(600, 12.0, 1.0, 0.0), timed(700, 16.0, 2.0, 0.5)])
  _write_metrics(tmp_path / "b", [timed(600, 12.0, 1.0, 0.0), _window(700, 0.1, 18.0, 14000.0)])
  lines = data_wait.main([f"new={tmp_path / 'a'}", f"mixed={tmp_path / 'b'}"]).splitlines()
  assert lines[2] == "| new | 10.0% | 18.0 | 14000 | 14.0 | 1.5 | 25.0% | 2 |"
  assert lines[3] == "| mixed | 10.0% | 18.0 | 14000 | - | - | - | 2 |"


def test_bad_runs_name_the_problem(tmp_path):
  with pytest.raises(SystemExit, match="NAME=WORKDIR"):
    data_wait.main([str(tmp_path)])
  with pytest.raises(SystemExit, match="does not exist"):
    data_wait.main([f"x={tmp_path / 'missing'}"])
  _write_metrics(tmp_path / "early", [_window(100, 0.5, 28.0, 9000.0)])
  with pytest.raises(SystemExit, match="after step 500"):
    data_wait.main([f"x={tmp_path / 'early'}"])
