"""benchmarks/compare_resolution.py: MambaEye and MambaOut top-1 per canvas.

Runs the script as a user does, on the reports committed under
docs/results/cifar10 (the figures docs/RESULTS.md section 4 quotes).
"""

import json
import os
import subprocess
import sys

from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "docs", "results", "cifar10")
MAMBAEYE = f"eye={RESULTS}/grid_h100_canvas128.json"
MAMBAOUT = f"out={RESULTS}/mambaout_h100.json"


def _run(*args):
  return subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "compare_resolution.py"),
                         *args], capture_output=True, text=True, cwd=ROOT, check=False)


def _load(name):
  with open(f"{RESULTS}/{name}") as f:
    return json.load(f)


def test_table_and_plot_of_both_kinds_of_report(tmp_path):
  plot = tmp_path / "cmp.png"
  result = _run(MAMBAEYE, MAMBAOUT, "--glimpses", "16,1024", "--plot", str(plot))
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  canvases = (32, 48, 64, 96, 128, 192, 256)
  assert lines[0] == "| model | " + " | ".join(f"canvas {c}" for c in canvases) + " |"
  eye = {(r["scan"], r["canvas_size"]): r["top1"] for r in _load("grid_h100_canvas128.json")["results"]}
  out = _load("mambaout_h100.json")["eval"]
  cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:5]]
  rows = {row[0]: [float(c) for c in row[1:]] for row in cells}
  assert list(rows) == ["eye, T=16", "eye, T=1024", "out"]
  assert lines[5] == f"plot: {plot}"
  for i, c in enumerate(canvases):
    assert rows["eye, T=16"][i] == round(100 * eye[("random", c)]["16"], 2)
    assert rows["eye, T=1024"][i] == round(100 * eye[("random", c)]["1024"], 2)
    assert rows["out"][i] == round(100 * out[str(c)]["top1"], 2)
  with Image.open(plot) as im:
    assert im.format == "PNG" and im.size[0] > 300


def test_another_scan_order_is_read():
  result = _run(MAMBAEYE, "--scan", "hilbert", "--glimpses", "64")
  assert result.returncode == 0, result.stderr
  hilbert = {r["canvas_size"]: r["top1"]["64"] for r in _load("grid_h100_canvas128.json")["results"]
             if r["scan"] == "hilbert"}
  assert result.stdout.splitlines()[2].startswith(f"| eye | {100 * hilbert[32]:.2f} |")


def test_errors_name_the_file_and_what_it_lacks(tmp_path):
  result = _run(MAMBAEYE, "--glimpses", "100")
  assert result.returncode != 0
  assert "grid_h100_canvas128.json was not scored at 100 glimpses" in result.stderr
  assert "16, 32, 64, 128, 256, 512, 1024" in result.stderr
  result = _run(MAMBAEYE, "--scan", "golden")
  assert "has no golden/fit setting (it has hilbert/fit, horizontal_raster/fit" in result.stderr
  other = tmp_path / "other.json"
  other.write_text(json.dumps({"accuracy": 0.5}))
  result = _run(f"x={other}")
  assert "is neither an eval.py report" in result.stderr
  result = _run(f"x={tmp_path}/missing.json")
  assert "missing.json does not exist" in result.stderr
  result = _run(MAMBAEYE, "--glimpses", "many")
  assert "--glimpses takes whole numbers, got many" in result.stderr
