"""Official checkpoint conversion: round trips and clear errors on bad files."""

import collections
import io
import os
import pickle
import shutil
import sys
import types
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mambaeye_jax import checkpoint
from mambaeye_jax import convert
from mambaeye_jax import model as model_lib
from mambaeye_jax import model_dir
from mambaeye_jax import official
from mambaeye_jax import torch_io

SMALL = dict(depth=2, num_classes=7, d_state=16, headdim=32)


def _write_torch_zip(path, state, monkeypatch):
  """Writes `state` in torch.save's zip layout without torch (a test double).

  Stand-in `torch` / `torch._utils` modules make pickle record the same
  globals torch does (torch._utils._rebuild_tensor_v2, torch.FloatStorage);
  storages go to <name>/data/<key> as raw little-endian bytes.
  """
  fake_torch = types.ModuleType("torch")
  fake_utils = types.ModuleType("torch._utils")

  def _rebuild_tensor_v2(*args):
    del args

  _rebuild_tensor_v2.__module__ = "torch._utils"
  _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
  fake_utils._rebuild_tensor_v2 = _rebuild_tensor_v2
  float_storage = type("FloatStorage", (), {"__module__": "torch"})
  fake_torch.FloatStorage = float_storage
  monkeypatch.setitem(sys.modules, "torch", fake_torch)
  monkeypatch.setitem(sys.modules, "torch._utils", fake_utils)

  class Storage:
    def __init__(self, key, numel):
      self.key, self.numel = key, numel

  class Tensor:
    def __init__(self, storage, shape):
      strides = tuple(int(np.prod(shape[i + 1:])) for i in range(len(shape)))
      self.args = (storage, 0, tuple(shape), strides, False, collections.OrderedDict())

    def __reduce__(self):
      return (_rebuild_tensor_v2, self.args)

  class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
      if isinstance(obj, Storage):
        return ("storage", float_storage, obj.key, "cpu", obj.numel)
      return None

  name = os.path.basename(path).split(".")[0]
  tensors = collections.OrderedDict()
  with zipfile.ZipFile(path, "w") as zf:
    for i, (k, v) in enumerate(state.items()):
      raw = np.ascontiguousarray(v, "<f4")
      zf.writestr(f"{name}/data/{i}", raw.tobytes())
      tensors[k] = Tensor(Storage(str(i), raw.size), raw.shape)
    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(tensors)
    zf.writestr(f"{name}/data.pkl", buf.getvalue())
    zf.writestr(f"{name}/version", "3\n")


def _random_official_state(config, seed=0):
  rng = np.random.default_rng(seed)
  model = nnx.eval_shape(lambda: model_lib.MambaEye(config, rngs=nnx.Rngs(0)))
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32),
                        nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  return params, official.params_to_state_dict(params, config)


def test_round_trip_through_official_layout():
  config = model_lib.ModelConfig(**SMALL)
  params, state = _random_official_state(config)
  assert state["mamba2_net.layers.1.mixer.conv1d.weight"].shape == (512 + 2 * 16, 1, 4)
  inferred, back = official.state_dict_to_params(state)
  assert inferred == config
  jax.tree.map(np.testing.assert_array_equal, back, params)


def test_torch_free_reader_and_cli(tmp_path, monkeypatch):
  config = model_lib.ModelConfig(**SMALL)
  params, state = _random_official_state(config, seed=1)
  src = str(tmp_path / "official_small.pt")
  _write_torch_zip(src, state, monkeypatch)
  monkeypatch.undo()  # the reader must not need torch (real or stand-in).
  loaded = torch_io.load_state_dict(src)
  assert set(loaded) == set(state)
  for k in state:
    np.testing.assert_array_equal(loaded[k], state[k])
  dst = str(tmp_path / "converted")
  assert convert.main([src, dst]) == 0
  model = checkpoint.load_model(dst)
  assert model.config == config
  np.testing.assert_array_equal(np.asarray(model.head.kernel[...]), params["head"]["kernel"])
  with pytest.raises(FileExistsError, match="already exists"):
    model_dir.save_params(dst, config, params)


def test_reader_matches_torch_when_installed(golden):
  torch = pytest.importorskip("torch")
  _, pt, _ = golden
  ours = torch_io.load_state_dict(pt)
  theirs = torch.load(pt, map_location="cpu", weights_only=True)
  assert set(ours) == set(theirs)
  for k, v in theirs.items():
    np.testing.assert_array_equal(ours[k], v.numpy())


def test_missing_file_and_non_checkpoint(tmp_path, capsys):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    torch_io.load_state_dict(str(tmp_path / "nope.pt"))
  bad = tmp_path / "notes.pt"
  bad.write_text("not a checkpoint")
  with pytest.raises(torch_io.CheckpointFormatError, match="not a PyTorch checkpoint"):
    torch_io.load_state_dict(str(bad))
  assert convert.main([str(bad), str(tmp_path / "out")]) == 2
  assert "not a PyTorch checkpoint" in capsys.readouterr().err
  assert not (tmp_path / "out").exists()


def test_truncated_checkpoint(tmp_path, golden):
  _, pt, _ = golden
  cut = tmp_path / "cut.pt"
  cut.write_bytes(open(pt, "rb").read()[: os.path.getsize(pt) // 2])
  with pytest.raises(torch_io.CheckpointFormatError, match="cut.pt"):
    torch_io.load_state_dict(str(cut))


def test_missing_key_and_wrong_shape_named():
  config = model_lib.ModelConfig(**SMALL)
  _, state = _random_official_state(config, seed=2)
  broken = dict(state)
  del broken["mamba2_net.layers.1.mixer.A_log"]
  with pytest.raises(official.ConversionError, match=r"missing keys \['mamba2_net.layers.1.mixer.A_log'\]"):
    official.state_dict_to_params(broken, config)
  broken = dict(state)
  broken["mamba2_net.layers.0.mixer.norm.weight"] = np.ones((100,), np.float32)
  with pytest.raises(official.ConversionError,
                     match=r"layers.0.mixer.norm.weight has shape \(100,\), expected \(512,\)"):
    official.state_dict_to_params(broken, config)
  broken = dict(state, **{"mamba2_net.layers.0.mixer.extra": np.ones(3)})
  with pytest.raises(official.ConversionError, match="unexpected keys"):
    official.state_dict_to_params(broken, config)
  with pytest.raises(official.ConversionError, match="missing key 'init_fc.0.weight'"):
    official.infer_config({"foo": np.ones(3)})


def test_load_model_refuses_shape_overrides(golden):
  _, pt, _ = golden
  with pytest.raises(ValueError, match=r"cannot override \['depth'\]"):
    checkpoint.load_model(pt, depth=3)
  model = checkpoint.load_model(pt, dtype="bfloat16")
  assert model.config.dtype == "bfloat16"


def test_model_dir_round_trip_preserves_outputs(tmp_path):
  config = model_lib.ModelConfig(**SMALL)
  model = model_lib.MambaEye(config, rngs=nnx.Rngs(3))
  model_dir.save_params(str(tmp_path / "m"), config, nnx.state(model, nnx.Param))
  again = checkpoint.load_model(str(tmp_path / "m"))
  patches = jnp.ones((1, 5, 768), jnp.uint8)
  positions = jnp.arange(10, dtype=jnp.int32).reshape(1, 5, 2)
  np.testing.assert_array_equal(model(patches, positions), again(patches, positions))
  shutil.rmtree(tmp_path / "m" / "params")
  with pytest.raises(Exception):
    checkpoint.load_model(str(tmp_path / "m"))
