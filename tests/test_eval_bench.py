"""Smoke test of benchmarks/bench_eval.py's command line (tiny, CPU)."""

import subprocess
import sys

import conftest
import pytest
from flax import nnx

from mambaeye_jax import model as model_lib

bench_eval = conftest.load_benchmark("bench_eval")


def test_bench_prints_every_stage(monkeypatch, capsys):
  def tiny(args, ssd_impl, chunk):
    del args
    config = model_lib.ModelConfig(depth=1, dim=32, num_classes=10, d_state=16,
                                   headdim=16, chunk_size=chunk or 16,
                                   ssd_impl=ssd_impl or "auto")
    return model_lib.MambaEye(config, rngs=nnx.Rngs(0))

  monkeypatch.setattr(bench_eval, "_model", tiny)
  rc = bench_eval.main(["--images", "synthetic:6", "--canvas", "32", "--glimpses", "8",
                        "--batch-size", "4", "--workers", "0", "--repeat", "2",
                        "--variants", "auto,chunked:8", "--device-repeats", "2"])
  out = capsys.readouterr().out
  assert rc == 0
  for stage in ("host: decode+resize+scan", "host->device copy",
                "device: gather+forward+score (chunked, chunk 8",
                "end to end", "END-TO-END:"):
    assert stage in out, out
  # "auto" resolves per backend (Pallas on GPU, chunked on CPU).
  table = [line for line in out.splitlines() if line.startswith("device: gather")]
  assert len(table) == 2, out


@pytest.mark.parametrize("module", ["mambaeye_jax.bench_eval", "mambaeye_jax.data.bench"])
def test_documented_module_commands_run_the_benchmarks(module):
  # The benchmarks moved to benchmarks/; the documented `python -m` commands
  # still run them.
  result = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True,
                          text=True, check=False, timeout=300)
  assert result.returncode == 0, result.stderr
  assert "usage:" in result.stdout
