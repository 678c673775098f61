"""The evaluator's reports: results.json, results.md and the PNG plots.

`results_to_json` turns `eval_lib.evaluate`'s `SettingResult`s (and its
`EvalConfig`; duck-typed, so this module sits below the runner) into the
report dict, `markdown_report` renders its accuracy tables, `write_reports`
writes both and the plots (`plots`; skipped without matplotlib).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Mapping, Sequence

from mambaeye_jax import files
from mambaeye_jax import plots as plots_lib


def results_to_json(results: Sequence[Any], config: Any,
                    meta: Mapping[str, Any]) -> dict[str, Any]:
  """A JSON-ready report.

  Layout: {"meta": {...}, "config": {...}, "results": [{"canvas_size",
  "resize", "scan", "num_glimpses", "resampler", "num_examples", "num_skipped",
  "top1": {g: acc}, "top5": {g: acc}, "top1_curve": [T floats],
  "top5_curve": [...], "seconds", "images_per_second"}]}; accuracies are
  fractions in [0, 1], keys of "top1"/"top5" the glimpse counts as strings.
  """
  counts = sorted(set(config.glimpse_counts))
  out = []
  for r in results:
    out.append({
        **dataclasses.asdict(r.setting),
        "num_examples": r.num_examples,
        "num_skipped": r.num_skipped,
        "top1": {str(g): round(r.top1_at(g), 6) for g in counts},
        "top5": {str(g): round(r.top5_at(g), 6) for g in counts},
        "top1_curve": [round(float(x), 6) for x in r.top1_curve],
        "top5_curve": [round(float(x), 6) for x in r.top5_curve],
        "seconds": round(r.seconds, 3),
        "images_per_second": round(r.images_per_second, 2),
    })
  cfg = dataclasses.asdict(config)
  return {"meta": dict(meta), "config": cfg, "results": out}


def markdown_report(report: Mapping[str, Any]) -> str:
  """Markdown tables from `results_to_json`'s report: top-1 / top-5 (%) per
  (scan, resize, glimpses) row and canvas-size column, as the paper's."""
  meta, results = report["meta"], report["results"]
  sizes = sorted({r["canvas_size"] for r in results})
  lines = ["# MambaEye evaluation", ""]
  for key, value in meta.items():
    lines.append(f"- {key}: {value}")
  lines.append("")
  for metric in ("top1", "top5"):
    lines += [f"## {'Top-1' if metric == 'top1' else 'Top-5'} accuracy (%)", "",
              "| scan | resize | glimpses | " + " | ".join(map(str, sizes)) + " |",
              "|---|---|---|" + "---|" * len(sizes)]
    rows = {}
    for r in results:
      for g, acc in r[metric].items():
        rows.setdefault((r["scan"], r["resize"], int(g)), {})[r["canvas_size"]] = acc
    for (scan, resize, g), by_size in rows.items():
      cells = [f"{100 * by_size[s]:.2f}" if s in by_size else "" for s in sizes]
      lines.append(f"| {scan} | {resize} | {g} | " + " | ".join(cells) + " |")
    lines.append("")
  # "wall s" is the whole setting, its compilation and first batch
  # included; "images/s" is measured after the first batch, so excludes it.
  lines += ["## Runs", "", "| scan | resize | canvas | images | skipped | "
            "wall s (incl. compile) | images/s (excl. compile) |",
            "|---|---|---|---|---|---|---|"]
  for r in results:
    lines.append(f"| {r['scan']} | {r['resize']} | {r['canvas_size']} | "
                 f"{r['num_examples']} | {r['num_skipped']} | {r['seconds']:.1f} | "
                 f"{r['images_per_second']:.1f} |")
  return "\n".join(lines) + "\n"


def write_reports(results: Sequence[Any], config: Any,
                  meta: Mapping[str, Any], output_dir: str,
                  plots: bool = True) -> dict[str, str]:
  """Writes results.json, results.md and the PNG plots into output_dir.

  `meta["settings_done"]`, where present, marks a partial report.

  Returns:
    {"json": path, "markdown": path, "resolution_plot": path,
    "glimpses_plot": path} (plots left out when `plots` is False or
    matplotlib, the "plots" extra, is not installed).
  """
  os.makedirs(output_dir, exist_ok=True)
  report = results_to_json(results, config, meta)
  paths = {"json": os.path.join(output_dir, "results.json"),
           "markdown": os.path.join(output_dir, "results.md")}
  # eval.py rewrites the reports after every setting: a run stopped
  # mid-write keeps the previous complete report.
  files.write_atomically(paths["json"], json.dumps(report, indent=1))
  files.write_atomically(paths["markdown"], markdown_report(report))
  if plots and not plots_lib.available():
    logging.warning("no PNG plots: matplotlib is not installed "
                    "(pip install 'mambaeye-jax[plots]')")
  elif plots:
    paths["resolution_plot"] = plots_lib.accuracy_vs_resolution(
        report, os.path.join(output_dir, "accuracy_vs_resolution.png"))
    paths["glimpses_plot"] = plots_lib.accuracy_vs_glimpses(
        report, os.path.join(output_dir, "accuracy_vs_glimpses.png"))
  return paths
