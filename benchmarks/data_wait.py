r"""Training runs' data wait, step time and throughput side by side.

    python benchmarks/data_wait.py patches=/tmp/dw_patches canvas=/tmp/dw_canvas --from_step 500

Each `NAME=WORKDIR` is a train.py work directory (or its metrics.jsonl). Over
the log windows after --from_step (the first windows hold compilation and
the decoded-image cache), prints one row per run: the mean share of wall
time spent waiting for batches (`perf/data_wait_fraction`), the mean step
time and images/s, the prefetching thread's milliseconds per batch in
Grain's iterator ("read ms") and in placing the batch on the devices ("put
ms"), the share of batches the loop asked for before one was ready ("not
ready": the pipeline behind; a wait for a ready batch is the loop's thread
waiting for its turn), where the log has them, and the number of windows.
Issue 12 asks for a data wait of at most 10% of the step.
"""

from __future__ import annotations

import json
import statistics

from absl import flags

from mambaeye_jax import cli

KEYS = ("perf/data_wait_fraction", "perf/step_time_ms", "perf/images_per_sec")
# Logged since the prefetcher timed its thread; "-" for older runs.
THREAD_KEYS = ("perf/batch_read_ms", "perf/batch_put_ms", "perf/batch_not_ready_fraction")


def load_windows(spec: str, from_step: int) -> tuple[str, list[dict]]:
  """'NAME=PATH' -> (NAME, the metrics rows past from_step that carry every KEY)."""
  name, path = cli.named_path(spec, "metrics.jsonl",
                              "NAME=WORKDIR (a train.py work directory)")
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  rows = [r for r in rows if r.get("step", 0) > from_step and all(k in r for k in KEYS)]
  if not rows:
    raise SystemExit(f"{name}: {path} has no log window with {', '.join(KEYS)} "
                     f"after step {from_step}")
  return name, rows


def table(runs: dict[str, list[dict]]) -> str:
  """Markdown: a row per run, means over its windows."""
  lines = ["| run | data wait | step ms | images/s | read ms | put ms | not ready | windows |",
           "|---|---|---|---|---|---|---|---|"]
  for name, rows in runs.items():
    wait, step_ms, rate = (statistics.fmean(r[k] for r in rows) for k in KEYS)
    thread = []
    for k in THREAD_KEYS:
      if not all(k in r for r in rows):
        thread.append("-")
        continue
      mean = statistics.fmean(r[k] for r in rows)
      thread.append(f"{100 * mean:.1f}%" if k.endswith("fraction") else f"{mean:.1f}")
    lines.append(f"| {name} | {100 * wait:.1f}% | {step_ms:.1f} | {rate:.0f} | "
                 f"{' | '.join(thread)} | {len(rows)} |")
  return "\n".join(lines)


# Flags of this script only (mambaeye_jax.cli says why not absl's global FLAGS).
FLAGS = flags.FlagValues()
flags.DEFINE_integer("from_step", 500, "use the log windows after this step", flag_values=FLAGS)


def main(argv=None) -> str:
  args = cli.parse_args(FLAGS, argv, prog="data_wait.py", positional="runs",
                        positional_meta="NAME=WORKDIR",
                        usage="python benchmarks/data_wait.py NAME=WORKDIR... [--from_step N]",
                        description=__doc__)
  out = table(dict(load_windows(spec, args.from_step) for spec in args.runs))
  print(out)
  return out


if __name__ == "__main__":
  main()
