r"""Whether two checkouts compile MambaEye to the same XLA programs.

    python tools/compare_compiled.py OLD_CHECKOUT NEW_CHECKOUT

For a change that moves code without meaning to change it (issue 13's
layout): each checkout, in its own subprocess, builds MambaEye-Tiny (bf16,
the chunked scan, so it compiles on a CPU), compiles the training step of
its `benchmarks/bench_model.py` (batch 2, T = 256) and the inference
forward (batch 2, T = 256), and writes their HLO instructions with the
source-location metadata stripped (file and function names move with the
code). Prints the instruction counts, the first differing lines if any,
and the training loss and logits sum of each checkout; exit status 0 when
both programs are the same instruction for instruction.
"""

import json
import os
import subprocess
import sys
import tempfile

_CHILD = r"""
import json, re, sys
import numpy as np
tree, out = sys.argv[1], sys.argv[2]
sys.path[:0] = [tree, tree + "/benchmarks"]
import jax
from flax import nnx
import bench_model
from mambaeye_jax import model as model_lib

def instructions(compiled):
  return [re.sub(r",? ?stack_frame_id=[0-9]+", "", re.sub(r", metadata=\{[^}]*\}", "", line))
          for line in compiled.as_text().splitlines() if " = " in line]

call, lower = bench_model.make_train_call("tiny", "bfloat16", "chunked", remat=False,
                                          padded=False, batch=2, length=256, num_devices=1,
                                          scan_layers=False)
train = instructions(lower().compile())
loss = float(call())
infer_call, infer_lower = bench_model.make_infer_call("tiny", "bfloat16", "chunked", batch=2,
                                                      length=256, scan_layers=False)
infer = instructions(infer_lower().compile())
logits = float(np.asarray(infer_call(), np.float32).sum())
json.dump({"train": train, "infer": infer, "loss": loss, "logits_sum": logits}, open(out, "w"))
"""


def compile_in(tree: str) -> dict:
  """The stripped HLO instructions and outputs of one checkout."""
  with tempfile.NamedTemporaryFile(suffix=".json") as out:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", _CHILD, tree, out.name], check=True,
                   env={**env, "JAX_PLATFORMS": "cpu"}, cwd=tree)
    return json.load(open(out.name))


def main(argv: list[str]) -> int:
  if len(argv) != 2:
    print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
    return 2
  old, new = (compile_in(tree) for tree in argv)
  same = True
  for program in ("train", "infer"):
    a, b = old[program], new[program]
    diff = [(i, x, y) for i, (x, y) in enumerate(zip(a, b)) if x != y]
    same_program = len(a) == len(b) and not diff
    same &= same_program
    print(f"{program}: {len(a)} / {len(b)} instructions, "
          f"{'identical' if same_program else f'{len(diff)} differ'}")
    for i, x, y in diff[:3]:
      print(f"  line {i}:\n    - {x.strip()}\n    + {y.strip()}")
  print(f"loss {old['loss']} / {new['loss']}; logits sum {old['logits_sum']} / "
        f"{new['logits_sum']}")
  return 0 if same else 1


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
