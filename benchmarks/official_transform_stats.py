r"""Statistics of the official training transform, saved as a test fixture.

Runs the official `ImagenetDatasetSinusoidal` (validate=False; github
usingcolor/MambaEye, commit d8cc1ff, as kept in ../shared/official) on real
images and records, per sample, what tests/test_transform_fidelity.py
compares with mambaeye-jax's own training transform on the same images:

  * canvas side, the image box on it (top, left, height, width), the
    perspective warp's input and output sizes, and the official coins
    (perspective, crop, localized sequence);
  * glimpse corners: the first one, and per sequence the mean corner offset
    from the box normalised by the box size, the fraction of corners inside
    the box, and whether all corners lie in the image's corner range;
  * information ratio after 1, 16, 128 (and 1024) glimpses;
  * pixels of the image box as pasted (after random erasing): per-channel
    mean and std, mean absolute neighbour difference (sharpness), fraction of
    all-zero pixels, whether the image is gray;
  * samples the official code drops (returns None).

Two settings: "cifar" (configs/cifar10.py: canvas 32..64, T = 128) on the
first 250 images (0000.jpg to 0249.jpg) of the classes airplane, automobile,
bird and cat of ../shared/data/cifar10_train.tar.gz, and
"imagenet" (configs/imagenet.py: canvas 256..1024, T = 1024) on the 100
photographs of ../shared/data/imagenet_sample_100.tar.gz as one class folder.
Every image is used once per pass, in the official (sorted) order.

The official code needs torch and torchvision; this script does not import
jax (and the project does not need torch), so run it once by hand in a
separate environment:

    python3 -m venv /tmp/torchenv
    /tmp/torchenv/bin/pip install torch torchvision numpy pillow==13.0.0
    # (Pillow as in the project's environment: both sides resample alike.)
    /tmp/torchenv/bin/python benchmarks/official_transform_stats.py \
        --out tests/fixtures/official_transform_stats.npz

Measured 2026-12-05 (torch 2.14.1+cu130 run on the CPU, torchvision 0.29.1,
Pillow 13.0.0, NumPy 2.4.6; one thread of a 2-core CPU machine): 2 min 46 s
in all; cifar 4 passes = 4,000 samples in 17.6 s (4.4 ms each, 35 dropped),
imagenet 15 passes = 1,500 samples in 140.0 s (93 ms each, none dropped;
82 s when nothing else ran beside it); the fixture is 295 KB. A second run
wrote identical arrays (the official sampler, seeded as here, is
deterministic on the CPU).

Nothing is copied from the official code: it is imported from
../shared/official at run time, and observed from outside by replacing two
names of its module and one attribute of the dataset with recording
wrappers around the originals (`random`, `apply_perspective`, and the
instance's `random_erase`, which receives the final image just before it is
pasted on the canvas).

The statistics functions (`image_stats`, `sample_stats`) and the image
selection (`image_names`, `read_images`) need only numpy; the test imports
them, so that both transforms are measured by the same code.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import random
import sys
import tarfile
import tempfile
import time
from typing import Any, Sequence

from absl import flags

from mambaeye_jax import cli
import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(REPO_ROOT, "..", "shared")
OFFICIAL_COMMIT = "d8cc1ff"
PATCH = 16

# Per setting: archive in ../shared/data, the classes and images per class
# read (files 0000.jpg, 0001.jpg, ...; None: every image of the archive),
# canvas range, T, the steps whose information ratio is kept, passes over
# the images and the seed. CIFAR's first four classes lie at the start of
# its archive, so the test reads them without walking all of it.
SETTINGS: dict[str, dict[str, Any]] = {
    "cifar": dict(archive="cifar10_train.tar.gz",
                  classes=("airplane", "automobile", "bird", "cat"),
                  per_class=250, canvas=(32, 64), num_glimpses=128,
                  ratio_steps=(1, 16, 128), passes=4, seed=0),
    "imagenet": dict(archive="imagenet_sample_100.tar.gz", classes=None,
                     per_class=None, canvas=(256, 1024), num_glimpses=1024,
                     ratio_steps=(1, 16, 128, 1024), passes=15, seed=1),
}

# Corners kept per sample, as they are (the rest enter only summaries).
NUM_CORNERS_KEPT = 1


def image_names(name: str) -> list[str] | None:
  """The "<class>/<image>" names of a setting, sorted; None: the whole
  archive."""
  setting = SETTINGS[name]
  if setting["classes"] is None:
    return None
  return [f"{cls}/{i:04d}.jpg" for cls in sorted(setting["classes"])
          for i in range(setting["per_class"])]


def read_images(archive: str, names: Sequence[str] | None
                ) -> list[tuple[str, bytes]]:
  """The images of a setting, in the official dataset's order.

  The archive is streamed and left as soon as every named image was read:
  CIFAR's first classes lie at its start, and Python's tarfile needs ~4 s
  to walk all 50,000 members.

  Args:
    archive: a .tar.gz of <...>/<class>/<image> files.
    names: the "<class>/<image>" names to read; None reads every image.

  Returns:
    [("<class>/<image>", encoded bytes)], sorted by class then name, as the
    official `os.listdir(...).sort()` orders them.

  Raises:
    FileNotFoundError: a named image is not in the archive.
  """
  wanted = None if names is None else set(names)
  found: dict[str, bytes] = {}
  with tarfile.open(archive, "r|gz") as tar:
    for member in tar:
      parts = member.name.split("/")
      if not member.isfile() or len(parts) < 2 or not parts[-1].lower(
          ).endswith((".png", ".jpg", ".jpeg", ".webp")):
        continue
      rel = "/".join(parts[-2:])
      if wanted is None or rel in wanted:
        found[rel] = tar.extractfile(member).read()
        if wanted is not None and len(found) == len(wanted):
          break
  if wanted is not None and len(found) < len(wanted):
    missing = sorted(wanted - set(found))
    raise FileNotFoundError(f"{len(missing)} images missing from {archive}, "
                            f"e.g. {missing[:3]}")
  return [(rel, found[rel]) for rel in sorted(
      found, key=lambda r: tuple(r.split("/")))]


def image_stats(pixels: np.ndarray) -> dict[str, Any]:
  """Statistics of the image as pasted on the canvas.

  Args:
    pixels: (h, w, 3) uint8.

  Returns:
    mean (3,), std (3,) per channel in [0, 1]; grad: mean absolute
    difference of horizontal and of vertical neighbours (all channels) in
    [0, 1], which falls as a crop is enlarged; zero_frac: fraction of pixels
    black in all channels (perspective fill, erasing, dark content); gray:
    all three channels equal everywhere.
  """
  x = pixels.astype(np.float32) / 255.0
  grad = 0.5 * (np.abs(np.diff(x, axis=0)).mean()
                + np.abs(np.diff(x, axis=1)).mean())
  return {
      "mean": x.mean(axis=(0, 1)),
      "std": x.std(axis=(0, 1)),
      "grad": np.float32(grad),
      "zero_frac": np.float32((pixels.max(axis=2) == 0).mean()),
      "gray": bool((pixels[..., 0] == pixels[..., 1]).all()
                   and (pixels[..., 1] == pixels[..., 2]).all()),
  }


def sample_stats(pixels: np.ndarray, canvas: int,
                 box: Sequence[int], positions: np.ndarray,
                 ratio: np.ndarray, ratio_steps: Sequence[int]
                 ) -> dict[str, Any]:
  """All statistics of one training sample.

  Args:
    pixels: (h, w, 3) uint8 image box as pasted.
    canvas: canvas side c.
    box: (top, left, h, w) of the image on the canvas.
    positions: (T, 2) (row, col) glimpse corners on the canvas.
    ratio: (T,) information ratio.
    ratio_steps: 1-based steps whose ratio is kept.

  Returns:
    A flat dict of scalars and small arrays (see the module docstring).
  """
  top, left, h, w = (int(v) for v in box)
  pos = np.asarray(positions, np.int64)
  rows, cols = pos[:, 0], pos[:, 1]
  # The official range of corners "in the image" (dataset.py's row_end /
  # col_end, exclusive): a localized sequence keeps every corner in it.
  row_stop = min(max(top + 1, top + h), canvas - PATCH + 1)
  col_stop = min(max(left + 1, left + w), canvas - PATCH + 1)
  in_range = ((rows >= top) & (rows < row_stop)
              & (cols >= left) & (cols < col_stop))
  inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
  ratio = np.asarray(ratio, np.float32)
  return {
      "canvas": canvas,
      "box": np.array([top, left, h, w]),
      "corners": pos[:NUM_CORNERS_KEPT],
      "row_offset": np.float32(((rows - top) / h).mean()),
      "col_offset": np.float32(((cols - left) / w).mean()),
      "inside_frac": np.float32(inside.mean()),
      "all_in_range": bool(in_range.all()),
      "ratio": ratio[np.asarray(ratio_steps) - 1],
      **image_stats(pixels),
  }


# Fixture dtype of each per-sample field; rows of dropped samples hold -1
# (integers), NaN (floats) or False.
FIELDS = {
    "canvas": np.int16, "box": np.int16, "corners": np.int16,
    "row_offset": np.float32, "col_offset": np.float32,
    "inside_frac": np.float32, "all_in_range": bool, "ratio": np.float32,
    "mean": np.float32, "std": np.float32, "grad": np.float32,
    "zero_frac": np.float32, "gray": bool,
}


def stack_stats(records: list[dict[str, Any] | None], template: dict[str, Any]
                ) -> dict[str, np.ndarray]:
  """Per-sample dicts (None: no statistics) -> per-field arrays (n, ...)."""
  out = {}
  for name, dtype in FIELDS.items():
    shape = np.shape(template[name])
    empty = np.full(shape, -1 if np.issubdtype(dtype, np.integer) else
                    (False if dtype is bool else np.nan), dtype)
    out[name] = np.stack([np.asarray(r[name], dtype) if r is not None
                          else empty for r in records])
  return out


# ---------------------------------------------------------------- official


class _RecordingRandom:
  """The `random` module, with `randint` and `random` results recorded."""

  def __init__(self, module):
    self._module = module
    self.calls: list[tuple[str, float]] = []

  def randint(self, a, b):
    value = self._module.randint(a, b)
    self.calls.append(("randint", value))
    return value

  def random(self):
    value = self._module.random()
    self.calls.append(("random", value))
    return value

  def __getattr__(self, name):
    return getattr(self._module, name)


def run_official(name: str, images: list[tuple[str, bytes]], workdir: str
                 ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Samples of the official dataset over `images`, and their statistics.

  Returns:
    (per-field arrays over all samples, dropped ones included; info dict).
  """
  import torch  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.join(SHARED, "official"))
  from mambaeye_official import dataset as official  # pylint: disable=g-import-not-at-top

  setting = SETTINGS[name]
  root = os.path.join(workdir, name)
  for rel, data in images:
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
      f.write(data)
  lo, hi = setting["canvas"]
  ds = official.ImagenetDatasetSinusoidal(
      root, min_canvas_size=lo, max_canvas_size=hi,
      sequence_length=setting["num_glimpses"], validate=False)
  order = [os.path.relpath(p, root) for p, _ in ds.img_data]
  if order != [rel for rel, _ in images]:
    raise RuntimeError("official image order differs from read_images")

  # Observe the official code from outside: its `random` module, its
  # perspective function and the instance's RandomErasing, each a wrapper
  # that records and then returns the original's result unchanged.
  recorder = _RecordingRandom(random)
  official.random = recorder
  real_perspective = official.apply_perspective
  seen: dict[str, Any] = {}

  def perspective(image, *args, **kwargs):
    out, bbox = real_perspective(image, *args, **kwargs)
    seen["warp"] = (*image.size, *out.size)
    return out, bbox

  official.apply_perspective = perspective
  real_erase = ds.random_erase

  def erase(tensor):
    out = real_erase(tensor)
    seen["pixels"] = out
    return out

  ds.random_erase = erase

  # The official logs a warning per dropped sample; they are counted here.
  logging.disable(logging.WARNING)
  seed = setting["seed"]
  random.seed(seed)
  np.random.seed(seed)
  torch.manual_seed(seed)
  torch.set_num_threads(1)
  records, extra = [], []
  start = time.perf_counter()
  for _ in range(setting["passes"]):
    for index in range(len(ds)):
      recorder.calls.clear()
      seen.clear()
      sample = ds[index]
      ints = [v for kind, v in recorder.calls if kind == "randint"]
      coins = [v for kind, v in recorder.calls if kind == "random"]
      canvas = ints[0]
      row = {"image_index": index, "dropped": sample is None,
             "canvas_drawn": canvas,
             "perspective": coins[0] < ds.perspective_prob,
             "warp": seen.get("warp", (-1, -1, -1, -1)),
             "crop": len(coins) > 1 and coins[1] < ds.crop_prob,
             "localized": len(coins) > 2 and coins[2] < ds.localized_seq_prob}
      extra.append(row)
      if sample is None:
        records.append(None)
        continue
      _, _, ratio, _, location = sample
      tensor = seen["pixels"]  # (3, h, w) float in [0, 1], k / 255.
      pixels = np.rint(tensor.permute(1, 2, 0).numpy() * 255.0).astype(
          np.uint8)
      h, w = pixels.shape[:2]
      box = ((canvas - h) // 2, (canvas - w) // 2, h, w)
      records.append(sample_stats(pixels, canvas, box,
                                  location.numpy().astype(np.int64),
                                  ratio.numpy(), setting["ratio_steps"]))
  seconds = time.perf_counter() - start
  logging.disable(logging.NOTSET)
  template = next(r for r in records if r is not None)
  arrays = stack_stats(records, template)
  for key in ("image_index", "dropped", "canvas_drawn", "perspective",
              "warp", "crop", "localized"):
    arrays[key] = np.array([row[key] for row in extra])
  arrays["image_index"] = arrays["image_index"].astype(np.int16)
  arrays["canvas_drawn"] = arrays["canvas_drawn"].astype(np.int16)
  arrays["warp"] = arrays["warp"].astype(np.int16)
  info = {"samples": len(records), "dropped": int(arrays["dropped"].sum()),
          "seconds": round(seconds, 1),
          "ms_per_sample": round(1e3 * seconds / len(records), 2)}
  return arrays, info


# Flags of this script only (mambaeye_jax.cli says why not absl's global FLAGS).
FLAGS = flags.FlagValues()
flags.DEFINE_string("data", os.path.join(SHARED, "data"), "folder of the shared archives",
                    flag_values=FLAGS)
flags.DEFINE_string("out", os.path.join(REPO_ROOT, "tests", "fixtures",
                                        "official_transform_stats.npz"),
                    "the .npz written", flag_values=FLAGS)
flags.DEFINE_string("settings", "cifar,imagenet", "settings measured, comma-separated",
                    flag_values=FLAGS)


def main(argv=None):
  args = cli.parse_args(FLAGS, argv, prog="official_transform_stats.py",
                        usage="python benchmarks/official_transform_stats.py [--data DIR] [--out NPZ] [--settings cifar,imagenet]",
                        description=__doc__)

  import PIL  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top

  fixture: dict[str, np.ndarray] = {}
  meta: dict[str, Any] = {
      "official_commit": OFFICIAL_COMMIT,
      "date": datetime.date.today().isoformat(),
      "command": " ".join(["python", "benchmarks/official_transform_stats.py",
                           *(argv if argv is not None else sys.argv[1:])]),
      "versions": {"torch": torch.__version__,
                   "torchvision": torchvision.__version__,
                   "pillow": PIL.__version__, "numpy": np.__version__},
      "settings": {},
  }
  with tempfile.TemporaryDirectory() as workdir:
    for name in args.settings.split(","):
      setting = SETTINGS[name]
      images = read_images(os.path.join(args.data, setting["archive"]),
                           image_names(name))
      arrays, info = run_official(name, images, workdir)
      for key, value in arrays.items():
        fixture[f"{name}.{key}"] = value
      meta["settings"][name] = {
          **setting, "images": len(images), "first_image": images[0][0],
          "last_image": images[-1][0], **info}
      print(json.dumps({"setting": name, **info}), flush=True)
  fixture["meta"] = np.array(json.dumps(meta))
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  np.savez_compressed(args.out, **fixture)
  print(f"wrote {args.out} ({os.path.getsize(args.out) / 1024:.0f} KB)")


if __name__ == "__main__":
  main()
