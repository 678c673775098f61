r"""Trains MambaEye: a thin command line over mambaeye_jax.train_lib.

    python train.py --config configs/synthetic.py --workdir /tmp/mambaeye_synth
    python train.py --config configs/mambaeye_tiny_i1k.py:tfds --workdir gs://... \
        --config.global_batch_size=512 --config.model.remat=True

Every config field can be overridden with --config.<field>=value; a field
that does not exist is an error. Re-running with the same --workdir resumes
from its latest checkpoint. SIGTERM or Ctrl-C saves a checkpoint and exits.

Multi-host: start one process per host with --coordinator_address host:port,
--num_processes and --process_id (or MAMBAEYE_COORDINATOR,
MAMBAEYE_NUM_PROCESSES, MAMBAEYE_PROCESS_ID; or MAMBAEYE_DISTRIBUTED=auto on
clusters JAX detects itself, such as TPU pods and SLURM).
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

# The repository root, so config files can import `configs.*` helpers.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file (configs/<name>.py[:arg]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and the final model.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 for multi-host runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-host run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])


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
  sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  logging.getLogger().setLevel(logging.INFO)
  for handler in logging.getLogger().handlers:
    handler.addFilter(_QuietLibraries())
  train_lib.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
