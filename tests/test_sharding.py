"""Data parallelism on simulated devices and on two CPU processes.

XLA's simulated device count must be set before JAX starts, so each check
runs in a fresh Python subprocess. Compiled programs go to a persistent
cache shared by the subprocesses of this file.
"""

import os
import subprocess
import sys
import textwrap
import types

import conftest
import numpy as np
import pytest

from mambaeye_jax import sharding

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(cache_dir, devices: int = 1, **extra) -> dict:
  return conftest.subprocess_env(cache_dir, devices, **extra)


def _run(code: str, env: dict, timeout: int = 240) -> str:
  proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                        capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)
  assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout}\n{proc.stderr[-6000:]}"
  return proc.stdout


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("jax_cache")


def test_local_batch_size_rejects_uneven_batches():
  eight = types.SimpleNamespace(size=8)  # Only the mesh's size matters.
  assert sharding.local_batch_size(16, eight) == 16  # One process here.
  with pytest.raises(ValueError, match="multiple of the number of devices"):
    sharding.local_batch_size(12, eight)


def test_global_batch_places_every_array_as_the_per_process_path_does():
  import jax  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh()
  local = {"source": np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3),
           "labels": np.array([3, 7], np.int32), "mask": np.array([[True, False]] * 2)}
  batch = sharding.global_batch(local, mesh)
  want = sharding.batch_sharding(mesh)
  for k, v in local.items():
    per_process = jax.make_array_from_process_local_data(want, v)
    assert batch[k].sharding == per_process.sharding == want, k
    assert batch[k].dtype == v.dtype and batch[k].shape == v.shape, k
    np.testing.assert_array_equal(np.asarray(batch[k]), np.asarray(per_process))


def test_make_mesh_rejects_too_many_devices():
  import jax  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="devices are visible"):
    sharding.make_mesh(len(jax.devices()) + 1)


# The subprocess scripts' common start: a one-block model and
# `compiled_step(n)`, the train step compiled over a mesh of n devices.
_STEP_ON_MESH = """
    import json, jax, numpy as np
    from mambaeye_jax import optim, sharding, train_data, train_step
    from mambaeye_jax import model as model_lib
    assert jax.device_count() == 8, jax.devices()
    mc = model_lib.get_config("tiny", depth=1, dim=32, d_state=8, headdim=32,
                              num_classes=10, chunk_size=8, ssd_impl=SSD_IMPL)
    ocfg = optim.OptimConfig(total_steps=10, warmup_steps=1)
    tx = optim.make_optimizer(ocfg)
    graphdef = train_step.model_graphdef(mc)

    def compiled_step(n):
      mesh = sharding.make_mesh(n)
      state, shardings, _ = train_step.create_train_state(mc, tx, 0, mesh)
      step = train_step.compile_train_step(
          train_step.make_train_step(graphdef, tx, optim.learning_rate_schedule(ocfg), (4,)),
          shardings, mesh)
      return mesh, state, step
"""


_EIGHT_DEVICES = _STEP_ON_MESH + """
    local = next(train_data.FakeBatches(16, 16, 10, seed=3))
    out = {}
    for n in (1, 8):
      mesh, state, step = compiled_step(n)
      batch = sharding.global_batch(local, mesh)
      assert len(batch["patches"].sharding.device_set) == n
      assert batch["patches"].addressable_shards[0].data.shape[0] == 16 // n
      for _ in range(2):
        state, metrics = step(state, batch)
      kernel = state["params"]["blocks"]["mixer"]["in_proj"]["kernel"]
      assert kernel.sharding.is_fully_replicated
      out[n] = (float(metrics["loss"]), sharding.to_host(state["params"]),
                float(metrics["grad_norm"]))
    loss_diff = abs(out[1][0] - out[8][0])
    param_diff = max(float(np.max(np.abs(a - b))) for a, b in
                     zip(jax.tree.leaves(out[1][1]), jax.tree.leaves(out[8][1])))
    print(json.dumps({"loss1": out[1][0], "loss8": out[8][0], "loss_diff": loss_diff,
                      "param_diff": param_diff,
                      "grad_norm_rel_diff": abs(out[1][2] - out[8][2]) / out[1][2]}))
"""


@pytest.mark.parametrize("ssd_impl", ["chunked", "pallas_interpret"])
def test_eight_devices_match_one_device(cache_dir, ssd_impl):
  """Also through the kernel path, which ssd.shard_over_batch splits by hand."""
  import json  # pylint: disable=g-import-not-at-top
  script = _EIGHT_DEVICES.replace("SSD_IMPL", repr(ssd_impl))
  out = json.loads(_run(script, _env(cache_dir, devices=8)).strip().splitlines()[-1])
  assert np.isfinite(out["loss1"])
  assert out["loss_diff"] < 1e-5, out
  assert out["grad_norm_rel_diff"] < 1e-5, out
  # Adam divides by sqrt(v): near-zero gradients turn summation-order
  # rounding into differences of a few percent of one step (lr 1e-3).
  assert out["param_diff"] < 5e-5, out


_RESHARD = """
    import sys, jax
    from mambaeye_jax import train_lib
    sys.path.insert(0, ".")
    from configs import smoke
    workdir = "{workdir}"
    c = smoke.get_config()
    c.data.source = "fake"
    c.checkpoint_every_steps = 2
    c.num_devices = 8
    c.num_train_steps = 2
    first = train_lib.train_and_evaluate(c, workdir)
    c.num_devices = 2   # Resume the 8-device checkpoint on 2 devices.
    c.num_train_steps = 4
    second = train_lib.train_and_evaluate(c, workdir)
    print("STEPS", first["step"], second["step"])
"""


_CANVAS_EIGHT = _STEP_ON_MESH.replace("SSD_IMPL", repr("chunked")) + """
    from mambaeye_jax.data import geometry
    canvas = next(train_data.FakeBatches(16, 16, 10, seed=3, ship="canvas"))
    canvas["mask"][3, 9:] = False  # A row with padding steps, zero patches there.
    patches = {k: v for k, v in canvas.items() if k != "canvas"}
    patches["patches"] = np.stack([geometry.extract_patches(c, p) for c, p in
                                   zip(canvas["canvas"], canvas["positions"])])
    patches["patches"][~canvas["mask"]] = 0
    out, hlo = {}, ""
    for n, local in ((1, canvas), (8, canvas), (8, patches)):
      mesh, state, step = compiled_step(n)
      batch = sharding.global_batch(local, mesh)
      if "canvas" in batch and n == 8:
        assert batch["canvas"].addressable_shards[0].data.shape == (2, 64, 64, 3)
        with jax.set_mesh(mesh):
          hlo = step.jitted.lower(state, batch).compile().as_text()
      state, metrics = step(state, batch)
      out[(n, "canvas" in local)] = float(metrics["loss"])
    print(json.dumps({"one_canvas": out[(1, True)], "eight_canvas": out[(8, True)],
                      "eight_patches": out[(8, False)],
                      "all_gathers": hlo.count("all-gather-start") + hlo.count("all-gather(")}))
"""


def test_canvas_batches_split_over_eight_devices(cache_dir):
  """The device gather runs on each device's rows: the losses of one device,
  eight devices and host-gathered patches agree, and no canvas is gathered
  across devices."""
  import json  # pylint: disable=g-import-not-at-top
  out = json.loads(_run(_CANVAS_EIGHT, _env(cache_dir, devices=8)).strip().splitlines()[-1])
  assert np.isfinite(out["one_canvas"])
  assert abs(out["eight_canvas"] - out["eight_patches"]) < 1e-6, out
  assert abs(out["one_canvas"] - out["eight_canvas"]) < 1e-5, out
  assert out["all_gathers"] == 0, out


def test_restore_onto_fewer_devices(cache_dir, tmp_path):
  out = _run(_RESHARD.format(workdir=tmp_path / "w"), _env(cache_dir, devices=8))
  assert "STEPS 2 4" in out, out


def test_two_processes_train_and_checkpoint(cache_dir, tmp_path):
  workdir = tmp_path / "w"
  port = conftest.free_port()
  runs = []
  for pid in range(2):
    cmd = conftest.smoke_train_cmd(workdir, 4, "--coordinator_address", f"127.0.0.1:{port}",
                                   "--num_processes=2", f"--process_id={pid}")
    runs.append((cmd, _env(cache_dir)))
  results = conftest.run_processes(runs, tmp_path, timeout=300)
  for rc, out in results:
    assert rc == 0, out[-6000:]
  assert "2 devices on 2 processes" in results[0][1]
  assert sorted(os.listdir(workdir / "checkpoints")) >= ["2", "4"]
  data_files = set(os.listdir(workdir / "checkpoints" / "4" / "data"))
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= data_files, data_files
  assert (workdir / "model" / "config.json").exists()


_KERNEL_SPLIT = """
    import jax, jax.numpy as jnp, numpy as np
    from mambaeye_jax import ssd
    from kernels import ssd_reference
    rng = np.random.default_rng(0)
    b, l, h, p, g, n = 8, 20, 2, 8, 1, 4
    args = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in
            [(b, l, h, p), (b, l, h), (h,), (b, l, g, n), (b, l, g, n), (h,)]]
    args[2] = -jnp.exp(args[2])
    def loss(args):
      y = ssd.ssd(*args, impl="pallas_interpret", dt_softplus=True, chunk_size=16)
      return jnp.sum(y * jnp.cos(jnp.arange(y.size).reshape(y.shape)))
    ref = jax.grad(lambda a: jnp.sum(ssd_reference.ssd_sequential(*a, dt_softplus=True)
                   * jnp.cos(jnp.arange(b * l * h * p).reshape(b, l, h, p))))(args)
    auto = jax.sharding.Mesh(np.array(jax.devices()), ("data",))  # as train/eval build it
    explicit = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    for mesh in (auto, explicit):
      with jax.set_mesh(mesh):
        text = str(jax.make_jaxpr(jax.grad(loss))(args))
        grads = jax.jit(jax.grad(loss))(args)
      assert "shard_map" in text, "kernel not split over the batch"
      for got, want in zip(grads, ref):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-3, atol=1e-3)
    print("ok")
"""


def test_kernel_is_split_over_the_batch_under_a_mesh(cache_dir):
  """Under jax.set_mesh the kernel runs per device (XLA cannot split it)."""
  assert _run(_KERNEL_SPLIT, _env(cache_dir, devices=4)).strip().splitlines()[-1] == "ok"
