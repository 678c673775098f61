"""PNG plots of evaluation reports (matplotlib Agg, no pyplot state).

The report functions take the dict of `eval_reports.results_to_json`:
{"results": [{"canvas_size", "resize", "scan", "num_glimpses", "top1":
{glimpses: accuracy}, "top1_curve": [T accuracies], ...}]};
`models_vs_canvas` takes plain {canvas: accuracy} series. matplotlib is
imported inside them, so importing this module costs nothing, and it is
optional (the "plots" extra): `available()` says whether it is installed.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
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


MARKERS = ("o", "s", "^", "D", "v", "P")
LEGEND_WIDTH = 1.5  # inches right of the panels for the figure's one legend


def sequential_colours(values, cmap: str = "viridis") -> dict[Any, Any]:
  """{value: colour} along a sequential colour map, the smallest darkest.

  Glimpse counts or canvas sides read as an order: a sequential map shows
  it, where a cycle of unrelated colours would not.
  """
  from matplotlib import colormaps  # pylint: disable=g-import-not-at-top
  ordered = sorted(set(values))
  colours = colormaps[cmap]
  return {v: colours(0.9 * i / max(len(ordered) - 1, 1)) for i, v in enumerate(ordered)}


def scan_settings(report: Mapping[str, Any]) -> list[tuple[str, str]]:
  """The report's (scan, resize) pairs in the order it ran them."""
  return list(dict.fromkeys((r["scan"], r["resize"]) for r in report["results"]))


def _panels(count: int, panel_width: float = 3.4, panel_height: float = 3.2):
  """(figure, axes): `count` panels, at most four a row, sharing the y axis,
  with room on the right for one legend."""
  cols = min(count, 4)
  rows = -(-count // cols)
  fig = _figure(width=panel_width * cols + LEGEND_WIDTH, height=panel_height * rows + 0.5)
  axes = []
  for i in range(count):
    axes.append(fig.add_subplot(rows, cols, i + 1, sharey=axes[0] if axes else None))
  return fig, axes


def _finish(fig, axes, legend_title: str, title: str, path: str) -> str:
  """One legend for all panels (the first panel's lines), the title, the PNG."""
  handles, labels = axes[0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="center right", title=legend_title, fontsize=8,
             title_fontsize=8)
  fig.suptitle(title)
  width = fig.get_figwidth()
  fig.tight_layout(rect=(0.0, 0.0, 1.0 - LEGEND_WIDTH / width, 1.0))
  fig.savefig(path, dpi=100)
  return path


def accuracy_vs_resolution(report: Mapping[str, Any], path: str) -> str:
  """Top-1 accuracy (%) against canvas side, one panel per (scan, resize).

  In each panel one line per glimpse count, coloured by it (viridis, the
  fewest darkest); the x axis is logarithmic with a tick at every canvas.
  Returns `path`.
  """
  points: dict[tuple[str, str, int], dict[int, float]] = {}
  for r in report["results"]:
    for g, acc in r["top1"].items():
      points.setdefault((r["scan"], r["resize"], int(g)), {})[r["canvas_size"]] = acc
  colours = sequential_colours(g for _, _, g in points)
  canvases = sorted({r["canvas_size"] for r in report["results"]})
  settings = scan_settings(report)
  fig, axes = _panels(len(settings))
  for ax, (scan, resize) in zip(axes, settings):
    for g in sorted(colours):
      line = points.get((scan, resize, g))
      if line:
        sizes = sorted(line)
        ax.plot(sizes, [100.0 * line[s] for s in sizes], marker="o", markersize=3,
                color=colours[g], label=str(g))
    ax.set_xscale("log", base=2)
    ax.set_xticks(canvases, [str(c) for c in canvases], fontsize=7)
    ax.minorticks_off()
    ax.set_xlabel("canvas side (pixels)")
    ax.set_title(f"{scan}, {resize}", fontsize=9)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("top-1 accuracy (%)")
  return _finish(fig, axes, "glimpses", "Accuracy versus resolution", path)


def accuracy_vs_glimpses(report: Mapping[str, Any], path: str) -> str:
  """Top-1 accuracy (%) after each glimpse (log x axis), one panel per
  (scan, resize), one curve per canvas coloured by its side (plasma, the
  smallest darkest), dots at the reported glimpse counts. Returns `path`."""
  colours = sequential_colours((r["canvas_size"] for r in report["results"]), "plasma")
  settings = scan_settings(report)
  fig, axes = _panels(len(settings))
  for ax, setting in zip(axes, settings):
    for r in sorted(report["results"], key=lambda r: r["canvas_size"]):
      if (r["scan"], r["resize"]) != setting:
        continue
      curve = 100.0 * np.asarray(r["top1_curve"], np.float64)
      # Log-spaced steps: on a log axis thousands of late steps would pile up
      # into a solid band; the full curve is in the JSON.
      steps = np.unique(np.geomspace(1, len(curve), num=min(len(curve), 200)).astype(int))
      colour = colours[r["canvas_size"]]
      ax.plot(steps, curve[steps - 1], linewidth=1.2, color=colour,
              label=f"canvas {r['canvas_size']}")
      counts = sorted(int(g) for g in r["top1"])
      ax.scatter(counts, [curve[g - 1] for g in counts], s=10, color=colour)
    ax.set_xscale("log")
    ax.set_xlabel("glimpses")
    ax.set_title(f"{setting[0]}, {setting[1]}", fontsize=9)
    ax.grid(alpha=0.3, which="both")
  axes[0].set_ylabel("top-1 accuracy (%)")
  return _finish(fig, axes, "canvas", "Accuracy versus glimpses", path)


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


def models_vs_canvas(series: Mapping[str, Mapping[int, float]], path: str,
                     title: str = "Accuracy versus canvas") -> str:
  """Top-1 accuracy (%) against canvas side for several models on one axis.

  Args:
    series: model name -> {canvas side: top-1 accuracy in [0, 1]}.
    path: the PNG to write.
    title: the figure's title.

  Returns:
    `path`.
  """
  canvases = sorted({c for points in series.values() for c in points})
  fig = _figure(width=6.5, height=4.2)
  ax = fig.add_subplot(1, 1, 1)
  for (name, points), marker in zip(series.items(), itertools.cycle(MARKERS)):
    sizes = sorted(points)
    ax.plot(sizes, [100.0 * points[s] for s in sizes], marker=marker, markersize=4,
            linewidth=1.4, label=name)
  ax.set_xscale("log", base=2)
  ax.set_xticks(canvases, [str(c) for c in canvases])
  ax.minorticks_off()
  ax.set_xlabel("canvas side (pixels)")
  ax.set_ylabel("top-1 accuracy (%)")
  ax.set_title(title, fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  return path
