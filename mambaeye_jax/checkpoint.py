"""`load_model`: a MambaEye from any of the three places weights live.

* a model directory (`model_dir`: config.json + params/), as written by
  `python -m mambaeye_jax.convert` and by training's export;
* a training work directory (`work_dir`: its latest checkpoint);
* an official PyTorch checkpoint file (`.pt` / `.pth` / `.safetensors`,
  read by `torch_io` without torch and mapped by `official`).
"""

from __future__ import annotations

import dataclasses

from etils import epath

from mambaeye_jax import model as model_lib
from mambaeye_jax import model_dir
from mambaeye_jax import official
from mambaeye_jax import torch_io
from mambaeye_jax import work_dir

# ModelConfig fields that fix the parameters' shapes: a loader cannot change them.
SHAPE_FIELDS = ("depth", "dim", "num_classes", "d_state", "d_conv", "expand",
                "headdim", "ngroups")


def load_model(path: str, **overrides) -> model_lib.MambaEye:
  """Loads a MambaEye from a model directory or an official checkpoint file.

  Args:
    path: a directory from `model_dir.save_params` /
      `python -m mambaeye_jax.convert`, a training work directory (its latest
      checkpoint), or an official `.pt` / `.pth` / `.safetensors` file.
    **overrides: ModelConfig fields that do not change the parameters'
      shapes (dtype, ssd_impl, remat, chunk_size).

  Returns:
    The model, parameters on the default device.
  """
  is_dir = epath.Path(path).is_dir()
  if is_dir and not epath.Path(path, model_dir.CONFIG_FILE).exists():
    if epath.Path(path, work_dir.TRAIN_CONFIG_FILE).exists():
      return work_dir.restore_model(path, **overrides)
  if is_dir:
    config, params = model_dir.load_params(path)
  else:
    config, params = official.state_dict_to_params(torch_io.load_state_dict(path),
                                                   source=path)
  bad = sorted(set(overrides) & set(SHAPE_FIELDS))
  if bad:
    raise ValueError(f"cannot override {bad} when loading {path}: they fix parameter shapes")
  config = dataclasses.replace(config, **overrides)
  return model_dir.model_from_params(config, params, source=path)
