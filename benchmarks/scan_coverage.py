r"""How much of the image each evaluation scan pattern can ever look at.

For every built-in evaluation pattern and its `_official` twin (the official
`eval.py` bounds), at several canvas sides, prints the fraction of the image
box covered by the union of every patch the pattern can place: for grid
orders the whole grid, for `random` / `random_official` every corner of
their ranges (both axes drawn independently, so the product of the per-axis
ranges). Two images: a square one fitted to the canvas (CIFAR, resize
"fit") and a 4:3 photograph fitted to the canvas (ImageNet, resize "fit").

    python benchmarks/scan_coverage.py [--canvas-sizes 32,48,64,96,224,512]

Prints a markdown table (docs/evaluation.md holds its output).
"""

from __future__ import annotations


from absl import flags

from mambaeye_jax import cli
import numpy as np

from mambaeye_jax.data import geometry
from mambaeye_jax.data import scan_patterns

P = geometry.PATCH_SIZE
EVAL_PATTERNS = ("random", "random_fixed_grid", "column_major",
                 "horizontal_raster", "horizontal_zigzag", "column_snake",
                 "hilbert", "spiral", "diagonal", "golden")


def reachable_corners(name: str, side: int,
                      box: geometry.ImageBox) -> np.ndarray:
  """Every corner the pattern can place: (n, 2) int."""
  if name in ("random", "random_official"):
    # The patterns draw rows and columns independently; ask for enough
    # glimpses that every value of each axis shows up, then take the product.
    drawn = np.concatenate([
        scan_patterns.generate(name, np.random.default_rng(seed),
                               (side, side), box, 8 * side)
        for seed in range(4)])
    rows, cols = np.unique(drawn[:, 0]), np.unique(drawn[:, 1])
    return np.stack(np.meshgrid(rows, cols), -1).reshape(-1, 2)
  rows, cols = scan_patterns.grid_axes(
      (side, side), box, official=name.endswith("_official"))
  return scan_patterns.generate(name, np.random.default_rng(0), (side, side),
                                box, len(rows) * len(cols))


def coverage(positions: np.ndarray, box: geometry.ImageBox) -> float:
  """Fraction of the box's pixels under at least one patch."""
  seen = np.zeros((box.top + box.height + P, box.left + box.width + P), bool)
  for row, col in np.unique(positions, axis=0):
    seen[row:row + P, col:col + P] = True
  return float(seen[box.top:box.top + box.height,
                    box.left:box.left + box.width].mean())


def boxes(side: int) -> dict[str, geometry.ImageBox]:
  """The fitted image boxes on a side x side canvas."""
  short = int(side * 3 / 4)
  return {"square": geometry.ImageBox(0, 0, side, side),
          "4:3": geometry.ImageBox((side - short) // 2, 0, short, side)}


# Flags of this script only (mambaeye_jax.cli says why not absl's global FLAGS).
FLAGS = flags.FlagValues()
flags.DEFINE_string("canvas-sizes", "32,48,64,96,224,512", "canvas sides, comma-separated",
                    flag_values=FLAGS)


def main() -> None:
  args = cli.parse_args(FLAGS, None, prog="scan_coverage.py",
                        usage="python benchmarks/scan_coverage.py [--canvas-sizes 32,48,64,96,224,512]",
                        description=__doc__)
  sides = [int(s) for s in args.canvas_sizes.split(",")]
  header = " | ".join(f"{s} {kind}" for s in sides for kind in ("square", "4:3"))
  print(f"| pattern | {header} |")
  print("|---|" + "---|" * (2 * len(sides)))
  for base in EVAL_PATTERNS:
    for name in (base, base + "_official"):
      cells = []
      for side in sides:
        for box in boxes(side).values():
          cells.append(f"{100 * coverage(reachable_corners(name, side, box), box):.1f}")
      print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main()
