"""Converts an official PyTorch MambaEye checkpoint into a model directory.

    python -m mambaeye_jax.convert SRC.pt DST_DIR [--ngroups G]

reads an official state_dict (`.pt`, `.pth` or `.safetensors`, torch not
required; `torch_io`), infers the model's sizes from the shapes, checks
every key and shape (`official`), and writes DST_DIR in the model-directory
format (`model_dir`: config.json + parameters), which eval.py and
`mambaeye_jax.load_model` read. Flags parse as absl's (--ngroups=2 or
--ngroups 2, before or after the paths); a bad command line is one
`error: ...` line, exit status 2.
"""

from __future__ import annotations

import os
import sys
import types

from absl import flags

from mambaeye_jax import cli
from mambaeye_jax import model_dir
from mambaeye_jax import official
from mambaeye_jax import torch_io


_PROG = "python -m mambaeye_jax.convert"
_USAGE = f"{_PROG} SRC.pt DST_DIR [--ngroups G]"
_DESCRIPTION = """Convert an official PyTorch MambaEye checkpoint for mambaeye-jax.

  SRC.pt   official state_dict (.pt, .pth, .bin or .safetensors)
  DST_DIR  output directory (created; must not exist)"""

# Flags of this command only (mambaeye_jax.cli says why not absl's global
# FLAGS); the two paths are absl's leftover positional arguments.
FLAGS = flags.FlagValues()
flags.DEFINE_integer("ngroups", 1, "B/C groups of the checkpoint's Mamba2 (1 for "
                     "the published models)", lower_bound=1, flag_values=FLAGS)


def main(argv=None):
  """The command line (argv without the program name); the exit status."""
  positional = cli.parse_command(FLAGS, argv, prog=_PROG, usage=_USAGE,
                                 description=_DESCRIPTION, positional=("SRC.pt", "DST_DIR"))
  if isinstance(positional, int):  # --help, or a bad command line: printed.
    return positional
  args = types.SimpleNamespace(src=positional[0], dst=positional[1],
                               ngroups=FLAGS.ngroups)
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
