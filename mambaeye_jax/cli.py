"""absl flag parsing shared by the command lines other than the trainers'.

train.py and `mambaout_train` parse the global `absl.flags.FLAGS` through
`app.run`. eval.py, `python -m mambaeye_jax.convert`,
`python -m mambaeye_jax.data.convert_arrayrecord` and the benchmark scripts
define their flags on a FlagValues of their own instead: tests import them
(eval.py even twice, under two module names, and profile_step imports
bench_model) and call `main(argv)` many times in one process, which the
global FLAGS refuses (duplicate definitions) or gets wrong (values of the
previous call stay set). The syntax is absl's all the same: --flag=value or
--flag value, --[no]bool, --flagfile=FILE; flag names keep the dashes the
docs spell (--canvas-sizes), read back as `FLAGS["canvas-sizes"].value` or,
through `namespace`, as `.canvas_sizes`."""

from __future__ import annotations

import os
import sys
import types
from typing import Sequence

from absl import flags

HELP_FLAGS = ("-h", "-?", "--help", "--helpshort", "--helpfull")


class IntListParser(flags.ListParser):
  """Comma-separated integers ("48,64") as a tuple; a clear error otherwise."""

  def __init__(self):
    super().__init__()
    self.syntactic_help = "comma-separated integers"

  def parse(self, argument):
    if isinstance(argument, (tuple, list)):
      return tuple(int(x) for x in argument)
    try:
      return tuple(int(x) for x in argument.split(",") if x.strip())
    except ValueError:
      raise ValueError(f"expected comma-separated integers, got {argument!r}") from None


class NameListParser(flags.ListParser):
  """Comma-separated names ("random,hilbert") as a tuple, blanks dropped;
  with `choices`, only those."""

  def __init__(self, choices: Sequence[str] | None = None):
    super().__init__()
    self.choices = tuple(choices) if choices else None
    self.syntactic_help = "comma-separated names"
    if self.choices:
      self.syntactic_help += " of " + ",".join(self.choices)

  def parse(self, argument):
    if isinstance(argument, (tuple, list)):
      names = tuple(argument)
    else:
      names = tuple(x.strip() for x in argument.split(",") if x.strip())
    unknown = sorted(set(names) - set(self.choices or names))
    if unknown:
      raise ValueError(f"unknown name(s) {', '.join(unknown)}; choose from "
                       f"{', '.join(self.choices)}")
    return names


def define_int_list(name, default, help_text, flag_values, **kwargs):
  """A flag of comma-separated integers, read as a tuple of ints."""
  return flags.DEFINE(IntListParser(), name, default, help_text,
                      serializer=flags.ListSerializer(","), flag_values=flag_values,
                      **kwargs)


def define_name_list(name, default, help_text, flag_values, choices=None, **kwargs):
  """A flag of comma-separated names, read as a tuple of strings."""
  return flags.DEFINE(NameListParser(choices), name, default, help_text,
                      serializer=flags.ListSerializer(","), flag_values=flag_values,
                      **kwargs)


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


def print_help(text: str) -> None:
  """Prints text (the --help) on stdout; a reader that stops early is fine."""
  try:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
  except BrokenPipeError:
    # `--help | head` closes the pipe: no traceback, and none at exit when
    # Python flushes stdout again (the recipe of the `signal` docs).
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


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


def parse_command(flag_values: flags.FlagValues, argv: Sequence[str] | None, *,
                  prog: str, usage: str, description: str,
                  positional: Sequence[str]) -> list[str] | int:
  """A command line with exactly `positional` arguments (the converters').

  argv: without the program name (None: sys.argv[1:]). Returns the
  positional arguments, or the exit status after printing: 0 for --help
  (the help on stdout), 2 for a bad command line (one `error: ...` line
  with the usage on stderr). positional: the arguments' names, for the
  message ("SRC.pt", "DST_DIR").
  """
  argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
  if wants_help(argv):
    print_help(help_text(flag_values, usage, description))
    return 0
  try:
    rest = parse(flag_values, argv, prog)
    if len(rest) != len(positional):
      raise UsageError(f"expected {' '.join(positional)}, got {len(rest)} argument(s)"
                       f"{': ' if rest else ''}{' '.join(rest)}")
  except UsageError as e:
    print(f"error: {e} (usage: {usage}; --help lists the flags)", file=sys.stderr)
    return 2
  return rest


def named_path(spec: str, default_file: str, usage: str) -> tuple[str, str]:
  """A 'NAME=PATH' argument -> (NAME, the file): a folder PATH stands for its
  `default_file`.

  Raises SystemExit naming the problem (usage, e.g. "NAME=PATH (an eval.py
  output folder or results.json)", says what was expected) when the
  argument has no NAME or PATH or the file does not exist.
  """
  name, sep, path = spec.partition("=")
  if not sep or not name or not path:
    raise SystemExit(f"give {usage}, got {spec!r}")
  if os.path.isdir(path):
    path = os.path.join(path, default_file)
  if not os.path.isfile(path):
    raise SystemExit(f"{name}: {path} does not exist")
  return name, path


def print_usage_error(prog: str, message: str) -> int:
  """One `prog: error: message` line on stderr; the exit status, 2."""
  print(f"{prog}: error: {message} ({prog} --help lists the flags)", file=sys.stderr)
  return 2


def namespace(flag_values: flags.FlagValues, **extra) -> types.SimpleNamespace:
  """The flag values as attributes, dashes as underscores (--batch-size:
  .batch_size), as argparse's Namespace had them; `extra` added."""
  values = {name.replace("-", "_"): flag_values[name].value for name in flag_values}
  return types.SimpleNamespace(**values, **extra)


def parse_args(flag_values: flags.FlagValues, argv: Sequence[str] | None, *,
               prog: str, usage: str, description: str,
               positional: str | None = None, positional_meta: str = "ARG",
               required: Sequence[str] = ()) -> types.SimpleNamespace:
  """argparse's parse_args over absl flags, for the benchmark scripts.

  argv: without the program name (None: sys.argv[1:]). --help prints the
  help and exits 0; a bad command line prints one `prog: error: ...` line
  and exits 2, as argparse did. positional: the attribute that takes the
  positional arguments (a list, one at least, positional_meta in the error);
  None: none allowed.
  required: flags that must be given.
  """
  argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
  if wants_help(argv):
    print_help(help_text(flag_values, usage, description))
    raise SystemExit(0)
  try:
    rest = parse(flag_values, argv, prog)
    for name in required:
      if flag_values[name].value is None:
        raise UsageError(f"--{name} is required")
    if positional is None and rest:
      raise UsageError(f"unexpected arguments: {' '.join(rest)}")
    if positional is not None and not rest:
      raise UsageError(f"expected one {positional_meta} at least")
  except UsageError as e:
    raise SystemExit(print_usage_error(prog, str(e))) from None
  extra = {positional: rest} if positional else {}
  return namespace(flag_values, **extra)
