"""Tests for mambaeye_jax.data.synthetic."""

import pickle

import grain
import numpy as np
import pytest

from mambaeye_jax.data import synthetic
from mambaeye_jax.data.synthetic import CLASS_NAMES, SyntheticShapes


def test_class_names():
  assert len(CLASS_NAMES) == len(set(CLASS_NAMES)) == 10
  assert SyntheticShapes(1).num_classes == 10
  assert SyntheticShapes(1).class_names == CLASS_NAMES


def test_examples_are_a_function_of_seed_and_index():
  a, b = SyntheticShapes(50, seed=3), SyntheticShapes(50, seed=3)
  # Random access in another order gives the same images.
  for i in (7, 0, 49, 7):
    x, y = a[i], b[i]
    np.testing.assert_array_equal(x["image"], y["image"])
    assert x["label"] == y["label"]
  np.testing.assert_array_equal(a[-1]["image"], a[49]["image"])
  other = SyntheticShapes(50, seed=4)
  assert not np.array_equal(a[7]["image"], other[7]["image"]) or \
      a[7]["image"].shape != other[7]["image"].shape
  # Neighbouring indices of one class differ too.
  assert not np.array_equal(a[3]["image"][:8, :8], a[13]["image"][:8, :8])


def test_sizes_dtype_and_varying_aspect_ratios():
  ds = SyntheticShapes(200, seed=0, min_side=24, max_side=160)
  shapes = np.array([ds[i]["image"].shape for i in range(len(ds))])
  assert np.all(shapes[:, 2] == 3)
  assert shapes[:, :2].min() >= 24 and shapes[:, :2].max() <= 160
  assert ds[0]["image"].dtype == np.uint8
  aspect = shapes[:, 0] / shapes[:, 1]
  assert aspect.min() < 0.5 and aspect.max() > 2.0
  # Both extremes of the side range are reachable.
  assert shapes[:, :2].min() < 40 and shapes[:, :2].max() > 145
  fixed = SyntheticShapes(5, seed=0, min_side=16, max_side=16)
  assert all(fixed[i]["image"].shape == (16, 16, 3) for i in range(5))


def test_labels_in_range_and_balanced():
  ds = SyntheticShapes(1000, seed=1, min_side=16, max_side=24)
  labels = np.array([ds[i]["label"] for i in range(len(ds))])
  assert labels.min() == 0 and labels.max() == 9
  np.testing.assert_array_equal(np.bincount(labels), [100] * 10)
  assert isinstance(ds[5]["label"], int)


def test_length_and_index_errors():
  ds = SyntheticShapes(12)
  assert len(ds) == 12 and len(SyntheticShapes(0)) == 0
  with pytest.raises(IndexError):
    ds[12]
  with pytest.raises(IndexError):
    ds[-13]
  with pytest.raises(ValueError):
    SyntheticShapes(10, min_side=50, max_side=40)
  with pytest.raises(ValueError):
    SyntheticShapes(-1)


def test_pickles_and_works_as_a_grain_source():
  ds = SyntheticShapes(30, seed=2)
  clone = pickle.loads(pickle.dumps(ds))
  np.testing.assert_array_equal(clone[4]["image"], ds[4]["image"])
  mapped = grain.MapDataset.source(ds).shuffle(seed=0)
  assert len(mapped) == 30
  labels = sorted(mapped[i]["label"] for i in range(30))
  assert labels == sorted(ds[i]["label"] for i in range(30))
  first = mapped[0]
  matches = [i for i in range(30)
             if np.array_equal(ds[i]["image"], first["image"])]
  assert len(matches) == 1


def test_two_colour_classes_have_strong_contrast():
  for seed in range(200):
    dark, light = sorted(synthetic._two_colours(np.random.default_rng(seed)),
                         key=lambda c: c @ synthetic._LUMA)
    assert light @ synthetic._LUMA - dark @ synthetic._LUMA >= 127.5 - 1e-9


def _patch_features(ds, seed):
  """One random 16 x 16 patch per image -> phase-free features, labels."""
  rng = np.random.default_rng(seed)
  feats, labels = [], []
  for i in range(len(ds)):
    example = ds[i]
    image = example["image"].astype(np.float64) / 255.0
    row = rng.integers(0, image.shape[0] - 15)
    col = rng.integers(0, image.shape[1] - 15)
    patch = image[row:row + 16, col:col + 16]
    gray = patch.mean(-1)
    spectrum = np.abs(np.fft.rfft2(gray - gray.mean())).ravel()
    feats.append(np.concatenate([spectrum, patch.std(axis=(0, 1))]))
    labels.append(example["label"])
  return np.array(feats), np.array(labels)


def test_classes_are_distinct_at_the_patch_level():
  # The model sees single 16 x 16 patches: a linear (ridge) classifier on the
  # magnitude spectrum of ONE random patch per image must beat chance (10%)
  # by far, on images it never saw.
  x_train, y_train = _patch_features(
      SyntheticShapes(800, seed=0, min_side=24, max_side=64), seed=0)
  x_test, y_test = _patch_features(
      SyntheticShapes(300, seed=1, min_side=24, max_side=64), seed=1)
  mean, std = x_train.mean(0), x_train.std(0) + 1e-6
  a = np.c_[(x_train - mean) / std, np.ones(len(x_train))]
  w = np.linalg.solve(a.T @ a + np.eye(a.shape[1]), a.T @ np.eye(10)[y_train])
  pred = (np.c_[(x_test - mean) / std, np.ones(len(x_test))] @ w).argmax(1)
  per_class = [np.mean(pred[y_test == k] == k) for k in range(10)]
  assert np.mean(pred == y_test) > 0.7, per_class
  assert min(per_class) > 0.3, per_class
