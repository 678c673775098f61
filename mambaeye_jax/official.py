"""Official PyTorch MambaEye state_dicts <-> this project's parameters.

`infer_config` reads the model's sizes from an official state_dict's shapes
(DESIGN.md section 1 lists its keys), `state_dict_to_params` checks every key
and shape and maps them onto `MambaEye`'s parameter tree, and
`params_to_state_dict` maps back. Reading the files is `torch_io`'s job;
`python -m mambaeye_jax.convert` writes the result as a model directory.

Key map (i = layer; our block parameters are stacked over layers):

    init_fc.0.weight (d, 1280)            -> init_fc.kernel (1280, d)   [T]
    mamba2_net.layers.i.norm.weight       -> blocks.norm.weight[i]
    ...mixer.in_proj.weight (P, d)        -> blocks.mixer.in_proj.kernel[i] (d, P)
    ...mixer.conv1d.weight (C, 1, k)      -> blocks.mixer.conv_kernel[i] (k, C)
    ...mixer.{dt_bias, A_log, D, conv1d.bias, norm.weight}  -> same names
    ...mixer.out_proj.weight (d, e)       -> blocks.mixer.out_proj.kernel[i] (e, d)
    mamba2_net.norm_f.weight              -> norm_f.weight
    classification_head.0.{weight, bias}  -> head.{kernel [T], bias}
"""

from __future__ import annotations

import re

import numpy as np

from mambaeye_jax import model as model_lib

_LAYER_KEY = re.compile(r"^mamba2_net\.layers\.(\d+)\.(.+)$")

def _same(w):
  return w


def _transpose(w):
  return w.T


def _conv_to_ours(w):
  return w[:, 0, :].T  # (C, 1, k) -> (k, C)


def _conv_to_official(w):
  return w.T[:, None, :]  # (k, C) -> (C, 1, k)


# Official key (per-layer suffix) -> (our path, to ours, back to official).
_LAYER_MAP = {
    "norm.weight": (("norm", "weight"), _same, _same),
    "mixer.in_proj.weight": (("mixer", "in_proj", "kernel"), _transpose, _transpose),
    "mixer.conv1d.weight": (("mixer", "conv_kernel"), _conv_to_ours, _conv_to_official),
    "mixer.conv1d.bias": (("mixer", "conv_bias"), _same, _same),
    "mixer.dt_bias": (("mixer", "dt_bias"), _same, _same),
    "mixer.A_log": (("mixer", "A_log"), _same, _same),
    "mixer.D": (("mixer", "D"), _same, _same),
    "mixer.norm.weight": (("mixer", "norm", "weight"), _same, _same),
    "mixer.out_proj.weight": (("mixer", "out_proj", "kernel"), _transpose, _transpose),
}
_TOP_MAP = {
    "init_fc.0.weight": (("init_fc", "kernel"), _transpose, _transpose),
    "init_fc.0.bias": (("init_fc", "bias"), _same, _same),
    "mamba2_net.norm_f.weight": (("norm_f", "weight"), _same, _same),
    "classification_head.0.weight": (("head", "kernel"), _transpose, _transpose),
    "classification_head.0.bias": (("head", "bias"), _same, _same),
}


class ConversionError(ValueError):
  """An official checkpoint that does not fit any MambaEye."""


def _require(state: dict, key: str, source: str) -> np.ndarray:
  if key not in state:
    raise ConversionError(f"{source}: missing key {key!r} (not an official MambaEye state_dict?)")
  return np.asarray(state[key])


def infer_config(state: dict, source: str = "checkpoint", ngroups: int = 1,
                 **overrides) -> model_lib.ModelConfig:
  """Reads the model's sizes off the official tensors' shapes.

  Args:
    state: flat official state_dict of numpy arrays.
    source: name used in error messages.
    ngroups: B/C groups (shapes alone cannot tell groups from d_state).
    **overrides: other ModelConfig fields (dtype, ssd_impl, ...).

  Returns:
    The ModelConfig whose parameters have exactly these shapes.
  """
  init_w = _require(state, "init_fc.0.weight", source)
  dim = init_w.shape[0]
  head_w = _require(state, "classification_head.0.weight", source)
  layer_ids = sorted({int(m.group(1)) for k in state if (m := _LAYER_KEY.match(k))})
  if not layer_ids:
    raise ConversionError(f"{source}: no mamba2_net.layers.* keys")
  if layer_ids != list(range(len(layer_ids))):
    raise ConversionError(f"{source}: layer indices are not 0..{len(layer_ids) - 1}: {layer_ids}")
  conv_w = _require(state, "mamba2_net.layers.0.mixer.conv1d.weight", source)
  nheads = _require(state, "mamba2_net.layers.0.mixer.dt_bias", source).shape[0]
  out_w = _require(state, "mamba2_net.layers.0.mixer.out_proj.weight", source)
  d_inner = out_w.shape[1]
  if d_inner % dim or d_inner % nheads:
    raise ConversionError(f"{source}: out_proj.weight {out_w.shape} and dt_bias ({nheads},) "
                          f"fit no Mamba2 with dim {dim}")
  gn2 = conv_w.shape[0] - d_inner
  if gn2 <= 0 or gn2 % (2 * ngroups):
    raise ConversionError(f"{source}: conv1d.weight {conv_w.shape} fits no d_state with "
                          f"d_inner {d_inner} and {ngroups=}")
  fields = dict(depth=len(layer_ids), dim=dim, num_classes=head_w.shape[0],
                d_state=gn2 // (2 * ngroups), d_conv=conv_w.shape[2],
                expand=d_inner // dim, headdim=d_inner // nheads, ngroups=ngroups)
  fields.update(overrides)
  return model_lib.ModelConfig(**fields)


def _expected_shapes(config: model_lib.ModelConfig) -> dict:
  """Official key -> shape for this config (per layer keys use layer 0's name)."""
  c = config.mixer
  d = config.dim
  shapes = {
      "init_fc.0.weight": (d, 1280), "init_fc.0.bias": (d,),
      "mamba2_net.norm_f.weight": (d,),
      "classification_head.0.weight": (config.num_classes, d),
      "classification_head.0.bias": (config.num_classes,),
  }
  layer = {
      "norm.weight": (d,), "mixer.in_proj.weight": (c.in_proj_dim, d),
      "mixer.conv1d.weight": (c.conv_dim, 1, c.d_conv), "mixer.conv1d.bias": (c.conv_dim,),
      "mixer.dt_bias": (c.nheads,), "mixer.A_log": (c.nheads,), "mixer.D": (c.nheads,),
      "mixer.norm.weight": (c.d_inner,), "mixer.out_proj.weight": (d, c.d_inner),
  }
  for i in range(config.depth):
    for suffix, shape in layer.items():
      shapes[f"mamba2_net.layers.{i}.{suffix}"] = shape
  return shapes


def _set(tree: dict, path: tuple, value):
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def state_dict_to_params(state: dict, config: model_lib.ModelConfig | None = None,
                         source: str = "checkpoint"):
  """Converts an official state_dict to our nested parameter dict.

  Args:
    state: flat {official key: array}.
    config: the target config; inferred from the shapes when None.
    source: name used in error messages.

  Returns:
    (config, params): params is a nested dict of float32 numpy arrays with
    the structure of `nnx.state(MambaEye(config), nnx.Param)`.

  Raises:
    ConversionError: missing or unexpected keys, a shape that does not fit
      (the message names the key, the shape found and the shape expected),
      or non-finite values (NaN or infinity; the message names the key).
  """
  config = config or infer_config(state, source)
  expected = _expected_shapes(config)
  missing = sorted(set(expected) - set(state))
  if missing:
    raise ConversionError(f"{source}: missing keys {missing[:5]}"
                          f"{' ...' if len(missing) > 5 else ''} ({len(missing)} in all)")
  unexpected = sorted(set(state) - set(expected))
  if unexpected:
    raise ConversionError(f"{source}: unexpected keys {unexpected[:5]} "
                          f"(a different architecture, or a config that does not fit?)")
  for key, shape in expected.items():
    got = tuple(np.shape(state[key]))
    if got != shape:
      raise ConversionError(f"{source}: {key} has shape {got}, expected {shape} "
                            f"for {config}")
  # A model with a NaN or infinite weight computes NaN logits; refuse it
  # here, naming the tensor, rather than at evaluation.
  bad = {}
  for key in expected:
    values = np.asarray(state[key], np.float32)
    count = values.size - int(np.count_nonzero(np.isfinite(values)))
    if count:
      bad[key] = count
  if bad:
    listed = ", ".join(f"{k} ({n:,} of {np.size(state[k]):,})"
                       for k, n in list(bad.items())[:5])
    raise ConversionError(f"{source}: non-finite values (NaN or infinity) in "
                          f"{len(bad)} tensors: {listed}"
                          f"{' ...' if len(bad) > 5 else ''}")
  params = {}
  for key, (path, fn, _) in _TOP_MAP.items():
    _set(params, path, np.asarray(fn(np.asarray(state[key], np.float32))))
  for suffix, (path, fn, _) in _LAYER_MAP.items():
    stacked = np.stack([fn(np.asarray(state[f"mamba2_net.layers.{i}.{suffix}"], np.float32))
                        for i in range(config.depth)])
    _set(params, ("blocks",) + path, stacked)
  return config, params


def params_to_state_dict(params: dict, config: model_lib.ModelConfig) -> dict:
  """The inverse of `state_dict_to_params` (for export and round-trip tests)."""
  def get(path):
    node = params
    for k in path:
      node = node[k]
    return np.asarray(node)

  state = {}
  for key, (path, _, fn) in _TOP_MAP.items():
    state[key] = fn(get(path))
  for suffix, (path, _, fn) in _LAYER_MAP.items():
    stacked = get(("blocks",) + path)
    for i in range(config.depth):
      state[f"mamba2_net.layers.{i}.{suffix}"] = fn(stacked[i])
  return state
