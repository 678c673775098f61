"""MambaEye in JAX/Flax: image classification from causal glimpse sequences.

The public entry points, importable from here:

    import mambaeye_jax
    g = mambaeye_jax.glimpses_from_image("photo.jpg", canvas_size=512,
                                         num_glimpses=1024)
    model = mambaeye_jax.load_model("mambaeye_tiny.pt")
    logits = model(g.patches[None], g.positions[None])   # (1, T, K)

* `glimpses_from_image` (`data/glimpses.py`): image -> patches (T, 768) uint8 and
  positions (T, 2) int32, as eval.py prepares them.
* `load_model` (`checkpoint.py`): an official .pt / .safetensors, a
  converted model directory or a training work directory.
* `MambaEye`, `ModelConfig`, `get_config` (`model.py`): the network;
  `model.jit_step()` and `model.stream(...)` stream glimpses in constant
  memory.

They are loaded on first use, so `import mambaeye_jax` stays instant and
imports neither JAX nor orbax.
"""

import importlib

# Public name -> the module that defines it.
_EXPORTS = {
    "Glimpses": "mambaeye_jax.data.glimpses",
    "glimpses_from_image": "mambaeye_jax.data.glimpses",
    "MambaEye": "mambaeye_jax.model",
    "ModelConfig": "mambaeye_jax.model",
    "get_config": "mambaeye_jax.model",
    "load_model": "mambaeye_jax.checkpoint",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  # PEP 562: resolve an export on first access (then cached in globals()).
  if name in _EXPORTS:
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
  raise AttributeError(f"module 'mambaeye_jax' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(_EXPORTS))
