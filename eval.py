r"""Multi-resolution evaluation of a MambaEye checkpoint.

Dataset mode (accuracy table, JSON, markdown and PNG plots):

    python eval.py --checkpoint tiny.safetensors --data /data/imagenet/val \
        --canvas-sizes 224,384,512,768,1024,1536 --output out/eval_tiny

Single-image mode (top-5 and a picture of the glimpse path):

    python eval.py --checkpoint tiny.pt --image n01440764_tench.JPEG

Defaults follow the official eval.py (T = 4096 glimpses, resize "fit", canvas
512), except the scan: "random" draws corners over the whole image as the
official validation does; "random_official" (and every "<pattern>_official")
keeps the official eval.py bounds, which never look at the last 15 pixels of
a canvas edge the image touches (docs/evaluation.md). On a CPU the batch
defaults to 16 (64 on GPU/TPU) to bound memory, and a hint says how long the
default T = 4096 will take. The library is `mambaeye_jax.eval_lib` (and eval_*); docs in
docs/evaluation.md.

Errors (a missing path, a bad --scan name, an unreadable image, ...) are
reported as one line, `eval.py: error: ...`, exit status 2; --verbose adds
the traceback. Flags parse as absl's (--flag=value or --flag value, --[no]bool,
--flagfile=FILE); --help lists them all.
"""

from __future__ import annotations

import os
import sys
import time
import traceback

from absl import flags

from mambaeye_jax import cli

# --glimpses and --batch-size when not given; the batch is smaller on a CPU,
# where activations of T = 4096 take ~11 GB at 64 images.
DEFAULT_GLIMPSES = (256, 1024, 4096)
DEFAULT_BATCH_SIZE = 64
DEFAULT_CPU_BATCH_SIZE = 16
QUICK_GLIMPSES = "16,64,256"
# Seconds per image, glimpse and layer of a width-256 model on a CPU (Tiny,
# T 4096, canvas 512: ~5 minutes for 100 photos): for the hint only.
_CPU_SECONDS_PER_GLIMPSE_LAYER = 6e-5


# Flags of this script only (mambaeye_jax.cli says why not absl's global
# FLAGS). The names keep their dashes: the README and docs spell them so.
FLAGS = flags.FlagValues()


def _define_flags() -> None:
  f = FLAGS
  flags.DEFINE_string("checkpoint", None, "model directory (python -m "
                      "mambaeye_jax.convert) or official .pt / .safetensors; "
                      "this or --workdir", flag_values=f)
  flags.DEFINE_string("workdir", None, "training work directory (its latest "
                      "checkpoint); this or --checkpoint", flag_values=f)
  flags.DEFINE_string("data", None, "image folder root/<class>/<image>, a folder of "
                      "<synset>_<name>.JPEG photos, a .tar.gz of either, tfds:NAME[:SPLIT] "
                      "or synthetic[:N]; this or --image", flag_values=f)
  flags.DEFINE_string("image", None, "classify one image file; this or --data",
                      flag_values=f)
  flags.DEFINE_string("class-map", None, "class list: one 'KEY [name]' per line in "
                      "class order (KEY a synset or folder name), or JSON", flag_values=f)
  cli.define_int_list("canvas-sizes", "512", "canvas sides, comma-separated",
                      flag_values=f)
  cli.define_name_list("resize", "fit", "resize modes: none,fit,full", flag_values=f)
  cli.define_name_list("scan", "random",
                       "scan patterns of mambaeye_jax.data.scan_patterns: random, "
                       "random_fixed_grid, column_major, horizontal_raster, horizontal_zigzag, "
                       "column_snake, hilbert, spiral, diagonal, golden, ...; NAME_official "
                       "keeps the official eval.py bounds and its blind spot",
                       flag_values=f)
  cli.define_int_list("glimpses", None,
                      "glimpse counts reported (T = the largest); default "
                      f"{','.join(map(str, DEFAULT_GLIMPSES))}, the official "
                      f"evaluation's; on a CPU, {QUICK_GLIMPSES} is a quick look",
                      flag_values=f)
  flags.DEFINE_integer("batch-size", None, "images per device step; default "
                       f"{DEFAULT_BATCH_SIZE} on GPU/TPU, {DEFAULT_CPU_BATCH_SIZE} "
                       "on a CPU (memory)", flag_values=f)
  flags.DEFINE_integer("workers", os.cpu_count() or 1,
                       "decode/resize worker processes (0: in the main process)",
                       flag_values=f)
  flags.DEFINE_integer("seed", 0, "seeds the random scan orders (per image) and "
                       "the --max-examples draw", flag_values=f)
  flags.DEFINE_integer("max-examples", None, "evaluate N images drawn with --seed, "
                       "the same number from every class (give or take one), "
                       "instead of all (--max-examples N)", flag_values=f)
  flags.DEFINE_enum("dtype", "auto", ("auto", "float32", "bfloat16"),
                    "compute dtype (auto: bf16 on GPU/TPU, f32 on CPU)", flag_values=f)
  flags.DEFINE_string("ssd-impl", None, "SSD implementation override: auto, "
                      "sequential, chunked, associative, pallas, pallas_interpret "
                      "(default: the checkpoint's)", flag_values=f)
  flags.DEFINE_integer("chunk-size", None, "SSD chunk length override (default: "
                       "the checkpoint's)", flag_values=f)
  flags.DEFINE_bool("reference", False, "resample the canvases with PIL LANCZOS "
                    "as the official code (slower) instead of the default OpenCV "
                    "resampler, whose pixels differ slightly (docs/evaluation.md)",
                    flag_values=f)
  flags.DEFINE_bool("skip-bad-images", False, "leave unreadable images out "
                    "(counted) instead of stopping", flag_values=f)
  flags.DEFINE_string("tfds-data-dir", None, "TFDS data directory for --data "
                      "tfds:NAME", flag_values=f)
  flags.DEFINE_string("output", None, "output folder (default: WORKDIR/eval, or "
                      "out/eval)", flag_values=f)
  flags.DEFINE_bool("no-plots", False, "write no PNG plots", flag_values=f)
  flags.DEFINE_bool("verbose", False, "print the traceback with an error",
                    flag_values=f)


_define_flags()

USAGE = ("eval.py (--checkpoint PATH | --workdir DIR) (--data DATA | --image FILE) "
         "[--flag=value ...]")


def help_text() -> str:
  """What --help prints: usage, the docstring and every flag."""
  return cli.help_text(FLAGS, USAGE, __doc__)


def parse_flags(argv):
  """argv (no program name) as a namespace of flag values, dashes as
  underscores (args.canvas_sizes); raises cli.UsageError for bad input."""
  positional = cli.parse(FLAGS, argv, "eval.py")
  if positional:
    raise cli.UsageError(f"unexpected arguments: {' '.join(positional)}")
  # Checked here rather than by absl's mark_flags_as_mutual_exclusive(...,
  # required=True), whose one message ("Exactly one of (checkpoint, workdir)
  # must have a value other than None") does not say which mistake was made.
  for a, b in (("checkpoint", "workdir"), ("data", "image")):
    given = [n for n in (a, b) if FLAGS[n].value is not None]
    if not given:
      raise cli.UsageError(f"one of --{a} or --{b} is required")
    if len(given) == 2:
      raise cli.UsageError(f"--{a} and --{b} cannot be given together")
  return cli.namespace(FLAGS)


def _cpu_hint(num_images: int, num_settings: int, num_glimpses: int,
              depth: int, dim: int) -> str:
  """One line: the rough CPU time of the default T, and the quick option."""
  seconds = (num_images * num_settings * num_glimpses * depth
             * _CPU_SECONDS_PER_GLIMPSE_LAYER * (dim / 256) ** 2)
  if seconds >= 3600:
    rough = f"{seconds / 3600:.1f} hours"
  elif seconds >= 60:
    rough = f"{seconds / 60:.0f} minutes"
  else:
    rough = f"{seconds:.0f} seconds"
  return (f"eval.py: running on CPU: T {num_glimpses} over {num_images} "
          f"images x {num_settings} settings will take roughly {rough}; pass "
          f"--glimpses {QUICK_GLIMPSES} for a quick look")


def main(argv=None) -> int:
  """eval.py's command line (argv without the program name); exit status."""
  argv = sys.argv[1:] if argv is None else list(argv)
  if cli.wants_help(argv):
    cli.print_help(help_text())
    return 0
  try:
    args = parse_flags(argv)
  except cli.UsageError as e:
    return cli.print_usage_error("eval.py", str(e))
  try:
    return _main(args)
  except KeyboardInterrupt:
    print("eval.py: interrupted", file=sys.stderr)
    return 130
  except Exception as e:  # pylint: disable=broad-except
    # One line naming what failed and why; the traceback on request.
    if args.verbose:
      traceback.print_exc()
    message, expected = _describe(e)
    if not (expected or args.verbose):
      message += " (--verbose shows the traceback)"
    print(f"eval.py: error: {message}", file=sys.stderr)
    return 2


def _describe(e: BaseException) -> tuple[str, bool]:
  """An exception as one line, and whether it is of a type whose message
  says all (EvalError, ValueError, ...); others get their type named."""
  from mambaeye_jax import eval_data  # pylint: disable=g-import-not-at-top
  if isinstance(e, KeyError) and e.args:
    message = str(e.args[0])
  else:
    message = str(e) or type(e).__name__
  expected = isinstance(e, (eval_data.EvalError, ValueError, KeyError,
                            FileNotFoundError))
  if not expected:
    message = f"{type(e).__name__}: {message}"
  return " ".join(message.split()), expected  # One line.


def _main(args) -> int:
  # Imported after parsing so that --help and usage errors are instant.
  import jax  # pylint: disable=g-import-not-at-top
  from mambaeye_jax import eval_data  # pylint: disable=g-import-not-at-top
  from mambaeye_jax import eval_lib  # pylint: disable=g-import-not-at-top
  from mambaeye_jax import eval_reports  # pylint: disable=g-import-not-at-top
  output = args.output or (os.path.join(args.workdir, "eval") if args.workdir
                           else os.path.join("out", "eval"))
  if os.path.exists(output) and not os.path.isdir(output):
    # Checked now, not after the evaluation has run.
    raise ValueError(f"--output {output} is a file, not a folder")
  on_cpu = jax.default_backend() == "cpu"
  default_glimpses = args.glimpses is None
  glimpses = DEFAULT_GLIMPSES if default_glimpses else args.glimpses
  batch_size = args.batch_size or (DEFAULT_CPU_BATCH_SIZE if on_cpu
                                   else DEFAULT_BATCH_SIZE)
  if args.image is None:
    config = eval_lib.EvalConfig(
        canvas_sizes=args.canvas_sizes, resize_modes=args.resize,
        scan_patterns=args.scan, glimpse_counts=glimpses,
        batch_size=batch_size, num_workers=args.workers, seed=args.seed,
        max_examples=args.max_examples, skip_bad_images=args.skip_bad_images,
        resampler=_resampler(args))
    # The data first: a bad dataset should fail before the model loads.
    source = eval_data.open_source(args.data, class_map=args.class_map,
                                   tfds_data_dir=args.tfds_data_dir)
    source = eval_lib.select_examples(source, config)
  else:
    if len(args.scan) != 1 or len(args.resize) != 1:
      raise ValueError("--image takes one --scan and one --resize")
    eval_lib.EvalConfig(resize_modes=args.resize, scan_patterns=args.scan,
                        glimpse_counts=glimpses)
  model = eval_lib.load_eval_model(
      checkpoint_path=args.checkpoint, workdir=args.workdir, dtype=args.dtype,
      ssd_impl=args.ssd_impl, chunk_size=args.chunk_size)
  if args.image is not None:
    return _single_image(args, model, output, max(glimpses))
  if on_cpu and default_glimpses:
    print(_cpu_hint(len(source), len(config.settings()), config.num_glimpses,
                    model.config.depth, model.config.dim), file=sys.stderr)
  print(f"evaluating {args.checkpoint or args.workdir} ({model.config.dtype}) on "
        f"{source.description}: {len(config.settings())} settings, "
        f"T={config.num_glimpses}, batch {config.batch_size}", file=sys.stderr)
  start = time.time()
  meta = {"checkpoint": args.checkpoint or args.workdir, "data": args.data,
          "examples": source.description,
          "dtype": model.config.dtype, "depth": model.config.depth,
          "num_glimpses": config.num_glimpses, "seed": config.seed}
  num_settings = len(config.settings())

  def write_partial(results_so_far):
    # After each setting: a stopped grid keeps what it scored. The last
    # write, below, replaces it (and draws the plots).
    if jax.process_index() == 0:
      eval_reports.write_reports(
          results_so_far, config,
          dict(meta, settings_done=f"{len(results_so_far)} of {num_settings}"),
          output, plots=False)

  results = eval_lib.evaluate(model, source, config, on_setting_done=write_partial)
  meta["wall_seconds_incl_compile"] = round(time.time() - start, 1)
  if jax.process_index() != 0:
    return 0  # Multi-host: every process has the results; one writes them.
  paths = eval_reports.write_reports(results, config, meta, output,
                                     plots=not args.no_plots)
  with open(paths["markdown"]) as f:
    print(f.read())
  for kind, path in paths.items():
    print(f"{kind}: {path}")
  return 0


def _resampler(args) -> str:
  return "reference" if args.reference else "fast"


def _single_image(args, model, output, num_glimpses: int) -> int:
  """Prints the top-5 classes and saves the glimpse-path picture."""
  from mambaeye_jax import eval_data  # pylint: disable=g-import-not-at-top
  from mambaeye_jax import eval_image  # pylint: disable=g-import-not-at-top
  from mambaeye_jax.data import scan_patterns  # pylint: disable=g-import-not-at-top
  class_map = None
  if args.class_map:
    class_map = eval_data.read_class_map(args.class_map)
  elif model.config.num_classes == 1000:
    class_map = eval_data.builtin_imagenet_classes()
  result = eval_image.classify_image(
      model, args.image, canvas_size=args.canvas_sizes[0], resize=args.resize[0],
      scan=args.scan[0], num_glimpses=num_glimpses, seed=args.seed,
      class_map=class_map, resampler=_resampler(args))
  print(f"{args.image}: top-5 after {len(result.positions)} glimpses "
        f"(canvas {result.canvas.shape[0]}, {args.resize[0]}, {args.scan[0]})")
  for rank, (index, name, prob) in enumerate(result.top, start=1):
    mark = "  <- label" if result.label == index else ""
    print(f"  {rank}. {index:4d} {name:30s} {100 * prob:6.2f}%{mark}")
  if result.label is not None and result.label not in [t[0] for t in result.top]:
    name = class_map.name(result.label)
    print(f"  label {result.label:4d} {name:30s} {100 * result.label_probability:6.2f}%")
  os.makedirs(output, exist_ok=True)
  stem = os.path.splitext(os.path.basename(args.image))[0]
  path = scan_patterns.plot_glimpse_path(
      result.canvas, result.positions, result.confidence,
      path=os.path.join(output, f"{stem}_glimpses.png"),
      title=f"{stem}: {result.top[0][1]} ({100 * result.top[0][2]:.1f}%)")
  print(f"glimpse path: {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
