"""PNG plots of an evaluation report (matplotlib Agg, no pyplot state).

Both functions take the report dict of `eval_reports.results_to_json`:
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


def accuracy_vs_resolution(report: Mapping[str, Any], path: str) -> str:
  """Top-1 accuracy (%) against canvas side: one line per (scan, resize,
  glimpse count). Returns `path`."""
  lines: dict[tuple[str, str, int], dict[int, float]] = {}
  for r in report["results"]:
    for g, acc in r["top1"].items():
      lines.setdefault((r["scan"], r["resize"], int(g)), {})[r["canvas_size"]] = acc
  fig = _figure()
  ax = fig.add_subplot(1, 1, 1)
  for (scan, resize, g), points in sorted(lines.items()):
    sizes = sorted(points)
    ax.plot(sizes, [100.0 * points[s] for s in sizes], marker="o",
            label=f"{scan}, {resize}, T={g}")
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
