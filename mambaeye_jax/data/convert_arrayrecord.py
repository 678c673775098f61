"""Converts an image folder (root/<class>/<image>) into ArrayRecord shards.

    python -m mambaeye_jax.data.convert_arrayrecord SRC_DIR DST_PREFIX --shards N

Writes DST_PREFIX-00000-of-0000N.array_record ... (records as
`arrayrecord.encode_record`: the image file's bytes unchanged, its label and its
path relative to SRC_DIR) and DST_PREFIX.json (class names, counts). Records
are spread round-robin over the shards in the folder's sorted order, so
shard i holds records i, i + N, ...; read them back with
`arrayrecord.ArrayRecordSource("DST_PREFIX-*")` or source="arrayrecord",
path="DST_PREFIX-*".

Bad files are checked here, once, rather than at every epoch: every image
is decoded (unless --no-verify); unreadable ones are left out and
listed in DST_PREFIX.json under "skipped" (with --strict the conversion
stops at the first one instead). Flags parse as absl's; a bad command line
is one `error: ...` line, exit status 2.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import types

from absl import flags
from array_record.python import array_record_module

from mambaeye_jax import cli
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


_PROG = "python -m mambaeye_jax.data.convert_arrayrecord"
_USAGE = f"{_PROG} SRC_DIR DST_PREFIX [--shards N] [--no-verify] [--strict]"

# Flags of this command only (mambaeye_jax.cli says why not absl's global
# FLAGS); SRC_DIR and DST_PREFIX are absl's leftover positional arguments.
FLAGS = flags.FlagValues()
flags.DEFINE_integer("shards", 1, "number of output shards", lower_bound=1,
                     flag_values=FLAGS)
# "no-verify", not a "verify" bool: absl would spell its negation --noverify.
flags.DEFINE_bool("no-verify", False, "copy bytes without decoding them",
                  flag_values=FLAGS)
flags.DEFINE_bool("strict", False, "fail on the first unreadable image",
                  flag_values=FLAGS)


def main(argv=None) -> int:
  """The command line (argv without the program name); the exit status."""
  positional = cli.parse_command(FLAGS, argv, prog=_PROG, usage=_USAGE, description=__doc__,
                                 positional=("SRC_DIR", "DST_PREFIX"))
  if isinstance(positional, int):  # --help, or a bad command line: printed.
    return positional
  args = types.SimpleNamespace(src_dir=positional[0], dst_prefix=positional[1],
                               shards=FLAGS.shards, verify=not FLAGS["no-verify"].value,
                               strict=FLAGS.strict)
  meta = convert(args.src_dir, args.dst_prefix, args.shards,
                 verify=args.verify, strict=args.strict)
  print(f"wrote {meta['num_records']} records of {meta['num_classes']} "
        f"classes to {args.shards} shards at {args.dst_prefix}-*; left out "
        f"{len(meta['skipped'])} unreadable files")
  return 0


if __name__ == "__main__":
  sys.exit(main())
