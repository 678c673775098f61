"""Converts an official PyTorch MambaEye checkpoint into a model directory.

    python -m mambaeye_jax.convert SRC.pt DST_DIR [--ngroups G]

reads an official state_dict (`.pt`, `.pth` or `.safetensors`, torch not
required; `torch_io`), infers the model's sizes from the shapes, checks
every key and shape (`official`), and writes DST_DIR in the model-directory
format (`model_dir`: config.json + parameters), which eval.py and
`mambaeye_jax.load_model` read.
"""

from __future__ import annotations

import argparse
import os
import sys

from mambaeye_jax import model_dir
from mambaeye_jax import official
from mambaeye_jax import torch_io


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog="python -m mambaeye_jax.convert",
      description="Convert an official PyTorch MambaEye checkpoint for mambaeye-jax.")
  parser.add_argument("src", help="official state_dict (.pt, .pth, .bin or .safetensors)")
  parser.add_argument("dst", help="output directory (created; must not exist)")
  parser.add_argument("--ngroups", type=int, default=1,
                      help="B/C groups of the checkpoint's Mamba2 (1 for the published models)")
  args = parser.parse_args(argv)
  try:
    # Before reading gigabytes: save_params never overwrites.
    if os.path.exists(args.dst):
      raise FileExistsError(f"{args.dst} already exists; choose a new directory")
    state = torch_io.load_state_dict(args.src)
    config = official.infer_config(state, args.src, ngroups=args.ngroups)
    config, params = official.state_dict_to_params(state, config, args.src)
    model_dir.save_params(args.dst, config, params)
  except (ValueError, OSError) as e:  # Format, conversion and file errors.
    print(f"error: {e}", file=sys.stderr)
    return 2
  n = sum(v.size for v in state.values())
  print(f"converted {args.src}: depth {config.depth}, dim {config.dim}, "
        f"{config.num_classes} classes, {n:,} parameters -> {args.dst}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
