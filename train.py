r"""Trains MambaEye: a thin command line over mambaeye_jax.train_lib.

    python train.py --config configs/synthetic.py --workdir /tmp/mambaeye_synth
    python train.py --config configs/mambaeye_tiny_i1k.py:tfds --workdir gs://... \
        --config.global_batch_size=512 --config.model.remat=True

Every config field can be overridden with --config.<field>=value; a field
that does not exist is an error. Re-running with the same --workdir resumes
from its latest checkpoint. SIGTERM or Ctrl-C saves a checkpoint and exits.
An error is one line naming the field or file and the reason, exit status
1; --verbose prints the full traceback instead. --help lists every config
field with its default.

Multi-host: start one process per host with --coordinator_address host:port,
--num_processes and --process_id (or MAMBAEYE_COORDINATOR,
MAMBAEYE_NUM_PROCESSES, MAMBAEYE_PROCESS_ID; or MAMBAEYE_DISTRIBUTED=auto on
clusters JAX detects itself, such as TPU pods and SLURM).
"""

from __future__ import annotations

import logging
import os
import re
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file (configs/<name>.py[:arg]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and the final model.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 for multi-host runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-host run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_VERBOSE = flags.DEFINE_bool("verbose", False,
                             "On an error, print the full traceback instead of one line.")
flags.mark_flags_as_required(["config", "workdir"])

_HELP_FLAGS = ("-h", "-?", "--help", "--helpshort", "--helpfull", "--helpxml")


class CliError(Exception):
  """A user error the command line reports as its one line."""


def config_field_listing() -> str:
  """The --help text of every config field, one "name = default" a line."""
  from mambaeye_jax import train_lib  # pylint: disable=g-import-not-at-top
  fields = train_lib.config_fields()
  width = max(len(n) for n in fields)
  lines = ["", "Config fields (override with --config.<name>=<value>; defaults of",
           "mambaeye_jax.train_lib.default_config(), which a config file may change):"]
  lines += [f"  {name:<{width}} = {value!r}" for name, value in fields.items()]
  # absl formats the module docstring with %: keep any % literal.
  return "\n".join(lines).replace("%", "%%") + "\n"


def _flag_value(argv: list[str], name: str) -> str | None:
  """The value of --name=value or --name value in argv (the last one)."""
  value = None
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      value = arg.split("=", 1)[1]
    elif arg == f"--{name}" and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def check_command_line(argv: list[str]) -> None:
  """Catches a missing config file and misspelt --config.<field> before parsing.

  ml_collections parses overrides into the loaded config and raises a bare
  AttributeError for a misspelt top-level field; names are checked here
  against default_config(), which every config file starts from.

  Raises:
    CliError: naming the file or the field, with the valid field names.
  """
  path = _flag_value(argv, "config")
  if path is not None:
    path = path.split(":", 1)[0]
    if not os.path.isfile(path):
      raise CliError(f"config file {path!r} does not exist (--config takes "
                     "configs/<name>.py[:arg])")
  names = [m.group(1) for m in (re.match(r"--config\.([\w.]+)", a) for a in argv) if m]
  if not names:
    return
  from mambaeye_jax import train_lib  # pylint: disable=g-import-not-at-top
  known = list(train_lib.config_fields())
  for name in names:
    if name not in known and not any(k.startswith(name + ".") for k in known):
      raise CliError(train_lib.unknown_field_message(name, known))


def _parse_flags(argv: list[str]) -> list[str]:
  check_command_line(argv)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    raise CliError(str(e)) from e
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    raise CliError(f"bad --config override: {_text(e)}") from e


class _QuietLibraries(logging.Filter):
  """Drops orbax's INFO chatter (dozens of lines per checkpoint)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Imported here so that --help stays fast and JAX starts after the flags.
  from mambaeye_jax import sharding  # pylint: disable=g-import-not-at-top
  from mambaeye_jax import train_lib  # pylint: disable=g-import-not-at-top
  try:
    config = _CONFIG.value
  except Exception as e:  # pylint: disable=broad-except
    raise CliError(f"cannot load config file {config_flags.get_config_filename(flags.FLAGS['config'])!r}: "
                   f"{_text(e)}") from e
  train_lib.validate_config(config)  # Before any device or distributed start.
  sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  logging.getLogger().setLevel(logging.INFO)
  for handler in logging.getLogger().handlers:
    handler.addFilter(_QuietLibraries())
  train_lib.train_and_evaluate(config, _WORKDIR.value)


def _text(error: BaseException) -> str:
  """An exception's message on one line (KeyError's without its quotes)."""
  message = error.args[0] if isinstance(error, KeyError) and error.args else error
  return " ".join(str(message).split()) or type(error).__name__


# Errors whose message already names the thing and the reason.
_USER_ERRORS = (CliError, ValueError, OSError, FloatingPointError, app.UsageError)


def error_line(error: BaseException) -> str:
  """The one line train.py prints for an error."""
  if isinstance(error, _USER_ERRORS):
    return f"error: {_text(error)}"
  from mambaeye_jax.data import sources  # pylint: disable=g-import-not-at-top
  if isinstance(error, sources.TooManyBadRecordsError):
    return f"error: {_text(error)}"
  return f"error: {type(error).__name__}: {_text(error)} (--verbose prints the traceback)"


def run(argv: list[str]) -> int:
  """train.py's entry point: app.run with errors as one line; the exit status."""
  verbose = any(re.fullmatch(r"--verbose(=(true|True|1))?", a) for a in argv)
  if any(a in _HELP_FLAGS or a.split("=")[0] in _HELP_FLAGS for a in argv):
    sys.modules["__main__"].__doc__ = (sys.modules["__main__"].__doc__ or "") + \
        config_field_listing()
  try:
    app.run(main, argv=argv, flags_parser=_parse_flags)
  except SystemExit as e:
    return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
  except KeyboardInterrupt:
    if verbose:
      raise
    print("error: interrupted (a second Ctrl-C stops without saving)", file=sys.stderr)
    return 130
  except Exception as e:  # pylint: disable=broad-except
    if verbose:
      raise
    print(error_line(e), file=sys.stderr, flush=True)
  else:
    return 0
  # Only now: the error's traceback held the data workers' last batches
  # (frames of the loop), so the release in train_and_evaluate's `finally`
  # could not free them, and the exit would report leaked shared memory.
  from mambaeye_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  pipeline.release_shared_memory()
  return 1


if __name__ == "__main__":
  sys.exit(run(sys.argv))
