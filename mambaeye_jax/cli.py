"""absl flag parsing shared by the scripts whose `main(argv)` tests call.

train.py parses the global `absl.flags.FLAGS` through `app.run`. eval.py and
`python -m mambaeye_jax.convert` define their flags on a FlagValues of their
own instead: tests import them (eval.py even twice, under two module names)
and call `main(argv)` many times in one process, which the global FLAGS
refuses (duplicate definitions) or gets wrong (values of the previous call
stay set). The syntax is absl's all the same: --flag=value or --flag value,
--[no]bool, --flagfile=FILE.
"""

from __future__ import annotations

import sys
from typing import Sequence

from absl import flags

HELP_FLAGS = ("-h", "-?", "--help", "--helpshort", "--helpfull")


class UsageError(Exception):
  """A bad command line: the script prints it as one line, exit status 2."""


def wants_help(argv: Sequence[str]) -> bool:
  """Whether argv (without the program name) asks for --help."""
  for arg in argv:
    if arg == "--":
      return False
    if arg.split("=")[0] in HELP_FLAGS:
      return True
  return False


def help_text(flag_values: flags.FlagValues, usage: str, description: str) -> str:
  """usage, description and every flag with its help and default."""
  # absl heads each module's flags with the module's name: one module here.
  lines = [line for line in flag_values.get_help(
      prefix="", include_special_flags=False).splitlines()
           if line.startswith(" ")]
  return (f"usage: {usage}\n\n{description.strip()}\n\nflags:\n" + "\n".join(lines)
          + "\n  --flagfile: read flags from a file, one a line\n")


def parse(flag_values: flags.FlagValues, argv: Sequence[str], prog: str) -> list[str]:
  """Parses argv (no program name) into flag_values from their defaults.

  Returns the positional arguments; raises UsageError naming the flag and
  the reason for an unknown flag or a bad value.
  """
  # Each call starts from the defaults, not from the previous call's values.
  flag_values.unparse_flags()
  try:
    return flag_values([prog, *argv])[1:]
  except flags.Error as e:
    raise UsageError(" ".join(str(e).split())) from e


def print_usage_error(prog: str, message: str) -> int:
  """One `prog: error: message` line on stderr; the exit status, 2."""
  print(f"{prog}: error: {message} ({prog} --help lists the flags)", file=sys.stderr)
  return 2
