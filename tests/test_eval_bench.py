"""Smoke test of benchmarks/bench_eval.py's command line (tiny, CPU)."""

import subprocess
import sys

import conftest
import pytest
from flax import nnx

from mambaeye_jax import model as model_lib

bench_eval = conftest.load_benchmark("bench_eval")


def _tiny(args, ssd_impl, chunk):
  del args
  config = model_lib.ModelConfig(depth=1, dim=32, num_classes=10, d_state=16,
                                 headdim=16, chunk_size=chunk or 16,
                                 ssd_impl=ssd_impl or "auto")
  return model_lib.MambaEye(config, rngs=nnx.Rngs(0))


def test_bench_prints_every_stage(monkeypatch, capsys):
  monkeypatch.setattr(bench_eval, "_model", _tiny)
  rc = bench_eval.main(["--images", "synthetic:6", "--canvas", "32", "--glimpses", "8",
                        "--batch-size", "4", "--workers", "0", "--repeat", "2",
                        "--variants", "auto,chunked:8", "--device-repeats", "2"])
  out = capsys.readouterr().out
  assert rc == 0
  for stage in ("host: decode+resize+scan, fast", "host: decode+resize+scan, reference",
                "host->device copy", "device: gather+forward+score (chunked, chunk 8",
                "end to end, fast", "end to end, reference", "e2e % of device",
                "END-TO-END fast:", "END-TO-END reference:"):
    assert stage in out, out
  # The summary: one row per path, end to end a percentage of device-only.
  summary = [line.split() for line in out.splitlines()
             if line.split()[:1] in (["fast"], ["reference"])]
  assert [row[0] for row in summary] == ["fast", "reference"], out
  for row in summary:
    assert row[-1].endswith("%") and 0 < float(row[-1][:-1]), out
  # "auto" resolves per backend (Pallas on GPU, chunked on CPU).
  table = [line for line in out.splitlines() if line.startswith("device: gather")]
  assert len(table) == 2, out


def test_bench_reference_flag_times_the_reference_path_only(monkeypatch, capsys):
  monkeypatch.setattr(bench_eval, "_model", _tiny)
  rc = bench_eval.main(["--images", "synthetic:4", "--canvas", "32", "--glimpses", "4",
                        "--batch-size", "4", "--workers", "0", "--repeat", "1",
                        "--variants", "chunked:8", "--device-repeats", "1", "--reference"])
  out = capsys.readouterr().out
  assert rc == 0
  assert "END-TO-END reference:" in out and "END-TO-END fast" not in out, out


@pytest.mark.parametrize("module", ["mambaeye_jax.bench_eval", "mambaeye_jax.data.bench"])
def test_documented_module_commands_run_the_benchmarks(module):
  # The benchmarks moved to benchmarks/; the documented `python -m` commands
  # still run them.
  result = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True,
                          text=True, check=False, timeout=300)
  assert result.returncode == 0, result.stderr
  assert "usage:" in result.stdout
