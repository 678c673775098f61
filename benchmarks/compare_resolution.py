r"""Top-1 against canvas side for several models: one table and one plot.

Each `NAME=PATH` is either an `eval.py` output folder (or its
`results.json`), read at one scan order and resize (`--scan`, `--resize`)
and at each of `--glimpses`, or a MambaOut work directory (or its
`results.json`, written by `python -m mambaeye_jax.mambaout_train`). The
table has a row per model (and glimpse count), a column per canvas; the
plot (`--plot`) draws the same rows as lines. docs/RESULTS.md section 4's
comparison was made with:

    python benchmarks/compare_resolution.py \
        "MambaEye-Tiny, canvas 32..128=docs/results/cifar10/grid_h100_canvas128.json" \
        "MambaEye-Tiny, canvas 32..64=docs/results/cifar10/grid_h100_light.json" \
        "MambaOut-Femto, 32x32=docs/results/cifar10/mambaout_h100.json" \
        --glimpses 128 --plot docs/results/cifar10/mambaeye_vs_mambaout.png
"""

from __future__ import annotations

import json

from absl import flags

from mambaeye_jax import cli
from mambaeye_jax import plots

USAGE = "NAME=PATH (an eval.py output folder, a MambaOut work directory, or their results.json)"


def load_series(spec: str, scan: str, resize: str,
                glimpses: list[int]) -> dict[str, dict[int, float]]:
  """'NAME=PATH' -> {row name: {canvas: top-1 in [0, 1]}}.

  An eval.py report gives one row per glimpse count ("NAME, T=128"), or a
  row named NAME when one count is asked for; MambaOut's results one row.

  Raises:
    SystemExit: naming the file, when it is neither kind of report or lacks
      the asked scan, resize or glimpse count.
  """
  name, path = cli.named_path(spec, "results.json", USAGE)
  with open(path) as f:
    report = json.load(f)
  if "eval" in report and "train_image_size" in report:  # MambaOut's results.json
    return {name: {int(c): r["top1"] for c, r in report["eval"].items()}}
  if "results" not in report:
    raise SystemExit(f"{name}: {path} is neither an eval.py report ('results') nor "
                     "MambaOut's results.json ('eval')")
  settings = [r for r in report["results"] if (r["scan"], r["resize"]) == (scan, resize)]
  if not settings:
    have = sorted({f"{r['scan']}/{r['resize']}" for r in report["results"]})
    raise SystemExit(f"{name}: {path} has no {scan}/{resize} setting (it has {', '.join(have)})")
  rows = {}
  for g in glimpses:
    missing = [r["canvas_size"] for r in settings if str(g) not in r["top1"]]
    if missing:
      raise SystemExit(f"{name}: {path} was not scored at {g} glimpses (canvas {missing[0]} "
                       f"has {', '.join(sorted(settings[0]['top1'], key=int))})")
    row = name if len(glimpses) == 1 else f"{name}, T={g}"
    rows[row] = {r["canvas_size"]: r["top1"][str(g)] for r in settings}
  return rows


def markdown(series: dict[str, dict[int, float]]) -> str:
  """Top-1 % table: a row per series, a column per canvas ('-' where absent)."""
  canvases = sorted({c for points in series.values() for c in points})
  lines = ["| model | " + " | ".join(f"canvas {c}" for c in canvases) + " |",
           "|---|" + "---|" * len(canvases)]
  for name, points in series.items():
    cells = ["-" if c not in points else f"{100 * points[c]:.2f}" for c in canvases]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


# Flags of this script only (mambaeye_jax.cli says why not absl's global FLAGS).
FLAGS = flags.FlagValues()
flags.DEFINE_string("scan", "random", "eval.py reports: the scan order read", flag_values=FLAGS)
flags.DEFINE_string("resize", "fit", "eval.py reports: the resize mode read", flag_values=FLAGS)
flags.DEFINE_list("glimpses", ["128"], "eval.py reports: the glimpse counts read, a row each",
                  flag_values=FLAGS)
flags.DEFINE_string("plot", None, "PNG of accuracy against canvas", flag_values=FLAGS)
flags.DEFINE_string("title", "Accuracy versus canvas", "the plot's title", flag_values=FLAGS)


def main(argv=None) -> None:
  args = cli.parse_args(
      FLAGS, argv, prog="compare_resolution.py", positional="runs", positional_meta="NAME=PATH",
      usage="python benchmarks/compare_resolution.py NAME=PATH [NAME=PATH ...] "
      "[--scan S] [--resize R] [--glimpses G,...] [--plot PNG] [--title TEXT]",
      description=__doc__ + f"\n{USAGE}.")
  try:
    glimpses = [int(g) for g in args.glimpses]
  except ValueError:
    raise SystemExit(f"--glimpses takes whole numbers, got {','.join(args.glimpses)}") from None
  series = {}
  for spec in args.runs:
    series.update(load_series(spec, args.scan, args.resize, glimpses))
  print(markdown(series))
  if args.plot:
    print(f"plot: {plots.models_vs_canvas(series, args.plot, args.title)}")


if __name__ == "__main__":
  main()
