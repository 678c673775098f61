"""A user's first hour with train.py: every bad input is one clear line or stop.

Each case of issue 15's training side: config typos and ranges refused before
anything is written, labels checked against num_classes, resuming another
model refused, bad data bounded, checkpoint write failures raised (no hang),
no non-finite state saved, errors that survive worker processes, and clean
exits (no leaked shared memory, no read-only warning).
"""

import contextlib
import logging
import os
import pickle
import signal
import subprocess
import sys

import conftest
import jax
import pytest
from PIL import Image

from mambaeye_jax import train_checkpoint
from mambaeye_jax import train_data
from mambaeye_jax import train_lib
from mambaeye_jax import work_dir
from mambaeye_jax.data import sources

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
from configs import smoke  # pylint: disable=g-import-not-at-top,wrong-import-position


pytestmark = pytest.mark.usefixtures("compilation_cache")


@contextlib.contextmanager
def no_hang(seconds: int = 120):
  """Fails the test instead of blocking CI forever (SIGALRM, main thread)."""
  def fail(signum, frame):
    raise TimeoutError(f"still running after {seconds} s: a hang")

  previous = signal.signal(signal.SIGALRM, fail)
  signal.alarm(seconds)
  try:
    yield
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def fake_config(steps: int = 2):
  return conftest.fake_train_config(steps)


def folder_config(root, **data):
  c = smoke.get_config()
  c.data.source = "folder"
  c.data.path = str(root)
  c.num_train_steps = 2
  for name, value in data.items():
    c.data[name] = value
  return c


def image_folder(root, num_classes: int, per_class: int = 1, corrupt: bool = False):
  for k in range(num_classes):
    folder = root / f"class_{k:02d}"
    folder.mkdir(parents=True)
    for i in range(per_class):
      if corrupt:
        (folder / f"{i}.png").write_bytes(b"not an image at all")
      else:
        Image.new("RGB", (24, 20), (10 * k, 100, 200)).save(folder / f"{i}.png")
  return root


def run_train_py(*args, timeout=240):
  env = dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return subprocess.run([sys.executable, os.path.join(REPO_ROOT, "train.py"), *args],
                        env=env, capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------- command line


def test_cli_errors_are_one_line_and_help_lists_the_fields(tmp_path):
  smoke_py = os.path.join(REPO_ROOT, "configs", "smoke.py")
  workdir = tmp_path / "w"
  typo = run_train_py("--config", smoke_py, "--workdir", str(workdir),
                      "--config.lerning_rate=1")
  assert typo.returncode == 1
  assert typo.stderr.strip().splitlines()[-1].startswith(
      "error: config field 'lerning_rate' does not exist; did you mean "
      "'optim.learning_rate'? valid top-level fields: accuracy_at,")
  assert "Traceback" not in typo.stderr
  missing = run_train_py("--config", str(tmp_path / "nope.py"), "--workdir", str(workdir))
  assert missing.returncode == 1
  assert missing.stderr.strip() == (f"error: config file '{tmp_path / 'nope.py'}' does not "
                                    "exist (--config takes configs/<name>.py[:arg])")
  verbose = run_train_py("--config", str(tmp_path / "nope.py"), "--workdir", str(workdir),
                         "--verbose")
  assert verbose.returncode != 0
  assert "Traceback" in verbose.stderr  # --verbose: the full traceback.
  assert "CliError: config file" in verbose.stderr
  assert not workdir.exists()  # Nothing written by any of them.
  usage = run_train_py("--helpfull")
  for line in ("optim.learning_rate", "data.augment.erase_prob", "keep_checkpoints",
               "data.max_bad_fraction"):
    assert line in usage.stdout, line


def test_error_line_for_unexpected_errors_points_to_verbose():
  sys.path.insert(0, REPO_ROOT)
  import train  # pylint: disable=g-import-not-at-top
  assert train.error_line(ValueError("a\n  b")) == "error: a b"
  assert train.error_line(KeyError("x")) == "error: KeyError: x (--verbose prints the traceback)"
  assert train.error_line(sources.TooManyBadRecordsError(101, 101, "k: r", 0.1)).startswith(
      "error: 101 of 101 records read were bad")


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("field,value,message", [
    ("data.worker_count", -2, "data.worker_count=-2 must be >= 0"),
    ("data.augment.erase_prob", 1.5, r"augment.erase_prob=1.5 must be in \[0, 1\]"),
    ("data.augment.hue", 0.7, r"augment.hue=0.7 must be in \[0, 0.5\]"),
    ("data.augment.erase_scale", (0.5, 0.2), "erase_scale"),
    ("data.max_bad_fraction", 2.0, "max_bad_fraction=2.0"),
    ("data.read_threads", 0, "read_threads=0 must be >= 1"),
    ("keep_checkpoints", 0, "keep_checkpoints=0 must be >= 1"),
    ("optim.learning_rate", -1.0, "optim.learning_rate=-1.0 must be >= 0"),
    ("optim.b2", 1.5, "optim.b2=1.5 must be <= 1"),
    ("prefetch_to_device", -1, "prefetch_to_device=-1"),
    ("model.num_classes", 0, "model.num_classes=0 must be >= 1"),
    ("accuracy_at", (0,), "accuracy_at"),
])
def test_out_of_range_fields_are_refused_before_anything_is_written(tmp_path, field, value,
                                                                    message):
  c = fake_config()
  *groups, leaf = field.split(".")
  node = c
  for g in groups:
    node = node[g]
  node[leaf] = value
  with pytest.raises(ValueError, match=message):
    train_lib.train_and_evaluate(c, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_folder_without_path_is_refused():
  c = smoke.get_config()
  c.data.source = "folder"
  with pytest.raises(ValueError, match="data.source='folder' needs data.path"):
    train_lib.validate_config(c)


def test_more_classes_than_the_model_has_fails_at_start(tmp_path):
  root = image_folder(tmp_path / "data", num_classes=12)
  with pytest.raises(ValueError, match=f"12 classes in {root} but model.num_classes is 10"):
    train_lib.train_and_evaluate(folder_config(root), str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_labels_beyond_num_classes_in_a_batch_are_named():
  batch = next(train_data.FakeBatches(2, 4, 12, seed=1))
  batch["labels"][:] = 11
  with pytest.raises(ValueError, match="label 11 in the batch of step 3 is outside "
                     "model.num_classes=10"):
    train_data.check_labels(batch, 10, 3)


def test_resuming_another_model_is_refused_and_the_workdir_kept(tmp_path):
  old = fake_config()
  work_dir.write_train_config(str(tmp_path), old)
  (tmp_path / "checkpoints" / "6").mkdir(parents=True)
  before = (tmp_path / "train_config.json").read_text()
  new = fake_config()
  new.model.depth = 2
  new.model.dim = 64
  with pytest.raises(ValueError, match=r"holds checkpoints of another model \(model.depth 1 "
                     r"-> 2; model.dim 32 -> 64; stored in"):
    train_lib.train_and_evaluate(new, str(tmp_path))
  assert (tmp_path / "train_config.json").read_text() == before
  shape_neutral = fake_config()
  shape_neutral.model.remat = True
  train_checkpoint.check_resumable(str(tmp_path), shape_neutral)  # Allowed.


# ---------------------------------------------------------------- bad data


def test_a_folder_of_corrupt_files_stops_instead_of_looping(tmp_path):
  root = image_folder(tmp_path / "data", num_classes=2, per_class=3, corrupt=True)
  with no_hang(), pytest.raises(sources.TooManyBadRecordsError,
                                match=r"101 of 101 records read were bad .*class_0\d/\d.png: "
                                r"not a readable image") as info:
    train_lib.train_and_evaluate(folder_config(root), str(tmp_path / "w"))
  assert info.value.num_bad == 101


def test_bad_record_errors_survive_pickling():
  error = pickle.loads(pickle.dumps(sources.BadImageError("a/b.png", "cannot decode (x)")))
  assert (error.key, error.reason, str(error)) == ("a/b.png", "cannot decode (x)",
                                                   "a/b.png: cannot decode (x)")
  many = pickle.loads(pickle.dumps(sources.TooManyBadRecordsError(101, 150, "k: r", 0.1)))
  assert (many.num_bad, many.num_seen, many.example) == (101, 150, "k: r")
  assert str(many) == str(sources.TooManyBadRecordsError(101, 150, "k: r", 0.1))


def test_on_error_raise_through_worker_processes_stops_with_the_bad_image(tmp_path):
  root = image_folder(tmp_path / "data", num_classes=2, per_class=2, corrupt=True)
  c = folder_config(root, worker_count=1, on_error="raise")
  with no_hang(), pytest.raises(sources.BadImageError) as info:
    train_lib.train_and_evaluate(c, str(tmp_path / "w"))
  assert info.value.key.startswith(str(root))
  assert info.value.reason.startswith("not a readable image")


# ---------------------------------------------------------------- checkpoints


def test_checkpoint_directory_that_is_a_file_is_a_clear_error(tmp_path):
  (tmp_path / "checkpoints").write_text("in the way")
  with no_hang(), pytest.raises(train_checkpoint.CheckpointWriteError,
                                match=f"cannot create the checkpoint directory "
                                f"{tmp_path}/checkpoints: is a file, not a directory"):
    train_lib.train_and_evaluate(fake_config(), str(tmp_path))


def test_checkpoint_failure_during_the_run_raises_instead_of_hanging(tmp_path):
  """The directory breaks after the start-up check: save() itself raises."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  state = {"params": {"w": jnp.ones(3)}, "opt_state": {"mu": jnp.zeros(3)},
           "step": jnp.zeros((), jnp.int32), "rng": jnp.zeros(2, jnp.uint32)}
  manager = work_dir.checkpoint_manager(str(tmp_path), fake_config())
  try:
    os.rmdir(tmp_path / "checkpoints")
    (tmp_path / "checkpoints").write_text("in the way")
    with no_hang(), pytest.raises(train_checkpoint.CheckpointWriteError,
                                  match="cannot write checkpoint 2 in .*Not a directory"):
      train_checkpoint.save(manager, 2, state, train_data.FakeBatches(1, 2, 3))
  finally:
    with no_hang():
      manager.close()


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
def test_an_overflowing_update_is_never_saved(tmp_path):
  c = fake_config(steps=3)
  c.optim.learning_rate = 1e39
  c.optim.warmup_steps = 0
  c.checkpoint_every_steps = 1
  with pytest.raises(train_lib.NonFiniteStateError,
                     match=r"the update of step 1 made \d+ parameter or optimizer values NaN "
                     r"or infinite \(the loss, [\d.]+, was finite.*nothing was saved.*no "
                     r"checkpoint was written"):
    train_lib.train_and_evaluate(c, str(tmp_path))
  assert not os.listdir(tmp_path / "checkpoints")


def test_an_error_exit_with_data_workers_leaks_no_shared_memory(tmp_path):
  """The error's traceback holds the workers' last batches: train.py frees
  them after printing its line, so the exit reports no leaked memory."""
  root = image_folder(tmp_path / "data", num_classes=2, per_class=4)
  proc = run_train_py("--config", "configs/smoke.py", "--workdir", str(tmp_path / "w"),
                      "--config.data.source=folder", f"--config.data.path={root}",
                      "--config.data.worker_count=1", "--config.num_train_steps=3",
                      "--config.optim.learning_rate=1e39", "--config.optim.warmup_steps=0")
  assert proc.returncode == 1, proc.stderr
  assert "error: the update of step 1 made" in proc.stderr
  assert "leaked shared_memory" not in proc.stderr, proc.stderr


def test_finished_run_rerun_says_where_the_model_is(tmp_path, capsys, caplog):
  c = fake_config(steps=1)
  train_lib.train_and_evaluate(c, str(tmp_path))
  capsys.readouterr()
  train_lib.train_and_evaluate(c, str(tmp_path))
  out = capsys.readouterr().out
  assert f"the model is in {tmp_path}/model" in out
  assert f"python eval.py --checkpoint {tmp_path}/model --data" in out
  with caplog.at_level(logging.WARNING):
    work_dir.restore_model(str(tmp_path))
  assert "read only" not in caplog.text and "read_only" not in caplog.text


@pytest.mark.parametrize("name, arg", [
    ("cifar10", "/data"), ("cifar10_light", "/data"), ("cifar10_canvas128", "/data"),
    ("mambaeye_tiny_i1k", "tfds"), ("mambaeye_small_i1k", "tfds"),
    ("mambaeye_base_i1k", "tfds"), ("synthetic", ""), ("smoke", "")])
def test_shipped_configs_validate_and_build_their_pipeline_config(name, arg):
  import importlib  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f"configs.{name}").get_config(arg)
  train_lib.validate_config(config)
  data = train_data.data_config_from(config, local_batch_size=8)
  if data is not None:
    # Every augment override reaches the transform's (validated) parameters.
    params = data.augment_config()
    for field, value in config.data.augment.items():
      assert getattr(params, field) == (tuple(value) if isinstance(value, list) else value)
  if name == "cifar10_light":
    assert config.data.augment.erase_prob == 0.0 and config.data.augment.crop_prob == 0.5
    assert config.data.worker_count == 10
  if name == "cifar10_canvas128":  # The light recipe, a wider canvas, more steps.
    assert (config.data.canvas_min, config.data.canvas_max) == (32, 128)
    assert config.data.augment.perspective_prob == 0.0 and config.num_train_steps == 22_000
