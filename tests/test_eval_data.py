"""Tests for mambaeye_jax.eval_data: dataset specs and class maps."""

import io
import json
import os
import tarfile

import pytest
from PIL import Image

from mambaeye_jax import eval_data
from mambaeye_jax import eval_workers

CANVAS = 32
T = 12


def _photo_bytes(size=(50, 40), colour=(10, 200, 30)) -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", size, colour).save(buf, format="JPEG")
  return buf.getvalue()


def _add(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def test_tarball_of_loose_synset_photos(tmp_path):
  archive = tmp_path / "sample.tar.gz"
  with tarfile.open(archive, "w:gz") as tar:
    _add(tar, "sample/n00000003_red_fox.JPEG", _photo_bytes())
    _add(tar, "sample/n00000001_tench.JPEG", _photo_bytes())
  cmap = tmp_path / "classes.txt"
  cmap.write_text("# synsets in class order\nn00000000\nn00000001\nn00000002 goldfish\n"
                  "n00000003\n")
  source = eval_data.open_source(str(archive), class_map=str(cmap),
                                extract_dir=str(tmp_path / "x"))
  assert len(source) == 2
  assert sorted(source[i]["label"] for i in range(2)) == [1, 3]
  assert source.class_map.name(3) == "red fox"  # from the file name
  assert source.class_map.name(2) == "goldfish"  # from the map
  assert source.class_map.name(0) == "n00000000"
  # Without an ImageNet list or class map the index is unknowable.
  with pytest.raises(eval_data.DataError, match="not in the given class map"):
    eval_data.open_source(str(archive), extract_dir=str(tmp_path / "y"),
                         class_map=eval_data.ClassMap(("n00000001",), ("",)))


def test_builtin_imagenet_list(tmp_path):
  classes = eval_data.builtin_imagenet_classes()  # Package data: always there.
  assert len(classes.keys) == 1000 and list(classes.keys) == sorted(classes.keys)
  assert all(classes.names)
  assert classes.keys[0] == "n01440764"  # tench, class 0
  (tmp_path / "n01443537_goldfish.JPEG").write_bytes(_photo_bytes())
  source = eval_data.open_source(str(tmp_path))
  assert source[0]["label"] == 1
  assert source.class_map.name(1) == "goldfish"


def test_tarball_of_class_folders_and_class_map_json(tmp_path):
  archive = tmp_path / "folders.tgz"
  with tarfile.open(archive, "w:gz") as tar:
    for cls in ("cat", "dog"):
      _add(tar, f"root/{cls}/1.jpg", _photo_bytes())
      _add(tar, f"root/{cls}/notes.txt", b"not an image")
  source = eval_data.open_source(str(archive), extract_dir=str(tmp_path / "x"))
  assert len(source) == 2 and source.class_map.keys == ("cat", "dog")
  cmap = tmp_path / "map.json"
  cmap.write_text(json.dumps({"dog": [0, "Dog"], "cat": [1, "Cat"]}))
  source = eval_data.open_source(str(archive), class_map=str(cmap),
                                extract_dir=str(tmp_path / "y"))
  assert {source[i]["key"].split("/")[-2]: source[i]["label"] for i in range(2)} == {
      "dog": 0, "cat": 1}


def test_bad_dataset_specs(tmp_path):
  with pytest.raises(eval_data.DataError, match="does not exist"):
    eval_data.open_source(str(tmp_path / "missing"))
  (tmp_path / "file.txt").write_text("hello")
  with pytest.raises(eval_data.DataError, match="neither a folder nor a tar"):
    eval_data.open_source(str(tmp_path / "file.txt"))
  (tmp_path / "loose").mkdir()
  (tmp_path / "loose" / "holiday.jpg").write_bytes(_photo_bytes())
  with pytest.raises(eval_data.DataError, match="<synset>_<name>"):
    eval_data.open_source(str(tmp_path / "loose"))
  with pytest.raises(eval_data.DataError, match="synthetic"):
    eval_data.open_source("synthetic:many")


def test_tfds_spec(monkeypatch):
  # TFDS's own source (data.sources.TfdsSource) needs a prepared dataset;
  # here a stand-in checks the spec parsing and the class names.
  opened = {}

  class FakeTfds:
    def __init__(self, name, split, data_dir=None):
      opened.update(name=name, split=split, data_dir=data_dir)
      label = type("L", (), {"names": ["cat_face", "dog"]})()
      info = type("I", (), {"features": {"label": label}})()
      self._source = type("S", (), {"dataset_info": info})()
      self.num_classes = 2

    def __len__(self):
      return 3

    def __getitem__(self, i):
      return {"image": _photo_bytes(), "label": i % 2, "key": f"tfds[{i}]"}

  monkeypatch.setattr(eval_data.sources, "TfdsSource", FakeTfds)
  source = eval_data.open_source("tfds:pets", tfds_data_dir="/data")
  assert opened == {"name": "pets", "split": "validation", "data_dir": "/data"}
  assert len(source) == 3 and source.class_map.name(0) == "cat face"
  eval_data.open_source("tfds:pets:test[:10]")
  assert opened["split"] == "test[:10]"
  canvas, positions, box = eval_workers.prepare_example(
      source[0], eval_workers.Setting(CANVAS, "fit", "random", T), 0, 0)
  assert canvas.shape == (CANVAS, CANVAS, 3) and positions.shape == (T, 2)
  assert max(box.height, box.width) == CANVAS


def test_imagenet_sample_mapping(tmp_path):
  """Every photo of the shared sample gets the class whose ImageNet name is
  in its file name: the synset list and the names agree on the index."""
  archive = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "..", "shared", "data", "imagenet_sample_100.tar.gz")
  if not os.path.isfile(archive):
    pytest.skip(f"{archive} is not there")
  source = eval_data.open_source(archive, extract_dir=str(tmp_path))
  assert len(source) == 100
  labels = []
  for i in range(len(source)):
    record = source[i]
    name_in_file = os.path.basename(record["key"]).split(".")[0].split("_", 1)[1]
    norm = lambda n: n.replace(" ", "_").replace("-", "_").lower()
    assert norm(source.class_map.name(record["label"])) == norm(name_in_file)
    labels.append(record["label"])
  assert sorted(labels) == list(range(0, 1000, 10))
