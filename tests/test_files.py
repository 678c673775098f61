"""mambaeye_jax.files: rewrites that leave a whole file or the old one."""

import os

import pytest

from mambaeye_jax import files


def test_writes_text_and_bytes_and_leaves_no_temporary(tmp_path):
  path = tmp_path / "results.json"
  files.write_atomically(path, "{}")
  assert path.read_text() == "{}"
  files.write_atomically(str(path), b"\x00\x01")
  assert path.read_bytes() == b"\x00\x01"
  assert os.listdir(tmp_path) == ["results.json"]


def test_a_write_stopped_before_the_rename_keeps_the_old_file(tmp_path, monkeypatch):
  path = tmp_path / "results.md"
  files.write_atomically(path, "old")

  def stopped(*args):
    raise KeyboardInterrupt

  monkeypatch.setattr(os, "replace", stopped)
  with pytest.raises(KeyboardInterrupt):
    files.write_atomically(path, "new")
  assert path.read_text() == "old"
