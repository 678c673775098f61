"""Tests of eval.py: dataset mode, single-image mode, clear errors."""

import conftest
import json
import os
import sys

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from mambaeye_jax import model as model_lib
from mambaeye_jax import model_dir as model_dir_lib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


eval_cli = conftest.load_eval_cli("eval_cli")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  """A tiny random 10-class MambaEye saved as a model directory."""
  config = model_lib.ModelConfig(depth=1, dim=32, num_classes=10, d_state=16,
                                 headdim=16, chunk_size=16)
  model = model_lib.MambaEye(config, rngs=nnx.Rngs(3))
  path = str(tmp_path_factory.mktemp("ckpt") / "model")
  model_dir_lib.save_params(path, config, nnx.state(model, nnx.Param))
  return path


def run(capsys, *argv):
  rc = eval_cli.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return rc, out, err


def test_dataset_mode_writes_json_markdown_and_plots(model_dir, tmp_path, capsys):
  out_dir = tmp_path / "out"
  rc, out, err = run(capsys, "--checkpoint", model_dir, "--data", "synthetic:6",
                     "--canvas-sizes", "32,48", "--scan", "random,hilbert",
                     "--glimpses", "4,12", "--batch-size", "4", "--workers", "0",
                     "--output", out_dir)
  assert rc == 0, err
  assert "| scan | resize | glimpses | 32 | 48 |" in out
  assert "img/s" in err and "ETA" in err  # the progress line
  report = json.loads((out_dir / "results.json").read_text())
  assert report["meta"]["checkpoint"] == model_dir
  assert report["config"]["glimpse_counts"] == [4, 12]
  rows = report["results"]
  assert [(r["canvas_size"], r["scan"]) for r in rows] == [
      (32, "random"), (32, "hilbert"), (48, "random"), (48, "hilbert")]
  for r in rows:
    assert r["resize"] == "fit" and r["num_glimpses"] == 12
    assert r["resampler"] == "fast"
    assert r["num_examples"] == 6
    assert len(r["top1_curve"]) == len(r["top5_curve"]) == 12
    assert set(r["top1"]) == {"4", "12"}
    assert all(0.0 <= a <= b <= 1.0 for a, b in zip(r["top1_curve"], r["top5_curve"]))
  for name in ("accuracy_vs_resolution.png", "accuracy_vs_glimpses.png"):
    with Image.open(out_dir / name) as im:
      assert im.format == "PNG"


def test_a_stopped_grid_keeps_the_settings_it_scored(model_dir, tmp_path, capsys,
                                                    monkeypatch):
  from mambaeye_jax import eval_lib  # pylint: disable=g-import-not-at-top
  real = eval_lib.evaluate_setting
  calls = []

  def stopped_at_the_third(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
      raise KeyboardInterrupt
    return real(*args, **kwargs)

  monkeypatch.setattr(eval_lib, "evaluate_setting", stopped_at_the_third)
  out_dir = tmp_path / "out"
  argv = ["--checkpoint", model_dir, "--data", "synthetic:4", "--canvas-sizes", "32,48",
          "--scan", "random,hilbert", "--glimpses", "4", "--batch-size", "4",
          "--workers", "0", "--no-plots", "--output", out_dir]
  rc, _, err = run(capsys, *argv)
  assert rc == 130 and "interrupted" in err
  report = json.loads((out_dir / "results.json").read_text())
  assert report["meta"]["settings_done"] == "2 of 4"
  assert [(r["canvas_size"], r["scan"]) for r in report["results"]] == [
      (32, "random"), (32, "hilbert")]
  assert "| random | fit | 4 |" in (out_dir / "results.md").read_text()
  assert not list(out_dir.glob("*.tmp"))
  # The run that finishes replaces the partial report with the whole one.
  monkeypatch.setattr(eval_lib, "evaluate_setting", real)
  rc, _, err = run(capsys, *argv)
  assert rc == 0, err
  report = json.loads((out_dir / "results.json").read_text())
  assert "settings_done" not in report["meta"] and len(report["results"]) == 4
  assert report["meta"]["wall_seconds_incl_compile"] > 0


def test_reference_flag_selects_the_pil_resampler(model_dir, tmp_path, capsys):
  # Synthetic images are 24..160 px, so canvas 48 shrinks some and enlarges
  # others: the two resamplers' accuracies may differ, their reports say which.
  reports = {}
  for flag in ([], ["--reference"]):
    out_dir = tmp_path / ("ref" if flag else "fast")
    rc, _, err = run(capsys, "--checkpoint", model_dir, "--data", "synthetic:4",
                     "--canvas-sizes", "48", "--glimpses", "4", "--batch-size", "4",
                     "--workers", "0", "--no-plots", "--output", out_dir, *flag)
    assert rc == 0, err
    reports[bool(flag)] = json.loads((out_dir / "results.json").read_text())
  assert reports[False]["config"]["resampler"] == "fast"
  assert reports[True]["config"]["resampler"] == "reference"
  assert [r["resampler"] for r in reports[True]["results"]] == ["reference"]


@pytest.mark.parametrize("train_lib_imports", [True, False])
def test_workdir_falls_back_to_its_model_dir(model_dir, tmp_path, capsys, monkeypatch,
                                             train_lib_imports):
  if not train_lib_imports:
    # As on a machine without train_lib's dependencies (ml_collections).
    monkeypatch.setitem(sys.modules, "mambaeye_jax.train_lib", None)
  workdir = tmp_path / "work"
  workdir.mkdir()
  os.symlink(model_dir, workdir / "model")
  rc, _, err = run(capsys, "--workdir", workdir, "--data", "synthetic:2",
                   "--canvas-sizes", "32", "--glimpses", "12", "--batch-size", "4",
                   "--workers", "0", "--no-plots")
  assert rc == 0, err
  assert (workdir / "eval" / "results.json").exists()


def test_single_image_mode(model_dir, tmp_path, capsys):
  rng = np.random.default_rng(0)
  image = tmp_path / "n00000002_goldfish.png"
  Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(image)
  cmap = tmp_path / "classes.txt"
  cmap.write_text("".join(f"n0000000{k} class{k}\n" for k in range(10)))
  rc, out, err = run(capsys, "--checkpoint", model_dir, "--image", image,
                     "--class-map", cmap, "--canvas-sizes", "32", "--glimpses", "12",
                     "--output", tmp_path / "out")
  assert rc == 0, err
  ranks = [line for line in out.splitlines() if line.strip()[:2] in
           ("1.", "2.", "3.", "4.", "5.")]
  assert len(ranks) == 5 and all("class" in line and "%" in line for line in ranks)
  png = tmp_path / "out" / "n00000002_goldfish_glimpses.png"
  assert png.exists() and f"glimpse path: {png}" in out


@pytest.mark.parametrize("case", ["missing", "not_a_model", "garbage_pt"])
def test_bad_checkpoints(case, tmp_path, capsys):
  path = tmp_path / "ckpt"
  if case == "not_a_model":
    path.mkdir()
    (path / "weights.bin").write_bytes(b"123")
  elif case == "garbage_pt":
    path = tmp_path / "model.pt"
    path.write_bytes(b"this is not a torch file")
  rc, _, err = run(capsys, "--checkpoint", path, "--data", "synthetic:2",
                   "--workers", "0")
  assert rc == 2
  assert "eval.py: error:" in err
  want = "does not exist" if case == "missing" else "cannot load a MambaEye"
  assert want in err and str(path) in err


def test_unknown_scan_pattern(model_dir, capsys):
  rc, _, err = run(capsys, "--checkpoint", model_dir, "--data", "synthetic:2",
                   "--scan", "zigzagzoom")
  assert rc == 2 and "unknown scan pattern 'zigzagzoom'" in err and "hilbert" in err


def test_corrupt_image(model_dir, tmp_path, capsys):
  bad = tmp_path / "broken.jpg"
  bad.write_bytes(b"\xff\xd8\xff garbage")
  rc, _, err = run(capsys, "--checkpoint", model_dir, "--image", bad,
                   "--canvas-sizes", "32", "--glimpses", "4")
  assert rc == 2 and "unreadable image" in err and "broken.jpg" in err
  data = tmp_path / "data"
  (data / "a").mkdir(parents=True)
  (data / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
  rc, _, err = run(capsys, "--checkpoint", model_dir, "--data", data,
                   "--canvas-sizes", "32", "--glimpses", "4", "--workers", "0")
  assert rc == 2 and "broken.jpg" in err and "--skip-bad-images" in err


def test_missing_dataset(model_dir, tmp_path, capsys):
  rc, _, err = run(capsys, "--checkpoint", model_dir, "--data", tmp_path / "nope")
  assert rc == 2 and "does not exist" in err


@pytest.mark.parametrize("argv, want", [
    (("--checkpoint", "m", "--data", "synthetic:2", "--canvas-sizes", "48,big"),
     "flag --canvas-sizes=48,big: expected comma-separated integers, got '48,big'"),
    (("--checkpoint", "m", "--data", "synthetic:2", "--dtype", "f16"),
     "flag --dtype=f16: value should be one of <auto|float32|bfloat16>"),
    (("--checkpoint", "m", "--data", "synthetic:2", "--bogus"),
     "Unknown command line flag 'bogus'"),
    (("--data", "synthetic:2"), "one of --checkpoint or --workdir is required"),
    (("--checkpoint", "m", "--workdir", "w", "--data", "synthetic:2"),
     "--checkpoint and --workdir cannot be given together"),
    (("--checkpoint", "m"), "one of --data or --image is required"),
    (("--checkpoint", "m", "--data", "synthetic:2", "stray"),
     "unexpected arguments: stray"),
])
def test_usage_errors_name_the_flag(capsys, argv, want):
  """A bad command line: one line naming the flag and the reason, status 2,
  before anything is loaded."""
  rc, out, err = run(capsys, *argv)
  assert rc == 2 and not out
  assert err.strip().splitlines() == [
      f"eval.py: error: {want} (eval.py --help lists the flags)"]


def test_flags_parse_as_absl(capsys):
  """--flag=value and --flag value alike; every call starts from the
  defaults (values of an earlier main() do not stay set)."""
  args = eval_cli.parse_flags(["--checkpoint=m", "--data", "synthetic:2",
                               "--canvas-sizes", "48,64", "--scan=random,hilbert",
                               "--no-plots", "--batch-size=3"])
  assert args.canvas_sizes == (48, 64) and args.scan == ("random", "hilbert")
  assert args.no_plots and args.batch_size == 3 and args.glimpses is None
  args = eval_cli.parse_flags(["--workdir", "w", "--image", "x.jpg"])
  assert args.checkpoint is None and args.canvas_sizes == (512,)
  assert args.scan == ("random",) and args.resize == ("fit",) and not args.no_plots


def test_help_lists_every_flag(capsys):
  rc, out, _ = run(capsys, "--help")
  assert rc == 0
  for name in eval_cli.FLAGS:
    assert f"--{name}:" in out or f"--[no]{name}:" in out, name
  assert "canvas sides, comma-separated" in out and "(default: '512')" in out
