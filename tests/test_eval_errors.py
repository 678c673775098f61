"""eval.py for a first-time user: one-line errors, stratified --max-examples,
CPU defaults, worker errors, labelled reports."""

import conftest
import json
import os
import pickle

import jax
import numpy as np
import pytest
from PIL import Image

from mambaeye_jax import eval_data
from mambaeye_jax import eval_lib
from mambaeye_jax import eval_reports
from mambaeye_jax import eval_workers
from mambaeye_jax import model as model_lib
from mambaeye_jax import model_dir as model_dir_lib
from mambaeye_jax import plots

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


eval_cli = conftest.load_eval_cli("eval_cli_errors")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  """A tiny random 10-class model directory (parameters drawn directly:
  the eager `MambaEye(...)` initialisation takes seconds)."""
  config = model_lib.ModelConfig(depth=1, dim=32, num_classes=10, d_state=16,
                                 headdim=16, chunk_size=16)
  params = conftest.random_params(config, 0)
  path = str(tmp_path_factory.mktemp("ckpt") / "model")
  model_dir_lib.save_params(path, config, params)
  return path


def run(capsys, *argv):
  rc = eval_cli.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return rc, out, err


QUICK = ("--canvas-sizes", "32", "--glimpses", "4", "--batch-size", "4",
         "--workers", "0", "--no-plots")


def _one_line_error(err: str, only: bool = True) -> str:
  """The error line; `only`: nothing else was printed."""
  assert "Traceback" not in err
  lines = [l for l in err.splitlines() if l.startswith("eval.py: error: ")]
  assert len(lines) == 1, err
  if only:
    assert len(err.strip().splitlines()) == 1, err
  return lines[0]


@pytest.mark.parametrize("argv, want", [
    (("--checkpoint", "/nonexistent/tiny.pt", "--data", "synthetic:2"),
     "eval.py: error: checkpoint /nonexistent/tiny.pt does not exist"),
    (("--data", "/nonexistent/val"),
     "eval.py: error: dataset /nonexistent/val does not exist"),
    (("--data", "synthetic:2", "--scan", "zigzagzoom"),
     "eval.py: error: unknown scan pattern 'zigzagzoom'; known patterns:"),
    (("--data", "synthetic:2", "--max-examples", "0"),
     "eval.py: error: max_examples=0 must be >= 1"),
    (("--image", "/nonexistent/cat.jpg"),
     "eval.py: error: image /nonexistent/cat.jpg does not exist"),
])
def test_errors_are_one_line(model_dir, capsys, argv, want):
  if "--checkpoint" not in argv:
    argv = ("--checkpoint", model_dir) + argv
  rc, _, err = run(capsys, *argv, *QUICK)
  assert rc == 2
  assert _one_line_error(err).startswith(want)


def test_random_bytes_checkpoint_and_verbose_traceback(model_dir, tmp_path, capsys):
  noise = tmp_path / "noise.safetensors"
  noise.write_bytes(np.random.default_rng(0).bytes(1000))
  rc, _, err = run(capsys, "--checkpoint", noise, "--data", "synthetic:2", *QUICK)
  assert rc == 2
  line = _one_line_error(err)
  assert f"cannot load a MambaEye from {noise}" in line
  assert "header length" in line and "exceeds the file's size (1,000 bytes)" in line
  # The output is a file: refused before any work.
  blocker = tmp_path / "taken"
  blocker.write_text("a file")
  rc, _, err = run(capsys, "--checkpoint", model_dir, "--data", "synthetic:2",
                   *QUICK, "--output", blocker)
  assert rc == 2
  assert _one_line_error(err) == f"eval.py: error: --output {blocker} is a file, not a folder"


def test_unexpected_error_names_its_type_and_verbose_traceback(
    model_dir, tmp_path, capsys, monkeypatch):
  def boom(*args, **kwargs):
    del args, kwargs
    raise RuntimeError("device lost")

  monkeypatch.setattr(eval_lib, "evaluate", boom)
  argv = ("--checkpoint", model_dir, "--data", "synthetic:2", *QUICK,
          "--output", tmp_path / "out")
  rc, _, err = run(capsys, *argv)
  assert rc == 2
  assert _one_line_error(err, only=False) == (
      "eval.py: error: RuntimeError: device lost (--verbose shows the traceback)")
  rc, _, err = run(capsys, *argv, "--verbose")
  assert rc == 2 and "Traceback (most recent call last)" in err
  assert "eval.py: error: RuntimeError: device lost" in err and "--verbose shows" not in err


def test_stratified_max_examples(model_dir, tmp_path, capsys):
  labels = np.repeat(np.arange(4), [30, 30, 2, 30])
  picked = eval_data.stratified_subset(labels, 10, seed=0)
  assert list(picked) == sorted(picked) and len(set(picked)) == 10
  assert sorted(np.bincount(labels[picked], minlength=4)) == [2, 2, 3, 3]
  np.testing.assert_array_equal(picked, eval_data.stratified_subset(labels, 10, seed=0))
  assert not np.array_equal(picked, eval_data.stratified_subset(labels, 10, seed=1))
  np.testing.assert_array_equal(eval_data.stratified_subset(labels, 500, 0),
                                np.arange(92))
  # Class folders listed in class order: the first N files would all be
  # class "a"; the stratified draw takes 2 of each.
  root = tmp_path / "data"
  rng = np.random.default_rng(0)
  for name in "abc":
    (root / name).mkdir(parents=True)
    for i in range(5):
      Image.fromarray(rng.integers(0, 256, (20, 20, 3), np.uint8)).save(
          root / name / f"{i}.png")
  out = tmp_path / "out"
  rc, _, err = run(capsys, "--checkpoint", model_dir, "--data", root,
                   "--max-examples", "6", "--seed", "3", *QUICK, "--output", out)
  assert rc == 0, err
  assert "6 drawn with seed 3, 2 per class of 3" in err
  result = json.loads((out / "results.json").read_text())["results"][0]
  assert result["num_examples"] == 6
  assert "max-examples N" in eval_cli.help_text()


def test_cpu_defaults_and_hint(model_dir, tmp_path, capsys, monkeypatch):
  assert jax.default_backend() == "cpu"
  # The defaults, shortened so that the test stays fast.
  monkeypatch.setattr(eval_cli, "DEFAULT_GLIMPSES", (4, 8))
  rc, _, err = run(capsys, "--checkpoint", model_dir, "--data", "synthetic:3",
                   "--canvas-sizes", "32", "--workers", "0", "--no-plots",
                   "--output", tmp_path / "o")
  assert rc == 0, err
  assert ("eval.py: running on CPU: T 8 over 3 images x 1 settings will take "
          "roughly") in err
  assert "pass --glimpses 16,64,256 for a quick look" in err
  assert "batch 16" in err
  rc, _, err = run(capsys, "--checkpoint", model_dir, "--data", "synthetic:3",
                   *QUICK, "--output", tmp_path / "o2")
  assert rc == 0 and "running on CPU" not in err  # --glimpses given.
  assert "roughly 5 minutes" in eval_cli._cpu_hint(100, 1, 4096, 12, 256)  # pylint: disable=protected-access


def test_worker_process_error_reaches_the_user(model_dir, tmp_path, capsys):
  data = tmp_path / "data"
  (data / "a").mkdir(parents=True)
  Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(data / "a" / "good.png")
  (data / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
  rc, _, err = run(capsys, "--checkpoint", model_dir, "--data", data,
                   "--canvas-sizes", "32", "--glimpses", "4", "--batch-size", "2",
                   "--workers", "1", "--no-plots", "--output", tmp_path / "out")
  assert rc == 2
  line = _one_line_error(err, only=False)
  assert "unreadable image" in line and "broken.jpg" in line
  assert "--skip-bad-images" in line and "died" not in line


def test_worker_error_survives_pickling(monkeypatch):
  def fail(*args):
    del args
    raise RuntimeError("disk on fire")

  monkeypatch.setattr(eval_workers, "_worker_fill_unsafe", fail)
  with pytest.raises(eval_workers.WorkerError) as info:
    eval_workers._worker_fill(None, None, 0, 0, 0, [], False)  # pylint: disable=protected-access
  again = pickle.loads(pickle.dumps(info.value))
  assert str(again) == "RuntimeError: disk on fire" and not again.bad_image


def test_report_columns_and_plot_legend(tmp_path, plot_figures):
  report = {"meta": {}, "results": [{
      "canvas_size": 48, "resize": "fit", "scan": "random", "num_glimpses": 4,
      "num_examples": 2, "num_skipped": 0, "top1": {"4": 0.5}, "top5": {"4": 1.0},
      "top1_curve": [0.0, 0.5, 0.5, 0.5], "seconds": 3.0,
      "images_per_second": 10.0}]}
  md = eval_reports.markdown_report(report)
  assert "| wall s (incl. compile) | images/s (excl. compile) |" in md
  plots.accuracy_vs_glimpses(report, str(tmp_path / "g.png"))
  assert plot_figures[0].axes[0].get_title() == "random, fit"
  (legend,) = plot_figures[0].legends
  assert [t.get_text() for t in legend.get_texts()] == ["canvas 48"]
