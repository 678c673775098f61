"""benchmarks/compare_runs.py: several eval.py reports as one table and plot.

Runs the script as a user does, on the loss-ablation reports committed under
docs/results/cifar10 (the figures docs/RESULTS.md quotes).
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "docs", "results", "cifar10")


def _run(*args):
  return subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "compare_runs.py"),
                         *args], capture_output=True, text=True, cwd=ROOT, check=False)


def test_table_and_plot_from_the_committed_ablation(tmp_path):
  plot = tmp_path / "ablation.png"
  result = _run(f"step-wise={RESULTS}/loss_stepwise.json",
                f"ce-last={RESULTS}/loss_ce_last_step.json", "--plot", str(plot))
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines[0] == "| glimpses | step-wise @32 | ce-last @32 | step-wise @64 | ce-last @64 |"
  with open(f"{RESULTS}/loss_stepwise.json") as f:
    stepwise = json.load(f)
  with open(f"{RESULTS}/loss_ce_last_step.json") as f:
    ce_last = json.load(f)
  row = {int(line.split("|")[1]): line for line in lines[2:] if line.startswith("| ")}
  cells = row[128].split("|")[2:-1]
  expected = [stepwise["results"][0], ce_last["results"][0],
              stepwise["results"][1], ce_last["results"][1]]
  assert [float(c) for c in cells] == [round(100 * r["top1"]["128"], 2) for r in expected]
  assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_folder_stands_for_its_results_json(tmp_path):
  folder = tmp_path / "eval"
  folder.mkdir()
  with open(f"{RESULTS}/loss_stepwise.json") as f:
    (folder / "results.json").write_text(f.read())
  result = _run(f"a={folder}")
  assert result.returncode == 0, result.stderr
  assert "| glimpses | a @32 | a @64 |" in result.stdout


def test_bad_specs_name_the_problem(tmp_path):
  assert "give NAME=PATH" in _run("no_equals_sign").stderr
  assert "does not exist" in _run(f"x={tmp_path}/missing.json").stderr
  other = tmp_path / "other.json"
  other.write_text("{}")
  assert "is not an eval.py report" in _run(f"x={other}").stderr
