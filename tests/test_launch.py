"""The launch paths of docs/training.md ("Launching"), as far as one machine allows.

* The environment-variable path (MAMBAEYE_COORDINATOR, MAMBAEYE_NUM_PROCESSES,
  MAMBAEYE_PROCESS_ID): two local `train.py` processes train, agree that
  there are 2 processes, and leave a checkpoint and the model. (The flag path
  is tests/test_sharding.py's two-process test.)
* MAMBAEYE_DISTRIBUTED=auto under SLURM: JAX's SlurmCluster resolves the
  coordinator, process count and id from SLURM's variables (in process, and
  with two local processes joined through the coordinator it derives), and
  which GPUs a process gets on each path inside a SLURM job.
* How `sharding.initialize_distributed` hands flags and variables to
  `jax.distributed.initialize` (recorded, nothing started).

TPU pods (JAX's GCE TPU detection) need a TPU VM and are not tested here.
"""

import os
import socket
import sys
import textwrap

import conftest
import pytest

from mambaeye_jax import sharding

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every variable the launch paths read; cleared so the host's own can't leak in.
_LAUNCH_VARS = ("MAMBAEYE_COORDINATOR", "MAMBAEYE_NUM_PROCESSES", "MAMBAEYE_PROCESS_ID",
                "MAMBAEYE_DISTRIBUTED", "JAX_COORDINATOR_ADDRESS", "JAX_COORDINATOR_PORT",
                "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS")


def _clean_environ() -> dict:
  return {k: v for k, v in os.environ.items()
          if k not in _LAUNCH_VARS and not k.startswith(("SLURM_", "OMPI_", "PMI_"))}


def _env(cache_dir, **extra) -> dict:
  return conftest.subprocess_env(cache_dir, environ=_clean_environ(), **extra)


def _port_is_free(port: int) -> bool:
  with socket.socket() as s:
    try:
      s.bind(("127.0.0.1", port))
    except OSError:
      return False
  return True


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("jax_cache")


# ----------------------------------------------------------------------------
# initialize_distributed: what reaches jax.distributed.initialize.


@pytest.fixture
def recorded_initialize(monkeypatch):
  """Replaces jax.distributed.initialize by a recorder; clears launch variables."""
  import jax  # pylint: disable=g-import-not-at-top
  for name in list(os.environ):
    if name in _LAUNCH_VARS or name.startswith("SLURM_"):
      monkeypatch.delenv(name)
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  return calls


def test_single_process_by_default(recorded_initialize):
  assert not sharding.initialize_distributed()
  assert not recorded_initialize


def test_environment_variables_reach_jax(recorded_initialize, monkeypatch):
  monkeypatch.setenv("MAMBAEYE_COORDINATOR", "10.0.0.1:8476")
  monkeypatch.setenv("MAMBAEYE_NUM_PROCESSES", "4")
  monkeypatch.setenv("MAMBAEYE_PROCESS_ID", "3")
  assert sharding.initialize_distributed()
  (call,) = recorded_initialize
  assert call["coordinator_address"] == "10.0.0.1:8476"
  assert call["num_processes"] == 4 and call["process_id"] == 3
  # All three given: no cluster detection may change them (or the GPUs).
  assert call["cluster_detection_method"] == "deactivate"


def test_flags_win_over_environment_variables(recorded_initialize, monkeypatch):
  monkeypatch.setenv("MAMBAEYE_COORDINATOR", "10.0.0.1:8476")
  monkeypatch.setenv("MAMBAEYE_NUM_PROCESSES", "4")
  monkeypatch.setenv("MAMBAEYE_PROCESS_ID", "3")
  assert sharding.initialize_distributed("host0:1234", 2, 0)
  (call,) = recorded_initialize
  assert (call["coordinator_address"], call["num_processes"], call["process_id"]) == (
      "host0:1234", 2, 0)


def test_auto_leaves_everything_to_jax(recorded_initialize, monkeypatch):
  monkeypatch.setenv("MAMBAEYE_DISTRIBUTED", "auto")
  assert sharding.initialize_distributed()
  (call,) = recorded_initialize
  assert call["coordinator_address"] is None
  assert call["num_processes"] is None and call["process_id"] is None
  assert call["cluster_detection_method"] is None


def test_partial_settings_leave_the_rest_to_jax(recorded_initialize, monkeypatch):
  monkeypatch.setenv("MAMBAEYE_COORDINATOR", "10.0.0.1:8476")
  assert sharding.initialize_distributed()
  (call,) = recorded_initialize
  assert call["num_processes"] is None and call["process_id"] is None
  assert call["cluster_detection_method"] is None


def test_process_count_without_coordinator_is_an_error(recorded_initialize, monkeypatch):
  monkeypatch.setenv("MAMBAEYE_NUM_PROCESSES", "2")
  with pytest.raises(ValueError, match="needs a coordinator address"):
    sharding.initialize_distributed()


# ----------------------------------------------------------------------------
# SLURM: JAX's own detection, which MAMBAEYE_DISTRIBUTED=auto relies on.


def _slurm_vars(job_id: int, ntasks: int, procid: int, localid: int,
                nodelist: str) -> dict:
  """What srun sets for one task (the subset JAX's SlurmCluster reads)."""
  return {"SLURM_JOB_ID": str(job_id), "SLURM_STEP_NODELIST": nodelist,
          "SLURM_NTASKS": str(ntasks), "SLURM_PROCID": str(procid),
          "SLURM_LOCALID": str(localid)}


@pytest.mark.parametrize("nodelist,host", [
    ("gpu017", "gpu017"),
    ("gpu017,gpu018", "gpu017"),
    ("gpu[017-020]", "gpu017"),
    ("gpu[003,007-009],cpu1", "gpu003"),
])
def test_slurm_detection_resolves_the_job(monkeypatch, nodelist, host):
  from jax._src import clusters  # pylint: disable=g-import-not-at-top
  for name in list(os.environ):
    if name.startswith("SLURM_") or name == "JAX_COORDINATOR_PORT":
      monkeypatch.delenv(name)
  for k, v in _slurm_vars(123456, 16, 9, 1, nodelist).items():
    monkeypatch.setenv(k, v)
  address, count, pid, local_ids = clusters.ClusterEnv.auto_detect_unset_distributed_params(
      None, None, None, None, None, None)
  # The port is derived from the job id: 61440 + job_id % 4096.
  assert address == f"{host}:{61440 + 123456 % 4096}"
  assert (count, pid) == (16, 9)
  # One process per GPU: task SLURM_LOCALID uses GPU SLURM_LOCALID. (With one
  # task per node this would be GPU 0 alone; docs/training.md says so.)
  assert list(local_ids) == [1]
  # JAX_COORDINATOR_PORT overrides the derived port.
  monkeypatch.setenv("JAX_COORDINATOR_PORT", "5555")
  address, *_ = clusters.ClusterEnv.auto_detect_unset_distributed_params(
      None, None, None, None, None, None)
  assert address == f"{host}:5555"


_JOIN = """
    import jax, numpy as np
    from jax.experimental import multihost_utils
    from mambaeye_jax import sharding
    assert sharding.initialize_distributed()
    ids = multihost_utils.process_allgather(np.int32(jax.process_index()))
    print("JOINED", jax.process_index(), jax.process_count(), jax.device_count(),
          sorted(int(i) for i in ids))
    # The GPUs this process would use (CPU runs ignore it; JAX sets it from
    # the local device ids it was given or detected).
    from jax._src import xla_bridge
    print("VISIBLE", xla_bridge.CUDA_VISIBLE_DEVICES.value)
"""


def test_slurm_auto_two_local_processes(cache_dir, tmp_path):
  """MAMBAEYE_DISTRIBUTED=auto with srun's variables joins two processes."""
  # JAX takes the coordinator's port from the job id; choose an id whose
  # port is free here.
  job_id = next(j for j in range(1000 + os.getpid() % 3000, 4096)
                if _port_is_free(61440 + j))
  runs = []
  for pid in range(2):
    env = _env(cache_dir, MAMBAEYE_DISTRIBUTED="auto",
               **_slurm_vars(job_id, 2, pid, pid, "localhost"))
    runs.append(([sys.executable, "-c", textwrap.dedent(_JOIN)], env))
  results = conftest.run_processes(runs, tmp_path, timeout=120)
  for pid, (rc, out) in enumerate(results):
    assert rc == 0, out[-6000:]
    assert f"JOINED {pid} 2 2 [0, 1]" in out, out[-3000:]
    # One task per GPU: task i uses GPU i.
    assert f"VISIBLE {pid}\n" in out, out[-3000:]


def test_gpus_per_process_under_slurm(cache_dir, tmp_path):
  """Which GPUs a one-task-per-node SLURM process gets on each path.

  Each case is a one-process job (SLURM_LOCALID 0, as srun sets it for the
  only task on a node).
  """
  cases = {
      # The explicit path ignores SLURM: every GPU of the node.
      "explicit": ({"MAMBAEYE_COORDINATOR": f"localhost:{conftest.free_port()}",
                    "MAMBAEYE_NUM_PROCESSES": "1", "MAMBAEYE_PROCESS_ID": "0"}, "all"),
      # auto: JAX's SLURM detection keeps GPU SLURM_LOCALID only...
      "auto": ({"MAMBAEYE_DISTRIBUTED": "auto", "JAX_COORDINATOR_PORT": str(conftest.free_port())},
               "0"),
      # ...unless JAX_LOCAL_DEVICE_IDS names them (docs/training.md).
      "auto+ids": ({"MAMBAEYE_DISTRIBUTED": "auto",
                    "JAX_COORDINATOR_PORT": str(conftest.free_port()),
                    "JAX_LOCAL_DEVICE_IDS": "0,1,2,3"}, "0,1,2,3"),
  }
  runs = []
  for extra, _ in cases.values():
    env = _env(cache_dir, **_slurm_vars(4242, 1, 0, 0, "localhost"), **extra)
    runs.append(([sys.executable, "-c", textwrap.dedent(_JOIN)], env))
  results = conftest.run_processes(runs, tmp_path, timeout=120)
  for (name, (_, visible)), (rc, out) in zip(cases.items(), results):
    assert rc == 0, f"{name}:\n{out[-6000:]}"
    assert "JOINED 0 1 1 [0]" in out, f"{name}:\n{out[-3000:]}"
    assert f"VISIBLE {visible}\n" in out, f"{name}:\n{out[-3000:]}"


# ----------------------------------------------------------------------------
# The environment-variable path, end to end through train.py.


@pytest.mark.slow
def test_environment_variable_path_trains_two_processes(cache_dir, tmp_path):
  workdir = tmp_path / "w"
  port = conftest.free_port()
  runs = []
  for pid in range(2):
    # In-process batches: the Grain pipeline on two processes is
    # tests/test_sharding.py's; this test is about the launch.
    cmd = conftest.smoke_train_cmd(workdir, 2, "--config.data.source=fake")
    env = _env(cache_dir, MAMBAEYE_COORDINATOR=f"localhost:{port}",
               MAMBAEYE_NUM_PROCESSES="2", MAMBAEYE_PROCESS_ID=str(pid))
    runs.append((cmd, env))
  results = conftest.run_processes(runs, tmp_path)
  for rc, out in results:
    assert rc == 0, out[-6000:]
  # The line docs/training.md tells users to look for, on every process.
  for rc, out in results:
    assert "2 devices on 2 processes" in out, out[-3000:]
  assert "step 2/2" in results[0][1]  # Only process 0 prints progress.
  assert "step 2/2" not in results[1][1]
  assert "2" in os.listdir(workdir / "checkpoints")
  data_files = set(os.listdir(workdir / "checkpoints" / "2" / "data"))
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= data_files, data_files
  assert (workdir / "model" / "config.json").exists()
  assert (workdir / "train_config.json").exists()
