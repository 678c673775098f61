r"""Equal-budget fidelity on CIFAR-10: both trainers, both evaluation protocols.

Issue 11's experiment. The same weights are scored through two protocols:

* "official validation": the official training code's own validation path,
  `mambaeye_official.dataset.ImagenetDatasetSinusoidal(validate=True)` (the
  image fitted to the canvas, corners uniform over the image's corner
  range), imported at run time from a copy of `../shared/official` and run
  through a torch DataLoader; its patches and corners go to this project's
  JAX model. For official weights (a `.pt`), the official PyTorch model also
  scores the same batches, which checks the conversion (`torch` column).
* "eval.py": this project's evaluator (`eval_lib.evaluate`, resize "fit")
  with the default scan `random` and with `random_official` (the official
  eval.py's bounds, which never see the last 15 pixels of the canvas).

Commands (one H100, 16 cores; `.official` is a copy of ../shared/official
with the CIFAR archives beside it; benchmarks/fidelity_cifar.sh runs these
stages as the device calls did):

    PYTHONPATH=.official python3 .official/cifar_official.py /tmp/data 1953 195 /tmp/fid/official.pt
    python train.py --config configs/cifar10.py:/tmp/data --workdir /tmp/fid/ours_s0 \
        --config.num_train_steps=1953 --config.optim.warmup_steps=195 --config.seed=0
    python benchmarks/fidelity_cifar.py --data /tmp/data --official-src .official \
        --model official=/tmp/fid/official.pt --model ours_s0=/tmp/fid/ours_s0 \
        --output /tmp/fid/fidelity.json

Prints one markdown table (rows: model x protocol; columns: canvas x
glimpses, top-1 %) and writes the numbers as JSON.
"""

from __future__ import annotations

import json
import os
import sys
import time

# Torch and JAX share the GPU: JAX must not take 75% of it up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import numpy as np  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top

from mambaeye_jax import cli  # pylint: disable=g-import-not-at-top


PROTOCOLS = ("official", "random", "random_official")


def _parse_models(specs: list[str]) -> dict[str, str]:
  models = {}
  for spec in specs:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
      raise SystemExit(f"--model takes NAME=PATH (a .pt or a work directory), got {spec!r}")
    if not os.path.exists(path):
      raise SystemExit(f"--model {name}: {path} does not exist")
    models[name] = path
  return models


def load_jax_models(models: dict[str, str], dtype: str):
  """NAME -> jitted `(patches, positions) -> logits` of each model."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from mambaeye_jax import eval_lib  # pylint: disable=g-import-not-at-top

  forwards = {}
  for name, path in models.items():
    # A .pt or a model directory (config.json beside params/) is a checkpoint;
    # any other directory is a training work directory (its latest step).
    is_checkpoint = os.path.isfile(path) or os.path.isfile(os.path.join(path, "config.json"))
    kind = "checkpoint_path" if is_checkpoint else "workdir"
    model = eval_lib.load_eval_model(dtype=dtype, **{kind: path})
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, patches, positions, graphdef=graphdef):
      return nnx.merge(graphdef, state)(patches, positions).astype(jax.numpy.float32)

    forwards[name] = (forward, state, model)
  return forwards


def load_torch_model(path: str, num_classes: int):
  """The official PyTorch MambaEye-Tiny with the weights of `path` (GPU)."""
  import torch  # pylint: disable=g-import-not-at-top
  from mambaeye_official.model import MambaEye  # pylint: disable=g-import-not-at-top
  model = MambaEye(num_classes=num_classes, input_dim=1280, dim=256, depth=12,
                   d_state=64, d_conv=4, expand=2).cuda()
  for layer in model.mamba2_net.layers:
    layer.mixer.use_mem_eff_path = False  # No causal_conv1d extension there.
  model.load_state_dict(torch.load(path, map_location="cuda"))
  return model.eval()


def _one_torch_thread(worker_id: int) -> None:
  """DataLoader worker init: one torch thread per worker process."""
  del worker_id
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(1)


def official_protocol(args, forwards, torch_models) -> dict:
  """Top-1 % through the official validation path: {model: {canvas: {T: acc}}}."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from mambaeye_official.dataset import ImagenetDatasetSinusoidal  # pylint: disable=g-import-not-at-top
  from mambaeye_official.dataset import collate_fn_keep_batch_size  # pylint: disable=g-import-not-at-top

  glimpses = args.glimpses
  steps = np.array(glimpses) - 1
  out = {name: {} for name in list(forwards) + [f"{n} (torch)" for n in torch_models]}
  for canvas in args.canvas_sizes:
    start = time.time()
    torch.manual_seed(args.seed)
    dataset = ImagenetDatasetSinusoidal(
        os.path.join(args.data, "cifar10", "test"), min_canvas_size=canvas,
        max_canvas_size=canvas, sequence_length=max(glimpses), validate=True)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, num_workers=args.workers,
        collate_fn=collate_fn_keep_batch_size, worker_init_fn=_one_torch_thread,
        # JAX runs threads in this process: fork could deadlock the workers.
        multiprocessing_context="spawn" if args.workers else None)
    hits = {name: np.zeros(len(glimpses)) for name in out}
    total = 0
    waited = 0.0
    batches = iter(loader)
    while True:
      tick = time.time()
      try:
        sequence, move_embedding, _, labels, corners = next(batches)
      except StopIteration:
        break
      waited += time.time() - tick
      # ToTensor's k / 255 back to the uint8 the JAX model reads.
      patches = jnp.asarray(np.rint(sequence.numpy() * 255.0).astype(np.uint8))
      positions = jnp.asarray(corners.numpy().astype(np.int32))
      y = labels.numpy()
      for name, (forward, state, _) in forwards.items():
        predictions = np.asarray(forward(state, patches, positions)[:, steps].argmax(-1))
        hits[name] += (predictions == y[:, None]).sum(0)
      for name, model in torch_models.items():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
          logits = model(sequence.cuda(), move_embedding.cuda()).float()
        predictions = logits[:, steps].argmax(-1).cpu().numpy()
        hits[f"{name} (torch)"] += (predictions == y[:, None]).sum(0)
      total += len(y)
    for name in out:
      out[name][canvas] = {t: round(100 * h / total, 2) for t, h in zip(glimpses, hits[name])}
    print(f"official validation, canvas {canvas}: {total} images, "
          f"{time.time() - start:.1f} s ({waited:.1f} s waiting for the loader)",
          file=sys.stderr, flush=True)
  return out


def evalpy_protocol(args, forwards, scan: str) -> dict:
  """Top-1 % through eval_lib with `scan`: {model: {canvas: {T: acc}}}."""
  from mambaeye_jax import eval_lib  # pylint: disable=g-import-not-at-top
  source = eval_lib.open_source(os.path.join(args.data, "cifar10", "test"))
  config = eval_lib.EvalConfig(
      canvas_sizes=args.canvas_sizes, resize_modes=("fit",), scan_patterns=(scan,),
      glimpse_counts=args.glimpses, batch_size=args.batch_size,
      num_workers=args.workers, seed=args.seed)
  out = {}
  for name, (_, _, model) in forwards.items():
    start = time.time()
    results = eval_lib.evaluate(model, source, config, progress_stream=False)
    out[name] = {r.setting.canvas_size: {t: round(100 * r.top1_at(t), 2) for t in args.glimpses}
                 for r in results}
    print(f"eval.py {scan}, {name}: {time.time() - start:.1f} s", file=sys.stderr, flush=True)
  return out


def markdown(tables: dict, canvases, glimpses) -> str:
  head = " | ".join(f"{c}: " + " / ".join(str(t) for t in glimpses) for c in canvases)
  lines = [f"| model | protocol | {head} |", "|---|---|" + "---|" * len(canvases)]
  for protocol, table in tables.items():
    for name, by_canvas in table.items():
      cells = [" / ".join(f"{by_canvas[c][t]:.2f}" for t in glimpses) for c in canvases]
      lines.append(f"| {name} | {protocol} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


# Flags of this script only (mambaeye_jax.cli says why not absl's global FLAGS).
FLAGS = flags.FlagValues()
flags.DEFINE_string("data", None, "directory holding cifar10/test (required)",
                    flag_values=FLAGS)
flags.DEFINE_string("official-src", ".official",
                    "copy of ../shared/official (mambaeye_official, mamba_ssm)",
                    flag_values=FLAGS)
flags.DEFINE_multi_string("model", None, "NAME=PATH: an official .pt, a model directory "
                          "or a training work directory (repeat it; one at least)",
                          flag_values=FLAGS)
cli.define_int_list("canvas-sizes", (32, 48, 64, 96), "canvas sides", flag_values=FLAGS)
cli.define_int_list("glimpses", (16, 64, 128), "glimpse counts", flag_values=FLAGS)
flags.DEFINE_integer("batch-size", 500, "images per step", flag_values=FLAGS)
flags.DEFINE_integer("workers", min(15, os.cpu_count() or 1), "worker processes",
                     flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "random seed", flag_values=FLAGS)
flags.DEFINE_string("dtype", "auto", "compute dtype", flag_values=FLAGS)
cli.define_name_list("protocols", PROTOCOLS, "comma-separated subset of "
                     + ",".join(PROTOCOLS), flag_values=FLAGS, choices=PROTOCOLS)
flags.DEFINE_bool("no-torch", False, "skip the official PyTorch model on official weights",
                  flag_values=FLAGS)
flags.DEFINE_string("output", None, "JSON file for the numbers", flag_values=FLAGS)


def main() -> None:
  args = cli.parse_args(FLAGS, None, prog="fidelity_cifar.py",
                        usage="python benchmarks/fidelity_cifar.py --data DATA "
                        "--model NAME=PATH [--model NAME=PATH ...] [--flag=value ...]",
                        description=__doc__, required=("data", "model"))

  models = _parse_models(args.model)
  sys.path.insert(0, os.path.abspath(args.official_src))
  forwards = load_jax_models(models, args.dtype)
  torch_models = {}
  if not args.no_torch and "official" in args.protocols:
    for name, path in models.items():
      if path.endswith(".pt"):
        torch_models[name] = load_torch_model(path, forwards[name][2].config.num_classes)

  tables = {}
  if "official" in args.protocols:
    tables["official validation"] = official_protocol(args, forwards, torch_models)
  for scan in ("random", "random_official"):
    if scan in args.protocols:
      tables[f"eval.py {scan}"] = evalpy_protocol(args, forwards, scan)
  report = markdown(tables, args.canvas_sizes, args.glimpses)
  print(f"top-1 % at {' / '.join(map(str, args.glimpses))} glimpses (resize fit)")
  print(report)
  if args.output:
    with open(args.output, "w") as f:
      json.dump({"models": models, "glimpses": args.glimpses,
                 "canvas_sizes": args.canvas_sizes, "tables": tables}, f, indent=1)


if __name__ == "__main__":
  main()
