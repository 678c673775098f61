"""Glimpse math on constructed cases (the golden parity is in test_parity)."""

import numpy as np
import pytest

from mambaeye_jax.data import geometry


@pytest.mark.parametrize("method", ["sliding_min", "paint"])
def test_information_ratio_counts_union_inside_image(method):
  box = geometry.ImageBox(top=10, left=20, height=32, width=48)
  positions = np.array([[10, 20], [10, 20], [10, 28], [0, 0], [26, 52]])
  ratio = geometry.information_ratio(positions, box, method)
  area = 32 * 48
  # 256 new; repeat adds nothing; shift by 8 adds 16x8; (0,0) covers only
  # rows 10..15 x cols 20..15 -> nothing; last one covers 16 x 16 new.
  expected = np.cumsum([256, 0, 128, 0, 256]) / area
  np.testing.assert_allclose(ratio, expected, atol=1e-7)


@pytest.mark.parametrize("method", ["sliding_min", "paint"])
def test_information_ratio_clips_to_image_and_reaches_one(method):
  box = geometry.ImageBox(0, 0, 20, 20)
  positions = np.array([[r, c] for r in (0, 4, 8) for c in (0, 4, 8)] + [[10, 10]])
  ratio = geometry.information_ratio(positions, box, method)
  assert np.all(np.diff(ratio) >= 0)
  assert ratio[-1] == pytest.approx(1.0)


def test_extract_patches_order_and_bounds():
  canvas = np.arange(40 * 50 * 3, dtype=np.int64).reshape(40, 50, 3)
  patch = geometry.extract_patches(canvas, np.array([[3, 7]]))[0]
  np.testing.assert_array_equal(patch.reshape(3, 16, 16), canvas[3:19, 7:23].transpose(2, 0, 1))
  with pytest.raises(ValueError, match=r"must lie in \[0, 24\] x \[0, 34\]"):
    geometry.extract_patches(canvas, np.array([[25, 0]]))


def test_move_embedding_formula():
  emb = geometry.move_embedding(np.array([[0, 0], [3, -5]]))
  assert emb.shape == (2, 512)
  np.testing.assert_allclose(emb[0], np.r_[np.zeros(128), np.ones(128)] .tolist() * 2)
  i = 7
  np.testing.assert_allclose(emb[1, i], np.sin(3 / 10000 ** (2 * i / 256)), rtol=1e-6)
  np.testing.assert_allclose(emb[1, 256 + 128 + i], np.cos(-5 / 10000 ** (2 * i / 256)), rtol=1e-6)
