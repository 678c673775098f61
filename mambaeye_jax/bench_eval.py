"""`python -m mambaeye_jax.bench_eval ARGS` runs `benchmarks/bench_eval.py ARGS`.

The evaluator's benchmark lives with the other benchmarks in `benchmarks/`
(which is not installed: the command needs a source checkout); this entry
keeps the documented command.
"""

import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, "benchmarks", "bench_eval.py")


def run_script(script: str, repo_root: str, argv: list[str]) -> int:
  """Replaces this process by `python script argv...`, with the checkout
  importable (as `python -m` from the checkout had it)."""
  if not os.path.isfile(script):
    print(f"error: {script} not found; the benchmarks need a source checkout",
          file=sys.stderr)
    return 2
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, env.get("PYTHONPATH")) if p)
  os.execve(sys.executable, [sys.executable, script, *argv], env)
  return 0  # Not reached.


if __name__ == "__main__":
  sys.exit(run_script(SCRIPT, REPO_ROOT, sys.argv[1:]))
