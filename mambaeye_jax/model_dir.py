"""The model-directory format: written and read here, and only here.

A model directory holds:

    config.json   the ModelConfig fields (plus a format version)
    params/       an orbax checkpoint of the parameter tree
                  (the structure of `nnx.state(MambaEye(config), nnx.Param)`)

`python -m mambaeye_jax.convert` and training's export write one;
`mambaeye_jax.checkpoint.load_model` reads one (and the other formats).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from mambaeye_jax import model as model_lib

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


def is_url(path: str | os.PathLike) -> bool:
  """True for "gs://bucket/dir"-style paths, which must not go through os.path.

  os.path.abspath("gs://b/run") is "$PWD/gs:/b/run", a local directory.
  """
  return "://" in os.fspath(path)


def absolute(path: str | os.PathLike) -> str:
  """os.path.abspath of a local path; a URL (gs://...) unchanged."""
  path = os.fspath(path)
  return path if is_url(path) else os.path.abspath(path)


def config_to_dict(config: model_lib.ModelConfig) -> dict:
  return dataclasses.asdict(config)


def config_from_dict(fields: dict, source: str = "config") -> model_lib.ModelConfig:
  """ModelConfig from a dict, naming any unknown field."""
  known = {f.name for f in dataclasses.fields(model_lib.ModelConfig)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f"{source}: unknown ModelConfig fields {unknown}; known: {sorted(known)}")
  return model_lib.ModelConfig(**fields)


def save_params(directory: str, config: model_lib.ModelConfig, params, *,
                this_process_only: bool = False) -> None:
  """Writes config.json and params/ into a new directory.

  Args:
    directory: must not exist yet (nothing is ever overwritten).
    config: the model's config.
    params: nested dict (or nnx.State) of arrays.
    this_process_only: write from this process alone (process 0 of a
      multi-process run; the default checkpointer would wait for every
      process at its barriers).
  """
  directory = absolute(directory)
  # epath: the same os calls for local paths, and gs:// (with gcsfs) too.
  if epath.Path(directory).exists():
    raise FileExistsError(f"{directory} already exists; choose a new directory")
  epath.Path(directory).mkdir(parents=True)
  if isinstance(params, nnx.State):
    params = nnx.to_pure_dict(params)
  params = jax.tree.map(np.asarray, params)
  options = {}
  if this_process_only:
    options["multiprocessing_options"] = ocp.options.MultiprocessingOptions(
        primary_host=jax.process_index(), active_processes={jax.process_index()})
  with ocp.StandardCheckpointer(**options) as ckptr:
    ckptr.save(os.path.join(directory, PARAMS_DIR), params)
  with epath.Path(directory, CONFIG_FILE).open("w") as f:
    json.dump({"format_version": FORMAT_VERSION, "model": config_to_dict(config)}, f, indent=2)


def read_config(directory: str) -> model_lib.ModelConfig:
  path = os.path.join(directory, CONFIG_FILE)
  if not epath.Path(path).exists():
    raise FileNotFoundError(f"{directory} is not a mambaeye-jax model directory "
                            f"(no {CONFIG_FILE})")
  with epath.Path(path).open() as f:
    meta = json.load(f)
  if meta.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{path}: format_version {meta.get('format_version')} is not "
                     f"{FORMAT_VERSION}")
  return config_from_dict(meta["model"], path)


def abstract_model(config: model_lib.ModelConfig) -> model_lib.MambaEye:
  """A model whose arrays are shapes only (nothing allocated)."""
  return nnx.eval_shape(lambda: model_lib.MambaEye(config, rngs=nnx.Rngs(0)))


def model_from_params(config: model_lib.ModelConfig, params, source: str = "params"):
  """Builds a MambaEye holding `params` (nested dict), checking every shape.

  Raises:
    ValueError: naming the parameter whose structure or shape differs.
  """
  model = abstract_model(config)
  expected = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  flat_expected = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
  flat_given = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  name = jax.tree_util.keystr
  missing = sorted(name(k) for k in set(flat_expected) - set(flat_given))
  extra = sorted(name(k) for k in set(flat_given) - set(flat_expected))
  if missing or extra:
    raise ValueError(f"{source}: parameters do not fit {config}: missing {missing}, "
                     f"unexpected {extra}")
  for key, want in flat_expected.items():
    got = np.shape(flat_given[key])
    if tuple(got) != tuple(want.shape):
      raise ValueError(f"{source}: parameter {name(key)} has shape {tuple(got)}, "
                       f"expected {tuple(want.shape)}")
  params = jax.tree.map(lambda a, w: jax.numpy.asarray(a, w.dtype), params, expected)
  graphdef, state = nnx.split(model)
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)


def load_params(directory: str):
  """(config, params) from a model directory written by `save_params`."""
  config = read_config(directory)
  path = os.path.join(absolute(directory), PARAMS_DIR)
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(path)
  return config, params
