"""The Grain pipeline: golden parity, determinism, exact resume, bad input,
padding and packing invariants, evaluation sharding."""

import io
import os

import grain
import numpy as np
import pytest
from PIL import Image

from mambaeye_jax import glimpse
from mambaeye_jax.data import batching
from mambaeye_jax.data import eval_transforms
from mambaeye_jax.data import geometry
from mambaeye_jax.data import glimpses
from mambaeye_jax.data import pipeline
from mambaeye_jax.data import scan_patterns
from mambaeye_jax.data import sources
from mambaeye_jax.data import synthetic

import conftest

P = geometry.PATCH_SIZE
KEYS = ("patches", "positions", "ratio", "labels", "mask", "segment_ids")

# Small and fast: CIFAR-like canvases, short sequences.
SMALL = dict(source="synthetic", synthetic_size=24, batch_size=4,
             num_glimpses=32, canvas_min=32, canvas_max=64, seed=3)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert set(x) == set(KEYS) and set(y) == set(KEYS)
    for k in KEYS:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ---------------------------------------------------------------- golden


@pytest.fixture(scope="module")
def golden_io():
  path = os.path.join(conftest.golden_dir(), "official_depth2_io.npz")
  if not os.path.exists(path):
    pytest.skip(f"{path} not found (set MAMBAEYE_GOLDEN_DIR)")
  return dict(np.load(path))


def test_golden_parity_through_the_pipeline_code(golden_io):
  g = golden_io
  # The golden canvas holds floats that are not 8-bit levels, so the
  # (dtype-generic) gather runs on it in float32: the same code that gathers
  # uint8 in the pipeline.
  canvas = g["canvas"].transpose(1, 2, 0)
  box = geometry.ImageBox(int(g["row_offset"]), int(g["col_offset"]),
                         int(g["img_h"]), int(g["img_w"]))
  outside = canvas.copy()
  outside[box.top:box.top + box.height, box.left:box.left + box.width] = 0
  assert not outside.any()
  pixels = canvas[box.top:box.top + box.height, box.left:box.left + box.width]
  positions = np.stack([g["rows"], g["cols"]], -1)
  side = canvas.shape[0]
  ex = glimpses.make_example(pixels, (side, side), box, positions,
                             int(g["label"][0]))
  # Patches exactly, ratio to 1e-7.
  np.testing.assert_array_equal(ex["patches"], g["img_sequence"])
  np.testing.assert_allclose(ex["ratio"], g["information_ratio"], atol=1e-7)
  # Through packing: the sequence twice in one row; each segment's moves
  # (model-side, reset at segment starts) match the official embedding.
  n = len(positions)
  # Batches carry uint8 patches; quantise as the pipeline's images are.
  ex["patches"] = np.rint(ex["patches"] * 255).astype(np.uint8)
  (batch,) = batching.batch_examples([ex, ex], batch_size=1, seq_len=2 * n,
                                     packing=True)
  np.testing.assert_array_equal(batch["segment_ids"][0],
                                np.repeat([1, 2], n))
  np.testing.assert_array_equal(batch["labels"][0], int(g["label"][0]))
  moves = glimpse.moves_from_positions_jax(batch["positions"],
                                           batch["segment_ids"])
  emb = np.asarray(glimpse.move_embedding_jax(moves))[0]
  for segment in (emb[:n], emb[n:]):
    np.testing.assert_allclose(segment, g["move_embedding"], atol=2e-5)
  np.testing.assert_array_equal(batch["patches"][0, n:], ex["patches"])
  np.testing.assert_array_equal(batch["ratio"][0, :n], ex["ratio"])


# ---------------------------------------------------------------- config


def test_config_from_mapping_namespace_and_overrides():
  cfg = pipeline.DataConfig.from_any({"batch_size": 8}, num_glimpses=16)
  assert (cfg.batch_size, cfg.num_glimpses, cfg.row_length) == (8, 16, 16)

  class Namespace:
    batch_size = 2
    unrelated = "ignored on attribute objects"
  assert pipeline.DataConfig.from_any(Namespace()).batch_size == 2
  with pytest.raises(ValueError, match="unknown data config keys"):
    pipeline.DataConfig.from_any({"batchsize": 8})
  with pytest.raises(ValueError, match="seq_len"):
    pipeline.DataConfig(num_glimpses=64, seq_len=32)
  with pytest.raises(KeyError, match="unknown scan pattern"):
    pipeline.DataConfig(scan_pattern="zigzagz")
  with pytest.raises(ValueError, match="resize_mode"):
    pipeline.DataConfig(resize_mode="stretch")
  with pytest.raises(ValueError, match="needs resize_mode 'none'"):
    pipeline.DataConfig(eval_canvas=0, resize_mode="fit")


# ---------------------------------------------------------------- training


def test_train_batches_contract_and_determinism():
  a = _take(pipeline.make_train_iterator(SMALL), 3)
  b = _take(pipeline.make_train_iterator(SMALL), 3)
  _assert_batches_equal(a, b)
  batch = a[0]
  assert batch["patches"].shape == (4, 32, 768)
  assert batch["patches"].dtype == np.uint8
  assert batch["positions"].shape == (4, 32, 2)
  assert batch["positions"].dtype == np.int32
  assert batch["ratio"].dtype == np.float32
  assert batch["labels"].dtype == np.int32 and batch["mask"].dtype == bool
  assert batch["segment_ids"].dtype == np.int32
  assert batch["mask"].all() and (batch["segment_ids"] == 1).all()
  assert (batch["positions"] >= 0).all()
  assert (batch["positions"] <= SMALL["canvas_max"] - P).all()
  other = _take(pipeline.make_train_iterator({**SMALL, "seed": 4}), 1)
  assert not np.array_equal(other[0]["patches"], batch["patches"])


def _orbax_round_trip(tmp_path, it, fresh):
  """Saves `it` with orbax + grain's handler, restores into `fresh`."""
  ocp = pytest.importorskip("orbax.checkpoint")
  with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
    mngr.save(7, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    mngr.restore(7, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointRestore(fresh)))
  return fresh


@pytest.mark.parametrize("extra", [
    {},
    {"packing": True, "min_glimpses": 5, "seq_len": 48},
], ids=["padded", "packed"])
def test_exact_resume_through_orbax(tmp_path, extra):
  config = {**SMALL, **extra}
  it = pipeline.make_train_iterator(config)
  _take(it, 3)
  saved_skips = it.num_skipped
  state_before = it.get_state()
  want = _take(it, 3)
  it.set_state(state_before)  # Also rewinds in place.
  _assert_batches_equal(_take(it, 3), want)
  it.set_state(state_before)
  fresh = _orbax_round_trip(tmp_path, it, pipeline.make_train_iterator(
      config))
  assert fresh.num_skipped == saved_skips
  _assert_batches_equal(_take(fresh, 3), want)


def test_resume_with_worker_processes():
  config = {**SMALL, "worker_count": 2, "num_glimpses": 16}
  it = pipeline.make_train_iterator(config)
  _take(it, 2)
  state = it.get_state()
  want = _take(it, 2)
  it.close()
  fresh = pipeline.make_train_iterator(config)
  fresh.set_state(state)
  got = _take(fresh, 2)
  fresh.close()
  _assert_batches_equal(got, want)


def test_epochs_reshuffle_and_cover_every_record():
  n = 12
  config = {**SMALL, "synthetic_size": n, "batch_size": 1, "num_epochs": 2}
  src = synthetic.SyntheticShapes(n, seed=SMALL["seed"])
  assert len(list(pipeline.make_train_iterator(config))) == 2 * n
  # Labels of each epoch are a permutation of the records' labels, and the
  # two epochs come in different orders.
  labels = [int(b["labels"][0, 0]) for b in
            pipeline.make_train_iterator(config)]
  want = sorted(src[i]["label"] for i in range(n))
  assert sorted(labels[:n]) == want and sorted(labels[n:]) == want
  assert labels[:n] != labels[n:]


def test_varying_lengths_padded():
  config = {**SMALL, "min_glimpses": 4, "num_glimpses": 20}
  for batch in _take(pipeline.make_train_iterator(config), 4):
    lengths = batch["mask"].sum(1)
    assert ((lengths >= 4) & (lengths <= 20)).all()
    assert batch["patches"].shape[1] == 20
    _check_row_invariants(batch)
  lengths = np.concatenate([
      b["mask"].sum(1) for b in _take(pipeline.make_train_iterator(config), 4)])
  assert len(set(lengths.tolist())) > 3  # T really varies.


def _check_row_invariants(batch):
  """What the model and loss rely on, per row."""
  mask, seg = batch["mask"], batch["segment_ids"]
  np.testing.assert_array_equal(mask, seg > 0)
  for i in range(len(mask)):
    s = seg[i]
    real = np.nonzero(mask[i])[0]
    if real.size:  # Real steps first, then padding.
      assert real[-1] == real.size - 1
      assert (np.diff(s[:real.size]) >= 0).all()  # 1, 1, 2, 2, 3 ...
      assert s[0] == 1 and set(np.unique(s[:real.size])) == set(
          range(1, s[real.size - 1] + 1))
    for k in np.unique(s[s > 0]):
      steps = s == k
      assert len(np.unique(batch["labels"][i][steps])) == 1
      ratio = batch["ratio"][i][steps]
      assert (np.diff(ratio) >= 0).all() and 0 <= ratio[0] <= ratio[-1] <= 1
    pad = ~mask[i]
    assert not batch["patches"][i][pad].any()
    assert not batch["positions"][i][pad].any()
    assert not batch["ratio"][i][pad].any()
    assert not batch["labels"][i][pad].any()


def test_packing_keeps_every_sequence_in_order():
  base = {**SMALL, "min_glimpses": 3, "num_glimpses": 24, "num_epochs": 1,
          "synthetic_size": 20, "batch_size": 3}
  padded = list(pipeline.make_train_iterator(base))
  packed = list(pipeline.make_train_iterator(
      {**base, "packing": True, "seq_len": 40}))

  def sequences(batches):
    out = []
    for batch in batches:
      _check_row_invariants(batch)
      for i in range(len(batch["mask"])):
        for k in np.unique(batch["segment_ids"][i]):
          if k:
            steps = batch["segment_ids"][i] == k
            out.append((batch["labels"][i][steps][0],
                        batch["positions"][i][steps].tobytes(),
                        batch["patches"][i][steps].tobytes()))
    return out

  # Finite stream: drop_remainder differs (padded drops the last partial
  # batch of rows, packed the last partial batch of packed rows), so compare
  # the common prefix, which must be most of the data.
  want, got = sequences(padded), sequences(packed)
  common = min(len(want), len(got))
  assert common >= 15
  assert got[:common] == want[:common]
  assert max(b["segment_ids"].max() for b in packed) >= 2  # Really packed.
  # Packing wastes fewer steps on padding than one sequence per row.
  assert (np.mean([b["mask"].mean() for b in packed])
          > np.mean([b["mask"].mean() for b in padded]))


def test_example_longer_than_row_fails_clearly():
  ex = {"patches": np.zeros((9, 768), np.uint8),
        "positions": np.zeros((9, 2), np.int32),
        "ratio": np.zeros(9, np.float32), "label": np.int32(0),
        "length": np.int32(9)}
  with pytest.raises(ValueError, match="exceeds seq_len=8"):
    batching.batch_examples([ex], batch_size=1, seq_len=8)


# ---------------------------------------------------------------- bad input


def _png(array):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, "PNG")
  return buf.getvalue()


@pytest.fixture
def messy_folder(tmp_path):
  """Good images of awkward kinds, three bad files, an empty class."""
  rng = np.random.default_rng(0)
  root = tmp_path / "messy"
  files = {
      "a/rgb.png": _png(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)),
      "a/gray.png": _png(rng.integers(0, 256, (20, 20), dtype=np.uint8)),
      "a/tiny.png": _png(rng.integers(0, 256, (3, 2, 3), dtype=np.uint8)),
      "a/deep.png": _png(rng.integers(0, 65536, (17, 9), dtype=np.uint16)),
      "b/rgba.png": _png(rng.integers(0, 256, (25, 18, 4), dtype=np.uint8)),
      "b/corrupt.jpg": b"\xff\xd8\xff\xe0 garbage" * 10,
      "b/text.jpg": b"this is a text file with an image extension",
      "b/truncated.png": _png(
          rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))[:300],
      "b/needle.png": _png(rng.integers(0, 256, (1, 90, 3), dtype=np.uint8)),
  }
  for name, data in files.items():
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
  (root / "c_empty").mkdir()
  return str(root)


def test_bad_records_are_skipped_and_counted(messy_folder):
  config = {**SMALL, "source": "folder", "path": messy_folder,
            "batch_size": 1, "num_epochs": 1, "shuffle": False}
  it = pipeline.make_train_iterator(config)
  batches = list(it)
  assert len(batches) == 6  # The good ones, each exactly once.
  assert it.num_skipped == 3
  assert sorted(int(b["labels"][0, 0]) for b in batches) == [0] * 4 + [1] * 2
  for batch in batches:
    _check_row_invariants(batch)
  ev = pipeline.make_eval_iterator({**config, "eval_canvas": 48})
  assert sum(int(b["mask"].any()) for b in ev) == 6 and ev.num_skipped == 3


@pytest.mark.parametrize("folder_kind", ["messy", "cifar_jpegs"])
def test_decoded_cache_gives_identical_batches(messy_folder, tmp_path,
                                               folder_kind):
  # DataConfig.cache_decoded: the same batches (bad records skipped and
  # counted the same) on images no sample shrinks below half (CIFAR-sized
  # JPEGs at canvas 32..64, where reduced-scale decoding never applies).
  root = messy_folder
  if folder_kind == "cifar_jpegs":
    root = tmp_path / "cifar"
    rng = np.random.default_rng(1)
    for i in range(10):
      path = root / f"c{i % 3}" / f"{i}.jpg"
      path.parent.mkdir(parents=True, exist_ok=True)
      Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
          path, "JPEG")
    root = str(root)
  config = {**SMALL, "source": "folder", "path": root, "batch_size": 2,
            "num_epochs": 2}
  plain = pipeline.make_train_iterator(config)
  cached = pipeline.make_train_iterator({**config, "cache_decoded": True})
  _assert_batches_equal(list(plain), list(cached))
  assert plain.num_skipped == cached.num_skipped


def test_bad_records_raise_when_asked(messy_folder):
  config = {**SMALL, "source": "folder", "path": messy_folder,
            "batch_size": 1, "num_epochs": 1, "shuffle": False,
            "on_error": "raise"}
  with pytest.raises(sources.BadImageError, match=r"b/corrupt\.jpg"):
    list(pipeline.make_train_iterator(config))


# ---------------------------------------------------------------- eval


def test_eval_shards_are_even_and_cover_everything_once():
  config = {**SMALL, "synthetic_size": 11, "batch_size": 2,
            "num_glimpses": 16, "eval_canvas": 48}
  single = list(pipeline.make_eval_iterator(config))
  shards = [list(pipeline.make_eval_iterator(
      config, shard_options=grain.sharding.ShardOptions(i, 3)))
            for i in range(3)]
  assert len(single) == 6 and [len(s) for s in shards] == [2, 2, 2]

  def rows(batches):
    return [(b["labels"][i, 0], b["patches"][i].tobytes(),
             b["positions"][i].tobytes())
            for b in batches for i in range(len(b["mask"]))
            if b["mask"][i].any()]

  # Every record once, and the same sequence whatever the process count
  # (scan randomness is keyed by the record's global index).
  assert len(rows(single)) == 11
  assert sorted(sum((rows(s) for s in shards), [])) == sorted(rows(single))
  for b in single:
    _check_row_invariants(b)
    assert ((b["mask"].sum(1) == 16) | (b["mask"].sum(1) == 0)).all()
  # eval_canvas 0 with "none": each canvas is the image's longer side.
  native = next(iter(pipeline.make_eval_iterator(
      {**config, "eval_canvas": 0, "resize_mode": "none"})))
  record = synthetic.SyntheticShapes(11, seed=SMALL["seed"])[0]
  canvas, box = eval_transforms.eval_canvas(record["image"], "none", None)
  assert canvas.shape[0] == max(record["image"].shape[:2])
  want = scan_patterns.generate(
      "random", np.random.default_rng([SMALL["seed"], 0]), canvas.shape[:2],
      box, 16)  # Seeded by (seed, the record's global index), as documented.
  np.testing.assert_array_equal(native["positions"][0], want)
  np.testing.assert_array_equal(native["patches"][0],
                                geometry.extract_patches(canvas, want))
  # A deterministic scan pattern on the official evaluation canvas, e.g.
  # column_major, equals the pattern computed directly from the record.
  raster = next(iter(pipeline.make_eval_iterator(
      {**config, "scan_pattern": "column_major"})))
  record = synthetic.SyntheticShapes(11, seed=SMALL["seed"])[0]
  canvas, box = eval_transforms.eval_canvas(record["image"], "fit", 48)
  want = scan_patterns.generate("column_major", None, (48, 48), box, 16)
  np.testing.assert_array_equal(raster["positions"][0], want)
  np.testing.assert_array_equal(
      raster["patches"][0], geometry.extract_patches(canvas, want))


# ---------------------------------------------------------------- bench


def test_bench_cli_runs(messy_folder, capsys):
  bench = conftest.load_benchmark("bench_data")
  bench.main(["--images", messy_folder, "--samples", "9", "--batch_size",
              "2", "--pipeline_batches", "1", "--reference_samples", "2",
              "--num_glimpses", "16", "--canvas_min", "32", "--canvas_max",
              "64", "--all_cores"])
  out = capsys.readouterr().out
  for line in ("stage by stage", "information ratio", "samples/s per core",
               "official order of work", "Grain pipeline end to end",
               "canvas (ship=canvas)", "total, ship=canvas", "batching, ship=canvas",
               "transfer to main process, ship=canvas", "ship=patches  "):
    assert line in out, line
  assert out.count("leaving out") == 3  # The messy folder's bad files.
