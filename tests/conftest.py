"""Shared test fixtures: golden outputs, CUDA lowering, the compilation
cache of the training tests, the eval.py command line as a module."""

import glob
import importlib
import importlib.util
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def golden_dir() -> str:
  """MAMBAEYE_GOLDEN_DIR, or ../shared/golden beside the repository."""
  return os.environ.get("MAMBAEYE_GOLDEN_DIR",
                        os.path.join(REPO_ROOT, "..", "shared", "golden"))


def golden_pairs():
  """[(name, state_dict path, io npz path)] for every official_<name>.pt."""
  pairs = []
  for pt in sorted(glob.glob(os.path.join(golden_dir(), "official_*.pt"))):
    name = os.path.basename(pt)[len("official_"):-len(".pt")]
    npz = os.path.join(golden_dir(), f"official_{name}_io.npz")
    if os.path.exists(npz):
      pairs.append((name, pt, npz))
  return pairs


@pytest.fixture(params=golden_pairs() or [None],
                ids=lambda p: p[0] if p else "no-golden")
def golden(request):
  """One (name, .pt path, npz path) golden pair; skips when none exist."""
  if request.param is None:
    pytest.skip(f"no official_<name>.pt + _io.npz pairs in {golden_dir()} "
                "(set MAMBAEYE_GOLDEN_DIR)")
  return request.param


@pytest.fixture
def cuda_lowering():
  """(fn, *args) -> StableHLO text of jax.jit(fn) exported for CUDA.

  Runs the Triton lowering of Pallas GPU kernels on a machine without a GPU;
  the Triton custom call has no serialisation guarantee, which export checks
  for, so that one check is turned off.
  """
  def lower(fn, *args):
    exported = jax.export.export(
        jax.jit(fn), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(*args)
    return exported.mlir_module()

  return lower


@pytest.fixture
def plot_figures(monkeypatch):
  """The matplotlib figures that `mambaeye_jax.plots` draws, in order.

  Wraps the module's figure factory, so a test reads the axes, lines and
  legends of a plot instead of its PNG's pixels.
  """
  from mambaeye_jax import plots  # pylint: disable=g-import-not-at-top
  figures = []
  make = plots._figure  # pylint: disable=protected-access
  monkeypatch.setattr(plots, "_figure",
                      lambda *a, **k: figures.append(make(*a, **k)) or figures[-1])
  return figures


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
  """A persistent JAX compilation cache for one test module (restored after).

  Modules that train several tiny runs use it (`pytestmark =
  pytest.mark.usefixtures("compilation_cache")`), so each compiles once.
  """
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  old = {n: getattr(jax.config, n) for n in names}
  values = (str(tmp_path_factory.mktemp("jax_cache")), 0.0, 0)
  for name, value in zip(names, values):
    jax.config.update(name, value)
  yield values[0]
  for name, value in old.items():
    jax.config.update(name, value)


def load_eval_cli(module_name: str):
  """eval.py (a script, not a package module) imported as `module_name`."""
  spec = importlib.util.spec_from_file_location(
      module_name, os.path.join(REPO_ROOT, "eval.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_benchmark(name: str):
  """benchmarks/<name>.py imported as a module (benchmarks/ is a folder of
  scripts, not a package: its scripts import their siblings)."""
  folder = os.path.join(REPO_ROOT, "benchmarks")
  if folder not in sys.path:
    sys.path.insert(0, folder)
  return importlib.import_module(name)


def random_params(config, seed: int = 0, scale: float = 0.2):
  """Random float32 parameters of a MambaEye config's shapes (a pure dict).

  Drawn directly with numpy: the eager `MambaEye(...)` initialisation takes
  seconds on a busy CPU, and tests of loading and evaluation only need some
  weights of the right shapes.
  """
  from mambaeye_jax import model_dir  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  shapes = nnx.to_pure_dict(nnx.state(model_dir.abstract_model(config), nnx.Param))
  return jax.tree.map(
      lambda s: (scale * rng.standard_normal(s.shape)).astype(np.float32), shapes)


def fake_train_config(steps: int):
  """configs/smoke.py on in-process fake batches, logging every step: the
  cheapest whole training run (`train_data.FakeBatches`)."""
  import sys  # pylint: disable=g-import-not-at-top
  if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
  from configs import smoke  # pylint: disable=g-import-not-at-top
  c = smoke.get_config()
  c.data.source = "fake"
  c.num_train_steps = steps
  c.log_every_steps = 1
  c.checkpoint_every_steps = 100
  return c


def subprocess_env(cache_dir, devices: int = 1, environ: dict | None = None,
                   **extra) -> dict:
  """Environment of a test's JAX subprocess: this checkout importable, CPU
  with `devices` simulated devices, a compilation cache shared by the
  subprocesses in `cache_dir`, then `extra` (from `environ`, default ours)."""
  env = dict(os.environ if environ is None else environ)
  env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                      + f" --xla_force_host_platform_device_count={devices}").strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  env.update(extra)
  return env


def smoke_train_cmd(workdir, steps: int, *extra: str) -> list[str]:
  """train.py on configs/smoke.py for a multi-process test: `steps` steps,
  a checkpoint every 2, the stop agreement every step; `extra` flags after."""
  return [sys.executable, os.path.join(REPO_ROOT, "train.py"),
          "--config", os.path.join(REPO_ROOT, "configs", "smoke.py"),
          "--workdir", str(workdir), f"--config.num_train_steps={steps}",
          "--config.checkpoint_every_steps=2", "--config.sync_stop_every_steps=1", *extra]


def free_port() -> int:
  """A TCP port free on localhost now (for a coordinator)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_processes(cmds_envs, cwd, timeout: int = 240) -> list[tuple[int, str]]:
  """Starts every (cmd, env) at once; [(returncode, stdout + stderr)]."""
  procs = [subprocess.Popen(cmd, env=env, cwd=str(cwd), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
           for cmd, env in cmds_envs]
  results = []
  try:
    for p in procs:
      out, _ = p.communicate(timeout=timeout)
      results.append((p.returncode, out))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return results
