"""The training loop end to end: smoke run, resume, NaN stop, config errors.

Runs on the CPU with a one-block model; compiled programs go to a persistent
cache for this module, so the repeated runs of one config compile once.
"""

import json
import os
import signal
import subprocess
import sys
import time

import conftest
import jax
import numpy as np
import pytest

from mambaeye_jax import checkpoint
from mambaeye_jax import metrics as metrics_lib
from mambaeye_jax import model_dir
from mambaeye_jax import train_data
from mambaeye_jax import train_lib
from mambaeye_jax import train_step
from mambaeye_jax import work_dir

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
from configs import smoke  # pylint: disable=g-import-not-at-top,wrong-import-position


pytestmark = pytest.mark.usefixtures("compilation_cache")


def fake_config(steps: int = 6):
  return conftest.fake_train_config(steps)


def losses(workdir) -> dict[int, float]:
  """step -> loss from metrics.jsonl (a resumed run's later lines win)."""
  return {r["step"]: r["train/loss"] for r in metrics_lib.read_metrics(str(workdir))}


def test_smoke_config_trains_end_to_end(tmp_path):
  """The CI job: real Grain pipeline on synthetic data, through train.py.

  With a worker process: Grain's shared-memory batches must all be freed at
  the exit (no "leaked shared_memory objects" warning).
  """
  workdir = tmp_path / "smoke"
  env = dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO_ROOT, "train.py"),
       "--config", os.path.join(REPO_ROOT, "configs", "smoke.py"),
       "--workdir", str(workdir), "--config.data.worker_count=1"],
      env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr[-5000:]
  assert "step 6/6" in proc.stdout
  assert "leaked shared_memory" not in proc.stderr
  assert f"the model is in {workdir}/model" in proc.stdout
  records = metrics_lib.read_metrics(str(workdir))
  assert [r["step"] for r in records] == [1, 2, 4, 6]
  last = records[-1]
  for name in ("train/loss", "train/accuracy_at_4", "train/accuracy_last",
               "perf/images_per_sec", "perf/tokens_per_sec", "perf/step_time_ms",
               "perf/data_wait_ms", "perf/batch_read_ms", "perf/batch_put_ms",
               "data/num_skipped"):
    assert name in last, name
  assert np.isfinite(last["train/loss"])
  assert os.listdir(workdir / "tb")  # TensorBoard events.
  assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]
  # The exported model directory loads with the library's loader and
  # agrees with restore_model on the last checkpoint.
  exported = checkpoint.load_model(str(workdir / "model"))
  restored = work_dir.restore_model(str(workdir))
  via_loader = checkpoint.load_model(str(workdir))  # A workdir loads too.
  a = jax.tree.leaves(model_dir.nnx.state(exported))
  for other in (restored, via_loader):
    b = jax.tree.leaves(model_dir.nnx.state(other))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_interrupt_and_resume_reproduces_the_loss_curve(tmp_path):
  c = fake_config(steps=6)
  c.data.source = "synthetic"  # The real Grain pipeline, its state restored.
  train_lib.train_and_evaluate(c, str(tmp_path / "straight"))

  def interrupt(step):
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)  # Through the real handler.

  stopped = train_lib.train_and_evaluate(c, str(tmp_path / "resumed"), step_hook=interrupt)
  assert stopped["step"] == 3
  assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints")) == ["3"]
  assert not (tmp_path / "resumed" / "model").exists()  # Not finished: no export.
  final = train_lib.train_and_evaluate(c, str(tmp_path / "resumed"))
  assert final["step"] == 6
  want, got = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
  assert sorted(got) == list(range(1, 7))
  np.testing.assert_allclose([got[s] for s in range(1, 7)], [want[s] for s in range(1, 7)],
                             rtol=1e-6)
  a = model_dir.load_params(str(tmp_path / "straight" / "model"))[1]
  b = model_dir.load_params(str(tmp_path / "resumed" / "model"))[1]
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def test_stop_signal_that_also_kills_the_data_workers_still_saves(tmp_path, monkeypatch):
  """Ctrl-C / `timeout` reach Grain's workers too: the loop must save, not crash."""
  c = fake_config(steps=6)
  real_next = train_data.BatchPrefetcher.__next__
  calls = []

  def dying_next(self):
    calls.append(1)
    if len(calls) == 4:  # While the loop waits for step 4's batch:
      os.kill(os.getpid(), signal.SIGTERM)
      raise RuntimeError("Worker process was terminated unexpectedly with exit code -15.")
    return real_next(self)

  monkeypatch.setattr(train_data.BatchPrefetcher, "__next__", dying_next)
  stopped = train_lib.train_and_evaluate(c, str(tmp_path))
  assert stopped["step"] == 3
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3"]
  monkeypatch.setattr(train_data.BatchPrefetcher, "__next__", real_next)
  assert train_lib.train_and_evaluate(c, str(tmp_path))["step"] == 6


def test_data_errors_without_a_stop_signal_still_raise(tmp_path, monkeypatch):
  def broken(self):
    raise RuntimeError("disk on fire")

  monkeypatch.setattr(train_data.BatchPrefetcher, "__next__", broken)
  with pytest.raises(RuntimeError, match="disk on fire"):
    train_lib.train_and_evaluate(fake_config(steps=2), str(tmp_path))


def test_nan_loss_stops_loudly_and_saves_the_batch(tmp_path, monkeypatch):
  real = train_data.make_train_iterator

  class Poisoned:
    def __init__(self, inner):
      self.inner, self.count = inner, 0

    def __next__(self):
      batch = next(self.inner)
      self.count += 1
      if self.count == 3:
        batch["ratio"] = np.full_like(batch["ratio"], np.nan)
      return batch

    def __getattr__(self, name):
      return getattr(self.inner, name)

  monkeypatch.setattr(train_data, "make_train_iterator",
                      lambda *a, **k: Poisoned(real(*a, **k)))
  c = fake_config(steps=6)
  c.checkpoint_every_steps = 2
  with pytest.raises(train_lib.NonFiniteLossError, match=r"nan at step 3") as info:
    train_lib.train_and_evaluate(c, str(tmp_path))
  saved = tmp_path / "nan_batch_step3_process0.npz"
  assert str(saved) in str(info.value)
  assert "last checkpoint is step 2" in str(info.value)
  with np.load(saved) as batch:
    assert np.isnan(batch["ratio"]).all()
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]


def test_config_typo_on_the_command_line_is_a_clear_error(tmp_path):
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO_ROOT, "train.py"),
       "--config", os.path.join(REPO_ROOT, "configs", "smoke.py"),
       "--workdir", str(tmp_path), "--config.optim.lerning_rate=0.1"],
      env=dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS="cpu"),
      capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "lerning_rate" in proc.stderr
  assert not os.listdir(tmp_path)  # Nothing was started.


def test_config_errors_name_the_field():
  c = fake_config()
  c.model.dtype = "bf16"
  with pytest.raises(ValueError, match="dtype"):
    train_lib.validate_config(c)
  c = smoke.get_config()
  c.data.source = "imagenet"
  with pytest.raises(ValueError, match="imagenet"):
    train_lib.validate_config(c)
  c = smoke.get_config()
  c.optim.learning_rat = 1.0  # Unlocked here (the CLI locks it): still caught.
  with pytest.raises(ValueError, match=r"optim\.learning_rat"):
    train_lib.validate_config(c)
  c = smoke.get_config()
  c.log_every_steps = 0
  with pytest.raises(ValueError, match="log_every_steps"):
    train_lib.validate_config(c)


def test_restore_model_names_missing_steps(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a training workdir"):
    work_dir.restore_model(str(tmp_path))


def test_glimpse_index_and_last_step_with_packing():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  seg = jnp.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
  mask = seg > 0
  np.testing.assert_array_equal(train_step._glimpse_index(seg),
                                [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
  np.testing.assert_array_equal(train_step._is_last(seg, mask),
                                [[0, 0, 1, 0, 1, 0], [0, 0, 0, 0, 0, 1]])
  labels = jnp.array([[3, 3, 3, 1, 1, 0], [2] * 6])
  logits = jax.nn.one_hot(jnp.array([[0, 3, 3, 1, 0, 0], [2] * 6]), 4)
  m = train_step.step_metrics(logits, {"labels": labels, "mask": mask, "segment_ids": seg},
                             (1, 2))
  assert (int(m["correct_at_1"]), int(m["count_at_1"])) == (2, 3)
  assert (int(m["correct_at_2"]), int(m["count_at_2"])) == (2, 3)
  assert (int(m["correct_last"]), int(m["count_last"])) == (2, 3)
  assert int(m["tokens"]) == 11


def test_train_config_json_roundtrips(tmp_path):
  c = fake_config()
  work_dir.write_train_config(str(tmp_path), c)
  back = work_dir.read_train_config(str(tmp_path))
  assert work_dir.model_config_from(back) == work_dir.model_config_from(c)
  with open(tmp_path / work_dir.TRAIN_CONFIG_FILE) as f:
    assert json.load(f)["data"]["source"] == "fake"


def test_prefetcher_keeps_order_and_checkpoints_the_consumed_position():
  from mambaeye_jax import sharding  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh()
  plain = train_data.BatchPrefetcher(train_data.FakeBatches(2, 4, 3), mesh, depth=0)
  ahead = train_data.BatchPrefetcher(train_data.FakeBatches(2, 4, 3), mesh, depth=3)
  try:
    for _ in range(3):
      (a, _), (b, gb) = next(plain), next(ahead)
      np.testing.assert_array_equal(a["patches"], b["patches"])
      np.testing.assert_array_equal(np.asarray(gb["patches"]), b["patches"])
    # The thread has read further; the state is the loop's position.
    assert json.loads(ahead.get_state()) == {"index": 3}
    assert ahead.get_state() == plain.get_state()
    # Timings of the batches read so far, then nothing until the next read.
    timings = plain.take_timings()
    assert sorted(timings) == ["perf/batch_not_ready_fraction", "perf/batch_put_ms",
                               "perf/batch_read_ms"]
    assert all(v >= 0 for v in timings.values())
    assert timings["perf/batch_not_ready_fraction"] == 0.0  # Nothing prefetched.
    assert plain.take_timings() == {}
    # Asked for after the thread has filled the queue: every batch was ready.
    deadline = time.monotonic() + 10
    while not ahead._queue.full() and time.monotonic() < deadline:  # pylint: disable=protected-access
      time.sleep(0.01)
    ahead.take_timings()
    next(ahead)
    assert ahead.take_timings()["perf/batch_not_ready_fraction"] == 0.0
  finally:
    plain.close()
    ahead.close()

  class Slow(train_data.FakeBatches):
    def __next__(self):
      time.sleep(0.2)
      return super().__next__()

  # Asked for before the thread could read anything: not ready.
  slow = train_data.BatchPrefetcher(Slow(2, 4, 3), mesh, depth=2)
  try:
    next(slow)
    timings = slow.take_timings()
    assert timings["perf/batch_not_ready_fraction"] == 1.0
    assert timings["perf/batch_read_ms"] >= 150
  finally:
    slow.close()

  class Broken:
    def __next__(self):
      raise OSError("disk gone")

    def get_state(self):
      return b"{}"

  broken = train_data.BatchPrefetcher(Broken(), mesh, depth=2)
  with pytest.raises(OSError, match="disk gone"):
    next(broken)  # Raised on the caller's thread.
  broken.close()


def test_padded_rows_need_no_segment_ids():
  """packed=False (padded batches) gives the loss and gradients of packed=True."""
  from mambaeye_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  from mambaeye_jax import optim, sharding  # pylint: disable=g-import-not-at-top
  mc = model_lib.get_config("tiny", depth=1, dim=32, d_state=8, headdim=32,
                            num_classes=10, chunk_size=8)
  ocfg = optim.OptimConfig(total_steps=10, warmup_steps=1)
  tx = optim.make_optimizer(ocfg)
  mesh = sharding.make_mesh(1)
  batch = next(train_data.FakeBatches(4, 12, 10, seed=5))
  # Ragged rows: the last steps of two rows are padding (segment 0, masked).
  for row, length in ((1, 7), (3, 9)):
    batch["mask"][row, length:] = False
    batch["segment_ids"][row, length:] = 0
  batch = sharding.global_batch(batch, mesh)
  out = {}
  for packed in (True, False):
    state, shardings, _ = train_step.create_train_state(mc, tx, 0, mesh)
    step = train_step.compile_train_step(
        train_step.make_train_step(train_step.model_graphdef(mc), tx,
                                  optim.learning_rate_schedule(ocfg), (4,), packed=packed),
        shardings, mesh)
    _, metrics = step(state, batch)
    out[packed] = (float(metrics["loss"]), float(metrics["grad_norm"]))
  np.testing.assert_allclose(out[False], out[True], rtol=1e-5)


def test_the_loss_ablation_trains_with_plain_cross_entropy(tmp_path):
  c = fake_config(steps=2)
  c.loss = "ce_last_step"
  train_lib.train_and_evaluate(c, str(tmp_path / "last"))
  got = losses(tmp_path / "last")
  assert sorted(got) == [1, 2] and all(np.isfinite(v) for v in got.values())
  c.loss = "focal"
  with pytest.raises(ValueError, match="loss='focal' must be one of stepwise"):
    train_lib.validate_config(c)
