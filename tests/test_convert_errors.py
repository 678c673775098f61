"""Bad official checkpoints are refused with the file, tensor and reason."""

import json
import struct

import numpy as np
import pytest

from mambaeye_jax import checkpoint
from mambaeye_jax import convert
from mambaeye_jax import model as model_lib
from mambaeye_jax import official
from mambaeye_jax import torch_io
from test_convert import SMALL, _random_official_state, _write_torch_zip  # pylint: disable=g-bad-import-order


def write_safetensors(path, tensors, dtypes=None):
  """A minimal safetensors writer: {name: float32 array}; `dtypes` may
  relabel a tensor's dtype string (to fake an unknown one)."""
  header, chunks, offset = {}, [], 0
  for name, value in tensors.items():
    raw = np.ascontiguousarray(value, "<f4").tobytes()
    header[name] = {"dtype": (dtypes or {}).get(name, "F32"),
                    "shape": list(np.shape(value)),
                    "data_offsets": [offset, offset + len(raw)]}
    chunks.append(raw)
    offset += len(raw)
  head = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(head)) + head + b"".join(chunks))


def test_nan_weights_in_a_pt_are_refused(tmp_path, monkeypatch, capsys):
  config = model_lib.ModelConfig(**SMALL)
  _, state = _random_official_state(config, seed=4)
  state["mamba2_net.layers.1.mixer.in_proj.weight"][3, :5] = np.nan
  state["classification_head.0.bias"][0] = np.inf
  src = str(tmp_path / "nan.pt")
  _write_torch_zip(src, state, monkeypatch)
  monkeypatch.undo()
  with pytest.raises(official.ConversionError,
                     match=r"non-finite values .* in 2 tensors: .*"
                     r"classification_head.0.bias \(1 of 7\).*"
                     r"mamba2_net.layers.1.mixer.in_proj.weight \(5 of "):
    checkpoint.load_model(src)
  assert convert.main([src, str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err
  assert "non-finite" in err and "layers.1.mixer.in_proj.weight" in err
  assert not (tmp_path / "out").exists()


def test_random_bytes_safetensors(tmp_path):
  path = tmp_path / "noise.safetensors"
  path.write_bytes(np.random.default_rng(0).bytes(4096))
  with pytest.raises(torch_io.CheckpointFormatError,
                     match=r"noise.safetensors: not a safetensors file: header "
                     r"length [\d,]+ exceeds the file's size \(4,096 bytes\)"):
    torch_io.load_state_dict(str(path))
  short = tmp_path / "short.safetensors"
  short.write_bytes(b"\x01\x02")
  with pytest.raises(torch_io.CheckpointFormatError, match="too short"):
    torch_io.load_state_dict(str(short))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    torch_io.load_state_dict(str(tmp_path / "nope.safetensors"))


def test_safetensors_unknown_dtype_and_bad_offsets(tmp_path):
  path = str(tmp_path / "f8.safetensors")
  write_safetensors(path, {"a": np.ones(4), "init_fc.0.weight": np.ones((2, 3))},
                    dtypes={"init_fc.0.weight": "F8_E4M3"})
  with pytest.raises(torch_io.CheckpointFormatError,
                     match=r"tensor 'init_fc.0.weight' has dtype F8_E4M3, which "
                     r"this reader does not support \(supported: F32"):
    torch_io.load_state_dict(path)
  # Offsets that do not hold the shape, and a file cut short.
  write_safetensors(path, {"a": np.ones(4)})
  raw = bytearray(open(path, "rb").read())
  head_len = struct.unpack("<Q", raw[:8])[0]
  header = json.loads(raw[8:8 + head_len])
  header["a"]["shape"] = [5]
  head = json.dumps(header).encode()
  bad = tmp_path / "shape.safetensors"
  bad.write_bytes(struct.pack("<Q", len(head)) + head + raw[8 + head_len:])
  with pytest.raises(torch_io.CheckpointFormatError,
                     match=r"tensor 'a' has data offsets \[0, 16\], which do not "
                     r"hold F32 \[5\] \(20 bytes\)"):
    torch_io.load_state_dict(str(bad))
  cut = tmp_path / "cut.safetensors"
  cut.write_bytes(open(path, "rb").read()[:-4])
  with pytest.raises(torch_io.CheckpointFormatError, match="'a' is truncated"):
    torch_io.load_state_dict(str(cut))


def test_safetensors_round_trip_still_converts(tmp_path):
  config = model_lib.ModelConfig(**SMALL)
  params, state = _random_official_state(config, seed=5)
  path = str(tmp_path / "ok.safetensors")
  write_safetensors(path, state)
  inferred, back = official.state_dict_to_params(torch_io.load_state_dict(path))
  assert inferred == config
  np.testing.assert_array_equal(back["head"]["kernel"], params["head"]["kernel"])


def test_convert_refuses_existing_destination_before_reading(tmp_path, capsys):
  dst = tmp_path / "out"
  dst.mkdir()
  assert convert.main([str(tmp_path / "missing.pt"), str(dst)]) == 2
  assert "out already exists" in capsys.readouterr().err


@pytest.mark.parametrize("argv, want", [
    (["only.pt"], "error: expected SRC.pt DST_DIR, got 1 argument(s): only.pt"),
    (["a.pt", "out", "extra"], "error: expected SRC.pt DST_DIR, got 3 argument(s)"),
    (["a.pt", "out", "--ngroups", "0"], "error: flag --ngroups=0: 0 is not a positive"),
    (["a.pt", "out", "--bogus"], "error: Unknown command line flag 'bogus'"),
])
def test_convert_usage_errors(argv, want, capsys):
  assert convert.main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith(want) and len(err.strip().splitlines()) == 1, err


def test_convert_help_and_flags_after_paths(tmp_path, capsys):
  assert convert.main(["--help"]) == 0
  out = capsys.readouterr().out
  assert "SRC.pt DST_DIR" in out and "--ngroups:" in out
  # absl takes flags anywhere: --ngroups after the two paths still parses.
  assert convert.main([str(tmp_path / "missing.pt"), str(tmp_path / "o"),
                       "--ngroups=2"]) == 2
  assert "missing.pt does not exist" in capsys.readouterr().err
