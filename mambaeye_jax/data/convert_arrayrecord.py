"""Converts an image folder (root/<class>/<image>) into ArrayRecord shards.

    python -m mambaeye_jax.data.convert_arrayrecord SRC_DIR DST_PREFIX --shards N

Writes DST_PREFIX-00000-of-0000N.array_record ... (records as
`arrayrecord.encode_record`: the image file's bytes unchanged, its label and its
path relative to SRC_DIR) and DST_PREFIX.json (class names, counts). Records
are spread round-robin over the shards in the folder's sorted order, so
shard i holds records i, i + N, ...; read them back with
`arrayrecord.ArrayRecordSource("DST_PREFIX-*")` or source="arrayrecord",
path="DST_PREFIX-*".

Bad files are checked here, once, rather than at every epoch: with
--verify (default) every image is decoded; unreadable ones are left out and
listed in DST_PREFIX.json under "skipped" (with --strict the conversion
stops at the first one instead).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from array_record.python import array_record_module

from mambaeye_jax.data import arrayrecord
from mambaeye_jax.data import sources


def convert(src_dir: str, dst_prefix: str, num_shards: int, *,
            verify: bool = True, strict: bool = False,
            max_pixels: int = sources.DEFAULT_MAX_IMAGE_PIXELS
            ) -> dict:
  """Writes the shards and the metadata file.

  Args:
    src_dir: image folder in the official layout.
    dst_prefix: output path prefix (its directory is created).
    num_shards: number of ArrayRecord files, >= 1.
    verify: decode every image and leave unreadable ones out.
    strict: raise on the first unreadable image instead.
    max_pixels: decompression-bomb guard for the verification.

  Returns:
    The metadata written to DST_PREFIX.json: {"num_classes", "class_names",
    "num_records", "shards", "skipped": [[path, reason], ...]}.
  """
  if num_shards < 1:
    raise ValueError(f"{num_shards=} must be >= 1")
  source = sources.ImageFolderSource(src_dir)
  os.makedirs(os.path.dirname(os.path.abspath(dst_prefix)), exist_ok=True)
  paths = arrayrecord.shard_paths(dst_prefix, num_shards)
  writers = [array_record_module.ArrayRecordWriter(p, "group_size:1")
             for p in paths]
  skipped = []
  written = 0
  try:
    for index in range(len(source)):
      record = source[index]
      key = os.path.relpath(record["key"], source.root)
      if verify:
        try:
          sources.decode_image(record["image"], record["key"],
                               max_pixels=max_pixels)
        except sources.BadImageError as e:
          if strict:
            raise
          logging.warning("leaving out %s", e)
          skipped.append([key, e.reason])
          continue
      writers[written % num_shards].write(
          arrayrecord.encode_record(record["image"], record["label"], key))
      written += 1
  finally:
    for w in writers:
      w.close()
  meta = {"num_classes": source.num_classes,
          "class_names": source.class_names, "num_records": written,
          "shards": [os.path.basename(p) for p in paths],
          "skipped": skipped}
  with open(dst_prefix + ".json", "w") as f:
    json.dump(meta, f, indent=1)
  return meta


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("src_dir")
  parser.add_argument("dst_prefix")
  parser.add_argument("--shards", type=int, default=1)
  parser.add_argument("--no-verify", dest="verify", action="store_false",
                      help="copy bytes without decoding them")
  parser.add_argument("--strict", action="store_true",
                      help="fail on the first unreadable image")
  args = parser.parse_args(argv)
  meta = convert(args.src_dir, args.dst_prefix, args.shards,
                 verify=args.verify, strict=args.strict)
  print(f"wrote {meta['num_records']} records of {meta['num_classes']} "
        f"classes to {args.shards} shards at {args.dst_prefix}-*; left out "
        f"{len(meta['skipped'])} unreadable files")
  return 0


if __name__ == "__main__":
  sys.exit(main())
