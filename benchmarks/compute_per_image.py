"""Forward compute per image of MambaEye and of the MambaOut baseline.

    python benchmarks/compute_per_image.py
    python benchmarks/compute_per_image.py --glimpses 16,64,256 --canvases 32,224

MambaEye reads T glimpses of 16x16 whatever the canvas, so its cost follows
T and not the resolution; MambaOut convolves the whole C x C input, so its
cost grows as C^2. Both counts are multiply-accumulates of every dot and
convolution of the traced forward of one image (`mambaeye_jax.macs`):
MambaEye's parallel forward with the XLA chunked SSD (the SSD of a sequence
shorter than one chunk runs on the padded chunk, as the model runs it),
MambaOut's at C x C. It prints one table of GMACs per image and the glimpse count at
which MambaEye costs what MambaOut costs at each canvas. No device needed:
the functions are traced, not run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import flags
from flax import nnx

from mambaeye_jax import cli
from mambaeye_jax import macs
from mambaeye_jax import mambaout
from mambaeye_jax import model as mambaeye_model

FLAGS = flags.FlagValues()
cli.define_int_list("glimpses", (16, 32, 64, 128, 256, 512, 1024),
                    "MambaEye glimpse counts", FLAGS)
cli.define_int_list("canvases", (32, 48, 64, 96, 128, 192, 256),
                    "MambaOut input sides (resized C x C)", FLAGS)
flags.DEFINE_string("mambaeye", "tiny", "MambaEye size (tiny, small, base)", flag_values=FLAGS)
flags.DEFINE_integer("chunk_size", 128, "MambaEye SSD chunk (configs/cifar10.py: 128)",
                     flag_values=FLAGS)
flags.DEFINE_string("mambaout", "femto", "MambaOut size", flag_values=FLAGS)
flags.DEFINE_integer("num_classes", 10, "classifier outputs of both", flag_values=FLAGS)


def mambaeye_macs(variant: str, num_classes: int, chunk_size: int, glimpses: int) -> int:
  """MACs of MambaEye's forward over one sequence of `glimpses` steps."""
  config = mambaeye_model.get_config(variant, num_classes=num_classes,
                                     chunk_size=chunk_size, ssd_impl="chunked")
  graphdef, state = nnx.split(nnx.eval_shape(
      lambda: mambaeye_model.MambaEye(config, rngs=nnx.Rngs(0))))
  return macs.traced_macs(
      lambda s, patches, positions: nnx.merge(graphdef, s)(patches, positions), state,
      jax.ShapeDtypeStruct((1, glimpses, 768), jnp.uint8),
      jax.ShapeDtypeStruct((1, glimpses, 2), jnp.int32))


def mambaout_macs(variant: str, num_classes: int, side: int) -> int:
  """MACs of MambaOut's forward over one side x side image."""
  config = mambaout.get_config(variant, num_classes=num_classes)
  graphdef, state = nnx.split(nnx.eval_shape(
      lambda: mambaout.MambaOut(config, rngs=nnx.Rngs(0))))
  return macs.traced_macs(lambda s, x: nnx.merge(graphdef, s)(x), state,
                          jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32))


def main(argv=None):
  args = cli.parse_args(FLAGS, argv, prog="compute_per_image.py",
                        usage="python benchmarks/compute_per_image.py [--glimpses T,T] "
                              "[--canvases C,C]",
                        description=__doc__)
  eye = {t: mambaeye_macs(args.mambaeye, args.num_classes, args.chunk_size, t)
         for t in args.glimpses}
  out = {c: mambaout_macs(args.mambaout, args.num_classes, c) for c in args.canvases}
  per_glimpse = eye[max(eye)] / max(eye)
  print(f"forward GMACs per image, {args.num_classes} classes\n")
  print(f"| MambaEye-{args.mambaeye} glimpses | GMACs | "
        f"MambaOut-{args.mambaout} canvas | GMACs | MambaEye glimpses at equal compute |")
  print("|---|---|---|---|---|")
  for i in range(max(len(eye), len(out))):
    left = (f"{args.glimpses[i]} | {eye[args.glimpses[i]] / 1e9:.3f}"
            if i < len(eye) else " | ")
    if i < len(out):
      side = args.canvases[i]
      right = f"{side} | {out[side] / 1e9:.3f} | {out[side] / per_glimpse:.0f}"
    else:
      right = " | | "
    print(f"| {left} | {right} |")
  print(f"\nMambaEye: {per_glimpse / 1e6:.2f} M MACs a glimpse at {max(eye)} glimpses "
        f"(chunk {args.chunk_size}); the SSD of a shorter sequence runs on a whole chunk.")
  return eye, out


if __name__ == "__main__":
  main()
