"""Bucket paths (gs://...): never made local, and file operations through epath.

No bucket is reachable here: `fake_bucket` points epath's gs:// operations at
a local folder (etils.epath.testing.mock_epath), so what is tested is that
every look-up, read and write goes through epath with the URL intact, and
that nothing named "gs:" appears in the current directory.
"""

import contextlib
import glob
import json
import math
import os
import sys

import numpy as np
import pytest
from etils.epath import testing as epath_testing

from mambaeye_jax import metrics as metrics_lib
from mambaeye_jax import model_dir
from mambaeye_jax import train_checkpoint
from mambaeye_jax import train_lib
from mambaeye_jax import train_loop
from mambaeye_jax import work_dir
from mambaeye_jax.data import arrayrecord

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import smoke  # pylint: disable=g-import-not-at-top,wrong-import-position

_GLOB = glob.glob


@contextlib.contextmanager
def fake_bucket(root):
  """epath's gs://X/... operations act on ROOT/X/...; local paths unchanged."""
  seen = []

  def local(path):
    path = os.fspath(path)
    if path.startswith("gs://"):
      seen.append(path)
      return os.path.join(root, path[len("gs://"):])
    assert "://" not in path and not path.startswith("gs:"), path
    return path

  def one(fn, path, *args, **kwargs):
    return fn(local(path), *args, **kwargs)

  def two(fn, path, dst, *args, **kwargs):
    return fn(local(path), local(dst), *args, **kwargs)

  def glob_fn(fn, pattern):
    del fn  # glob.glob, which a test replaces to catch local globbing.
    pattern = os.fspath(pattern)
    found = _GLOB(local(pattern))
    if pattern.startswith("gs://"):  # Back to URLs, as gcsfs answers.
      found = ["gs://" + os.path.relpath(f, root) for f in found]
    return found

  with epath_testing.mock_epath(
      open=one, exists=one, isdir=one, listdir=one, makedirs=one, mkdir=one,
      remove=one, rmtree=one, stat=one, glob=glob_fn, rename=two, replace=two,
      copy=two):
    yield seen


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """(fake bucket root, list of gs:// paths epath was asked for); cwd empty."""
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  root = tmp_path / "bucket"
  root.mkdir()
  with fake_bucket(str(root)) as seen:
    yield root, seen
  # Nothing local named after the URL: no ./gs:/bucket/...
  assert os.listdir(cwd) == []


def test_url_paths_are_never_made_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert model_dir.is_url("gs://b/run") and not model_dir.is_url("b/run")
  assert model_dir.absolute("gs://b/run") == "gs://b/run"
  assert model_dir.absolute("run") == os.path.join(str(tmp_path), "run")


def test_checkpoint_manager_gets_the_url(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  got = []
  monkeypatch.setattr(work_dir.ocp, "CheckpointManager",
                      lambda directory, options: got.append(directory))
  work_dir.checkpoint_manager("gs://b/run")
  work_dir.checkpoint_manager("gs://b/run", read_only=True)
  work_dir.checkpoint_manager("run")
  assert got == ["gs://b/run/checkpoints"] * 2 + [str(tmp_path / "run" / "checkpoints")]
  assert os.listdir(tmp_path) == []


def test_train_config_round_trip_and_resume_check(bucket):
  root, seen = bucket
  config = smoke.get_config()
  work_dir.write_train_config("gs://b/run", config)  # pylint: disable=protected-access
  assert (root / "b" / "run" / work_dir.TRAIN_CONFIG_FILE).is_file()
  assert work_dir.read_train_config("gs://b/run").model.to_dict() == config.model.to_dict()
  with pytest.raises(FileNotFoundError, match="gs://b/other is not a training workdir"):
    work_dir.read_train_config("gs://b/other")
  # No checkpoints yet: resumable whatever the model; with one, checked.
  train_checkpoint.check_resumable("gs://b/run", config)
  (root / "b" / "run" / "checkpoints" / "7").mkdir(parents=True)
  assert work_dir.checkpoint_steps("gs://b/run") == [7]  # pylint: disable=protected-access
  other = config.copy_and_resolve_references()
  other.model.depth += 1
  with pytest.raises(ValueError, match=r"gs://b/run holds checkpoints of another model"):
    train_checkpoint.check_resumable("gs://b/run", other)
  assert all(p.startswith("gs://b/") for p in seen)


def test_checkpoint_dir_check_on_a_bucket(bucket):
  root, _ = bucket
  train_checkpoint.check_checkpoint_dir("gs://b/run")
  directory = root / "b" / "run" / "checkpoints"
  assert directory.is_dir() and os.listdir(directory) == []  # The probe is gone.


def test_nan_batch_is_written_to_the_bucket(bucket):
  root, _ = bucket
  (root / "b" / "run").mkdir(parents=True)
  with pytest.raises(train_lib.NonFiniteLossError, match="gs://b/run/nan_batch_step3"):
    train_loop.check_finite(
        3, {"loss": math.nan}, {"x": np.arange(4)}, "gs://b/run", None)
  (saved,) = glob.glob(str(root / "b" / "run" / "nan_batch_step3_*.npz"))
  np.testing.assert_array_equal(np.load(saved)["x"], np.arange(4))


def test_metrics_on_a_bucket_resume_and_skip_tensorboard(bucket, monkeypatch, caplog):
  root, _ = bucket
  from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
  # As without google-cloud-storage, whether or not it is installed here.
  monkeypatch.setattr(record_writer, "GCS_ENABLED", False)
  with metrics_lib.MetricWriter("gs://b/run") as writer:
    writer.write(1, {"train/loss": 2.0})
    writer.write(2, {"train/loss": 1.5})  # Within REMOTE_UPLOAD_SECONDS: at close.
  assert "no TensorBoard events in gs://b/run/tb" in caplog.text
  assert not (root / "b" / "run" / metrics_lib.TB_DIR).exists()
  with metrics_lib.MetricWriter("gs://b/run", tensorboard=False) as writer:
    writer.write(3, {"train/loss": 1.0})  # A resumed run keeps the lines before.
  assert [r["step"] for r in metrics_lib.read_metrics("gs://b/run")] == [1, 2, 3]


def test_model_directory_config_on_a_bucket(bucket):
  root, _ = bucket
  with pytest.raises(FileNotFoundError, match="gs://b/model is not a mambaeye-jax model"):
    model_dir.read_config("gs://b/model")
  config = work_dir.model_config_from(smoke.get_config())
  (root / "b" / "model").mkdir(parents=True)
  (root / "b" / "model" / model_dir.CONFIG_FILE).write_text(json.dumps(
      {"format_version": model_dir.FORMAT_VERSION, "model": model_dir.config_to_dict(config)}))
  assert model_dir.read_config("gs://b/model") == config


def test_arrayrecord_glob_on_a_bucket_goes_through_epath(bucket, monkeypatch):
  root, seen = bucket
  data = root / "b" / "data"
  data.mkdir(parents=True)
  for name in arrayrecord.shard_paths("train", 2)[::-1]:
    (data / name).write_bytes(b"")
  (data / "train.json").write_text(json.dumps({"num_classes": 5}))

  def no_local_glob(pattern):
    raise AssertionError(f"glob.glob({pattern!r}) for a bucket path")
  monkeypatch.setattr(glob, "glob", no_local_glob)
  opened = []

  class FakeDataSource:  # array_record would open gs:// over the network.

    def __init__(self, paths):
      opened.append(list(paths))

    def __len__(self):
      return 0
  import grain  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(grain.sources, "ArrayRecordDataSource", FakeDataSource)
  src = arrayrecord.ArrayRecordSource("gs://b/data/train-*")
  want = [f"gs://b/data/{n}" for n in arrayrecord.shard_paths("train", 2)]
  assert opened == [want] and src.paths == want and src.num_classes == 5
  assert "gs://b/data/train-*" in seen
  with pytest.raises(FileNotFoundError, match="gs://b/data/test-"):
    arrayrecord.ArrayRecordSource("gs://b/data/test-*")
  with pytest.raises(FileNotFoundError, match="gs://b/data/missing.array_record"):
    arrayrecord.ArrayRecordSource([want[0], "gs://b/data/missing.array_record"])


def test_corrupt_arrayrecord_shard_is_named(tmp_path):
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  good, bad = (str(tmp_path / n) for n in arrayrecord.shard_paths("train", 2))
  writer = array_record_module.ArrayRecordWriter(good, "group_size:1")
  writer.write(arrayrecord.encode_record(b"img", 0, "a.jpg"))
  writer.close()
  with open(bad, "wb") as f:
    f.write(np.random.default_rng(0).bytes(1000))
  with pytest.raises(ValueError, match=f"ArrayRecord shard {bad} cannot be read"):
    arrayrecord.ArrayRecordSource(str(tmp_path / "train-*"))
  assert len(arrayrecord.ArrayRecordSource([good])) == 1


def test_train_on_a_bucket_without_gcsfs_says_so_and_writes_nothing(tmp_path, monkeypatch):
  pytest.importorskip("fsspec")
  try:
    import gcsfs  # pylint: disable=g-import-not-at-top,unused-import
    pytest.skip("gcsfs is installed: gs:// would reach the network")
  except ImportError:
    pass
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ImportError, match="gcsfs"):
    train_lib.train_and_evaluate(smoke.get_config(), "gs://b/run")
  assert os.listdir(tmp_path) == []
