"""Sources and decoding: folder, ArrayRecord, TFDS, and every bad input."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from mambaeye_jax.data import arrayrecord
from mambaeye_jax.data import convert_arrayrecord
from mambaeye_jax.data import sources


def _encode(image: Image.Image, fmt: str) -> bytes:
  buf = io.BytesIO()
  image.save(buf, fmt)
  return buf.getvalue()


def _rgb(h=40, w=60, seed=0) -> Image.Image:
  rng = np.random.default_rng(seed)
  return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _write(path, data: bytes):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)


@pytest.fixture
def folder(tmp_path):
  """root/{b_cls: 2 images, a_cls: 1 image + a .txt, c_empty: nothing}."""
  root = tmp_path / "ds"
  _write(str(root / "b_cls" / "1.png"), _encode(_rgb(seed=1), "PNG"))
  _write(str(root / "b_cls" / "0.JPEG"), _encode(_rgb(seed=2), "JPEG"))
  _write(str(root / "a_cls" / "x.jpg"), _encode(_rgb(seed=3), "JPEG"))
  _write(str(root / "a_cls" / "notes.txt"), b"not an image")
  os.makedirs(root / "c_empty")
  _write(str(root / "stray.jpg"), _encode(_rgb(seed=4), "JPEG"))  # Not a class.
  return str(root)


# ---------------------------------------------------------------- folder


def test_folder_layout_labels_and_stats(folder):
  src = sources.ImageFolderSource(folder)
  assert src.class_names == ["a_cls", "b_cls", "c_empty"]
  assert src.num_classes == 3
  assert len(src) == 3
  keys = [os.path.relpath(src[i]["key"], folder) for i in range(3)]
  assert keys == ["a_cls/x.jpg", "b_cls/0.JPEG", "b_cls/1.png"]
  assert [src[i]["label"] for i in range(3)] == [0, 1, 1]
  assert src.stats == {"empty_classes": 1, "ignored_files": 1}
  assert isinstance(src[0]["image"], bytes) and src[0]["image"]


def test_folder_missing_and_empty(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    sources.ImageFolderSource(str(tmp_path / "nope"))
  (tmp_path / "flat").mkdir()
  _write(str(tmp_path / "flat" / "a.jpg"), _encode(_rgb(), "JPEG"))
  with pytest.raises(ValueError, match="no class"):
    sources.ImageFolderSource(str(tmp_path / "flat"))
  (tmp_path / "hollow" / "cls").mkdir(parents=True)
  with pytest.raises(ValueError, match="no images"):
    sources.ImageFolderSource(str(tmp_path / "hollow"))


def test_folder_file_deleted_after_listing(folder):
  src = sources.ImageFolderSource(folder)
  os.remove(src[0]["key"])
  record = src[0]
  with pytest.raises(sources.BadImageError, match="x.jpg: empty"):
    sources.decode_image(record["image"], record["key"])


# ---------------------------------------------------------------- decoding


@pytest.mark.parametrize("data,reason", [
    (b"", "empty file"),
    (b"plain text, not an image at all", "not a readable image"),
    (os.urandom(2000), "not a readable image"),
])
def test_unreadable_bytes(data, reason):
  with pytest.raises(sources.BadImageError, match=f"some/key.jpg: {reason}"):
    sources.decode_image(data, "some/key.jpg")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file(fmt):
  data = _encode(_rgb(200, 300), fmt)
  with pytest.raises(sources.BadImageError, match="cut.img: cannot decode"):
    sources.decode_image(data[:len(data) // 2], "cut.img")


def test_decompression_bomb_guard():
  data = _encode(_rgb(100, 100), "PNG")
  with pytest.raises(sources.BadImageError, match="decompression-bomb"):
    sources.decode_image(data, "big.png", max_pixels=9999)
  assert sources.decode_image(data, max_pixels=10000).size == (100, 100)


def test_modes_become_rgb():
  gray = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4)
  cases = {
      "L": gray,
      "P": gray.convert("P"),
      "RGBA": Image.new("RGBA", (5, 4), (10, 20, 30, 0)),
      "LA": gray.convert("LA"),
      "1": gray.convert("1"),
  }
  for mode, image in cases.items():
    out = sources.decode_image(_encode(image, "PNG"), mode)
    assert out.mode == "RGB" and out.size == image.size, mode
  # Alpha dropped without compositing, as the official .convert("RGB").
  rgba = sources.decode_image(_encode(cases["RGBA"], "PNG"))
  assert rgba.getpixel((0, 0)) == (10, 20, 30)
  gray_rgb = np.asarray(sources.decode_image(_encode(gray, "PNG")))
  np.testing.assert_array_equal(gray_rgb[..., 1], np.asarray(gray))
  cmyk = Image.new("CMYK", (6, 6), (0, 255, 255, 0))  # Red in CMYK.
  out = sources.decode_image(_encode(cmyk, "JPEG"), "cmyk.jpg")
  r, g, b = out.getpixel((3, 3))
  assert out.mode == "RGB" and r > 200 and g < 60 and b < 60


def test_16_bit_is_rescaled_not_clipped():
  values = np.array([[0, 257, 32896, 65535]], np.uint16)
  image = Image.fromarray(values)  # I;16
  out = np.asarray(sources.decode_image(_encode(image, "PNG"), "deep.png"))
  np.testing.assert_array_equal(out[0, :, 0], [0, 1, 128, 255])
  assert (out[..., 0] == out[..., 2]).all()


def test_float_and_int32_modes():
  unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32))  # F
  out = np.asarray(sources._to_uint8_rgb(unit, "f"))
  np.testing.assert_array_equal(out[0, :, 0], [0, 128, 255])
  with pytest.raises(sources.BadImageError, match="unsupported F"):
    sources._to_uint8_rgb(
        Image.fromarray(np.array([[0.0, 7.0]], np.float32)), "f")
  small = Image.fromarray(np.array([[3, 200]], np.int32))  # I, 8-bit values
  np.testing.assert_array_equal(
      np.asarray(sources._to_uint8_rgb(small, "i"))[0, :, 0], [3, 200])
  with pytest.raises(sources.BadImageError, match="unsupported I"):
    sources._to_uint8_rgb(Image.fromarray(np.array([[-5, 9]], np.int32)), "i")


def test_jpeg_draft_never_below_the_requested_size():
  data = _encode(_rgb(480, 640), "JPEG")
  out = sources.decode_image(data, draft_size=(150, 110))
  assert out.size == (160, 120)  # 1/4 scale: the smallest >= the request.
  called = []
  out = sources.decode_image(data, draft_size=lambda w, h: called.append(
      (w, h)) or (640, 480))
  assert called == [(640, 480)] and out.size == (640, 480)


# ---------------------------------------------------------------- ArrayRecord


def test_record_round_trip():
  blob = arrayrecord.encode_record(b"\x00\xffjpeg", 7, "cls/a b.jpg")
  assert arrayrecord.decode_record(blob) == {"image": b"\x00\xffjpeg", "label": 7,
                                         "key": "cls/a b.jpg"}


def test_convert_and_read_arrayrecord(folder, tmp_path, capsys):
  bad = os.path.join(folder, "b_cls", "2.jpg")
  _write(bad, b"broken")
  prefix = str(tmp_path / "out" / "train")
  assert convert_arrayrecord.main([folder, prefix, "--shards", "2"]) == 0
  assert "wrote 3 records of 3 classes" in capsys.readouterr().out
  with open(prefix + ".json") as f:
    meta = json.load(f)
  assert meta["num_records"] == 3 and meta["class_names"][2] == "c_empty"
  assert meta["skipped"][0][0] == "b_cls/2.jpg"
  src = arrayrecord.ArrayRecordSource(prefix + "-*")
  assert len(src) == 3 and src.num_classes == 3
  folder_src = sources.ImageFolderSource(folder)
  got = sorted((r["key"], r["label"], r["image"])
               for r in (src[i] for i in range(3)))
  want = sorted((os.path.relpath(r["key"], folder), r["label"], r["image"])
                for r in (folder_src[i] for i in range(4))
                if not r["key"].endswith("2.jpg"))
  assert got == want
  with pytest.raises(sources.BadImageError, match="2.jpg"):
    convert_arrayrecord.main([folder, prefix + "_strict", "--strict"])
  with pytest.raises(FileNotFoundError):
    arrayrecord.ArrayRecordSource(str(tmp_path / "none-*"))


# ---------------------------------------------------------------- TFDS


def test_tfds_source_on_a_local_dataset(tmp_path):
  """A tiny dataset in TFDS format (ArrayRecord files), built offline.

  Writing `tfds.features.Image` needs TensorFlow, which this environment
  lacks, so the images are stored as encoded bytes in a scalar string
  feature: exactly what `tfds.decode.SkipDecoding` hands back for an Image
  feature, the path TfdsSource reads.
  """
  tfds = pytest.importorskip("tensorflow_datasets")

  class TinyImages(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=(
          tfds.features.FeaturesDict({
              "image": tfds.features.Tensor(shape=(), dtype=np.object_),
              "label": tfds.features.ClassLabel(names=["a", "b", "c"])})))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(5):
        yield i, {"image": _encode(_rgb(20 + i, 30, seed=i), "PNG"),
                  "label": i % 3}

  TinyImages(data_dir=str(tmp_path),
             file_format="array_record").download_and_prepare()
  src = sources.TfdsSource("tiny_images", "train", data_dir=str(tmp_path))
  assert len(src) == 5 and src.num_classes == 3
  heights = sorted(sources.decode_image(src[i]["image"]).size[1]
                   for i in range(5))
  assert heights == [20, 21, 22, 23, 24]
  assert src[0]["key"] == "tfds:tiny_images/train[0]"


@pytest.mark.parametrize("mode,colour", [("CMYK", (0, 255, 255, 0)),
                                         ("L", 90), ("RGB", (10, 200, 30))])
def test_jpeg_draft_keeps_colours_of_every_jpeg_mode(mode, colour):
  data = _encode(Image.new(mode, (400, 300), colour), "JPEG")
  small = sources.decode_image(data, mode, draft_size=(100, 75))
  full = sources.decode_image(data, mode)
  assert small.mode == "RGB" and small.size == (100, 75)
  assert small.getpixel((10, 10)) == full.getpixel((10, 10))


# ---------------------------------------------------------------- decoded


class _WithBad:
  """A source's records plus one file that does not decode (picklable)."""

  def __init__(self, source, bad_path):
    self._source, self._bad = source, bad_path
    self.num_classes = source.num_classes

  def __len__(self):
    return len(self._source) + 1

  def __getitem__(self, i):
    if i < len(self._source):
      return self._source[i]
    return sources.file_record(self._bad, 1)


def test_decoded_cache_equals_decoding(folder, tmp_path):
  import gc  # pylint: disable=g-import-not-at-top
  import pickle  # pylint: disable=g-import-not-at-top
  source = sources.ImageFolderSource(folder)
  bad = tmp_path / "bad" / "cls" / "x.jpg"
  _write(str(bad), b"not an image")
  cache = sources.DecodedImageCache(_WithBad(source, str(bad)),
                                    directory=str(tmp_path))
  assert len(cache) == len(source) + 1 and cache.num_classes == 3
  for i in range(len(source)):
    record, want = cache[i], source[i]
    assert record["label"] == want["label"] and record["key"] == want["key"]
    np.testing.assert_array_equal(
        record["image"],
        np.asarray(sources.decode_image(want["image"], want["key"])))
  assert cache[len(source)]["image"] == b"not an image"  # Left as it was.
  # Worker processes get the file's name and map it; they never remove it.
  copy = pickle.loads(pickle.dumps(cache))
  np.testing.assert_array_equal(copy[0]["image"], cache[0]["image"])
  path = cache._path
  del copy
  gc.collect()
  assert os.path.exists(path)
  del cache
  gc.collect()
  assert not os.path.exists(path)


def test_convert_arrayrecord_command_line(folder, tmp_path, capsys):
  """absl flags: a bad command line is one line, status 2; --no-verify and
  --help as before."""
  assert convert_arrayrecord.main([folder]) == 2
  assert capsys.readouterr().err.startswith(
      "error: expected SRC_DIR DST_PREFIX, got 1 argument(s)")
  assert convert_arrayrecord.main([folder, "p", "--shards=x"]) == 2
  assert "flag --shards=x" in capsys.readouterr().err
  assert convert_arrayrecord.main(["--help"]) == 0
  out = capsys.readouterr().out
  assert "--[no]no-verify:" in out and "--shards:" in out
  prefix = str(tmp_path / "nv" / "train")
  assert convert_arrayrecord.main([folder, prefix, "--no-verify"]) == 0
  assert "records of 3 classes" in capsys.readouterr().out
