"""`python -m mambaeye_jax.data.bench ARGS` runs `benchmarks/bench_data.py ARGS`.

The data pipeline's benchmark lives with the other benchmarks in
`benchmarks/` (not installed: the command needs a source checkout); this
entry keeps the documented command.
"""

import os
import sys

from mambaeye_jax import bench_eval

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO_ROOT, "benchmarks", "bench_data.py")

if __name__ == "__main__":
  sys.exit(bench_eval.run_script(SCRIPT, REPO_ROOT, sys.argv[1:]))
