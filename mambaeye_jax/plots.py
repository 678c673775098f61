"""PNG plots of an evaluation report (matplotlib Agg, no pyplot state).

Every function takes the report dict of `eval_reports.results_to_json`:
{"results": [{"canvas_size", "resize", "scan", "num_glimpses", "top1":
{glimpses: accuracy}, "top1_curve": [T accuracies], ...}]}. matplotlib is
imported inside them, so importing this module costs nothing, and it is
optional (the "plots" extra): `available()` says whether it is installed.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any, Mapping

import numpy as np


@functools.lru_cache(maxsize=None)
def available() -> bool:
  """Whether matplotlib is installed."""
  return importlib.util.find_spec("matplotlib") is not None


def _figure(width: float = 7.0, height: float = 4.5):
  # Figure + FigureCanvasAgg: no global backend switch, safe in any process.
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(width, height))
  FigureCanvasAgg(fig)
  return fig


LINE_STYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P")


def resolution_line_styles(lines) -> dict[tuple[str, str, int], dict[str, Any]]:
  """matplotlib plot() styles per (scan, resize, glimpses) line.

  The colour says the glimpse count (viridis, fewest dark); the line style
  and marker the scan and resize. One colour cycle over a grid's 20-odd
  lines would give different settings the same colour.
  """
  from matplotlib import colormaps  # pylint: disable=g-import-not-at-top
  counts = sorted({g for _, _, g in lines})
  orders = sorted({(scan, resize) for scan, resize, _ in lines})
  cmap = colormaps["viridis"]
  styles = {}
  for scan, resize, g in lines:
    i = orders.index((scan, resize))
    shade = counts.index(g) / max(len(counts) - 1, 1)
    styles[(scan, resize, g)] = {"color": cmap(0.9 * shade),
                                 "linestyle": LINE_STYLES[i % len(LINE_STYLES)],
                                 "marker": MARKERS[i % len(MARKERS)]}
  return styles


def accuracy_vs_resolution(report: Mapping[str, Any], path: str) -> str:
  """Top-1 accuracy (%) against canvas side: one line per (scan, resize,
  glimpse count), coloured by glimpse count. Returns `path`."""
  lines: dict[tuple[str, str, int], dict[int, float]] = {}
  for r in report["results"]:
    for g, acc in r["top1"].items():
      lines.setdefault((r["scan"], r["resize"], int(g)), {})[r["canvas_size"]] = acc
  fig = _figure()
  ax = fig.add_subplot(1, 1, 1)
  styles = resolution_line_styles(lines)
  for (scan, resize, g), points in sorted(lines.items()):
    sizes = sorted(points)
    ax.plot(sizes, [100.0 * points[s] for s in sizes], markersize=4,
            label=f"{scan}, {resize}, T={g}", **styles[(scan, resize, g)])
  ax.set_xlabel("canvas side (pixels)")
  ax.set_ylabel("top-1 accuracy (%)")
  ax.set_title("Accuracy versus resolution")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  return path


def accuracy_vs_glimpses(report: Mapping[str, Any], path: str) -> str:
  """Top-1 accuracy (%) after each glimpse (log x axis), one curve per
  (canvas, resize, scan), dots at the reported glimpse counts. Returns
  `path`."""
  fig = _figure()
  ax = fig.add_subplot(1, 1, 1)
  for r in report["results"]:
    curve = 100.0 * np.asarray(r["top1_curve"], np.float64)
    # Log-spaced steps: on a log axis thousands of late steps would pile up
    # into a solid band; the full curve is in the JSON.
    steps = np.unique(np.geomspace(1, len(curve), num=min(len(curve), 200)).astype(int))
    (line,) = ax.plot(steps, curve[steps - 1], linewidth=1.2,
                      label=f"canvas {r['canvas_size']}, {r['resize']}, {r['scan']}")
    counts = sorted(int(g) for g in r["top1"])
    ax.scatter(counts, [curve[g - 1] for g in counts], s=12, color=line.get_color())
  ax.set_xscale("log")
  ax.set_xlabel("glimpses")
  ax.set_ylabel("top-1 accuracy (%)")
  ax.set_title("Accuracy versus glimpses")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  return path


def compare_runs_vs_glimpses(reports: Mapping[str, Mapping[str, Any]], path: str,
                             title: str = "Accuracy versus glimpses") -> str:
  """Top-1 accuracy (%) after each glimpse for several runs side by side.

  One panel per (canvas, resize, scan) setting present in the first report,
  one curve per run in each panel; the log x axis runs to T.

  Args:
    reports: run name -> report dict (`eval_reports.results_to_json`).
    path: the PNG to write.
    title: the figure's title.

  Returns:
    `path`.
  """
  settings = [(r["canvas_size"], r["resize"], r["scan"])
              for r in next(iter(reports.values()))["results"]]
  fig = _figure(width=4.2 * len(settings) + 0.6, height=4.2)
  for i, setting in enumerate(settings):
    ax = fig.add_subplot(1, len(settings), i + 1)
    for name, report in reports.items():
      for r in report["results"]:
        if (r["canvas_size"], r["resize"], r["scan"]) != setting:
          continue
        curve = 100.0 * np.asarray(r["top1_curve"], np.float64)
        ax.plot(np.arange(1, len(curve) + 1), curve, linewidth=1.2, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("glimpses")
    if i == 0:
      ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"canvas {setting[0]}, {setting[1]}, {setting[2]}", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  return path
