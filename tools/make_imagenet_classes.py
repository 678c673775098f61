"""Writes mambaeye_jax/data/imagenet_classes.txt, the ImageNet-1K class list.

    python tools/make_imagenet_classes.py [OUT]

Run once (the file is committed and ships as package data, so evaluating
ImageNet never needs tensorflow-datasets). Needs tensorflow-datasets, read
as files, not imported:

* the class order: `datasets/imagenet2012/labels.txt`, the 1000 synsets
  sorted, which is also the order of torchvision's ImageFolder over the
  train folders (the official code's labels);
* the readable names: `datasets/siscore/labels.py`'s IMAGENET_LABELS_LIST,
  in the same order; the first synonym of each ("tench, Tinca tinca" ->
  "tench").

The output is a class-map text file (`eval_data.read_class_map`): one
`SYNSET name` line per class, in class-index order.
"""

import ast
import importlib.util
import os
import sys

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "mambaeye_jax", "data", "imagenet_classes.txt")


def tfds_root() -> str:
  spec = importlib.util.find_spec("tensorflow_datasets")
  if spec is None or not spec.submodule_search_locations:
    raise SystemExit("error: tensorflow-datasets is not installed")
  return list(spec.submodule_search_locations)[0]


def synsets(root: str) -> list[str]:
  with open(os.path.join(root, "datasets", "imagenet2012", "labels.txt")) as f:
    keys = [line.strip() for line in f if line.strip()]
  if len(keys) != 1000 or keys != sorted(keys):
    raise SystemExit("error: imagenet2012/labels.txt is not 1000 sorted synsets")
  return keys


def readable_names(root: str) -> list[str]:
  with open(os.path.join(root, "datasets", "siscore", "labels.py")) as f:
    tree = ast.parse(f.read())
  for node in tree.body:
    if isinstance(node, ast.Assign) and any(
        getattr(t, "id", None) == "IMAGENET_LABELS_LIST" for t in node.targets):
      names = ast.literal_eval(node.value)
      if len(names) == 1000 and all(isinstance(n, str) for n in names):
        return [n.split(",")[0].strip() for n in names]
  raise SystemExit("error: no IMAGENET_LABELS_LIST of 1000 names in siscore/labels.py")


def main(argv: list[str]) -> int:
  out = argv[1] if len(argv) > 1 else DEFAULT_OUT
  root = tfds_root()
  lines = [f"{key} {name}" for key, name in zip(synsets(root), readable_names(root))]
  with open(out, "w", encoding="utf-8") as f:
    f.write("# ImageNet-1K classes in class-index order: SYNSET readable name.\n")
    f.write("# Written by tools/make_imagenet_classes.py from tensorflow-datasets.\n")
    f.write("\n".join(lines) + "\n")
  print(f"wrote {len(lines)} classes to {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
