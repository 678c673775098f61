r"""Several runs' `eval.py` reports side by side: one table and one plot.

Each `NAME=PATH` is an `eval.py` output folder (or its `results.json`). The
table gives top-1 % per glimpse count (rows) and run x canvas (columns) for
the settings of the first report; the plot (`--plot`) draws each run's
accuracy after every glimpse, one panel per canvas. docs/RESULTS.md's loss
ablation was made with:

    python benchmarks/compare_runs.py \
        step-wise=docs/results/cifar10/loss_stepwise.json \
        ce-last=docs/results/cifar10/loss_ce_last_step.json \
        ce-every=docs/results/cifar10/loss_ce_every_step.json \
        --plot docs/results/cifar10/loss_ablation.png \
        --title "Loss ablation: CIFAR-10, MambaEye-Tiny, 1,953 steps, seed 0"
"""

from __future__ import annotations

import json

from absl import flags

from mambaeye_jax import cli
from mambaeye_jax import plots


def load_report(spec: str) -> tuple[str, dict]:
  """'NAME=PATH' -> (NAME, the report dict); PATH a folder or a JSON file."""
  name, path = cli.named_path(spec, "results.json",
                              "NAME=PATH (an eval.py output folder or results.json)")
  with open(path) as f:
    report = json.load(f)
  if "results" not in report:
    raise SystemExit(f"{name}: {path} is not an eval.py report (no 'results')")
  return name, report


def markdown(reports: dict[str, dict]) -> str:
  """Top-1 % table: rows glimpse counts, columns run x setting."""
  first = next(iter(reports.values()))["results"]
  keys = [(r["canvas_size"], r["resize"], r["scan"]) for r in first]
  glimpses = sorted({int(g) for r in first for g in r["top1"]})
  by_run = {name: {(r["canvas_size"], r["resize"], r["scan"]): r for r in report["results"]}
            for name, report in reports.items()}
  columns = [(name, key) for key in keys for name in reports]
  head = " | ".join(f"{name} @{key[0]}" for name, key in columns)
  lines = [f"| glimpses | {head} |", "|---|" + "---|" * len(columns)]
  for g in glimpses:
    cells = []
    for name, key in columns:
      r = by_run[name].get(key)
      acc = None if r is None else r["top1"].get(str(g))
      cells.append("-" if acc is None else f"{100 * acc:.2f}")
    lines.append(f"| {g} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


# Flags of this script only (mambaeye_jax.cli says why not absl's global FLAGS);
# the NAME=PATH runs are absl's leftover positional arguments.
FLAGS = flags.FlagValues()
flags.DEFINE_string("plot", None, "PNG of accuracy after every glimpse", flag_values=FLAGS)
flags.DEFINE_string("title", "Accuracy versus glimpses", "the plot's title",
                    flag_values=FLAGS)


def main(argv=None) -> None:
  args = cli.parse_args(
      FLAGS, argv, prog="compare_runs.py", positional="runs", positional_meta="NAME=PATH",
      usage="python benchmarks/compare_runs.py NAME=PATH [NAME=PATH ...] "
      "[--plot PNG] [--title TEXT]",
      description=__doc__ + "\nNAME=PATH: an eval.py output folder or results.json.")
  reports = dict(load_report(spec) for spec in args.runs)
  print(markdown(reports))
  if args.plot:
    print(f"plot: {plots.compare_runs_vs_glimpses(reports, args.plot, args.title)}")


if __name__ == "__main__":
  main()
