"""Leaf fields of an ml_collections config, and the message for a typo.

Both trainers (train_lib for MambaEye, mambaout_train for the baseline)
validate their configs by name before any work and list the fields in
their command lines' help; this is the one implementation of both.
"""

from __future__ import annotations

import difflib

import ml_collections


def leaf_fields(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, object]:
  """Every leaf field of `config` -> its value.

  Names are dotted paths ("optim.learning_rate", "data.augment.erase_prob"),
  in the config's order.
  """
  out = {}
  for name, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.update(leaf_fields(value, f"{prefix}{name}."))
    else:
      out[f"{prefix}{name}"] = value
  return out


def unknown_field_message(name: str, known: list[str], help_hint: str = "") -> str:
  """"config field 'x' does not exist; did you mean ...?" with the valid names.

  Args:
    name: the dotted name that does not exist (e.g. "lerning_rate").
    known: every valid dotted name.
    help_hint: appended in parentheses, e.g. "train.py --help lists them all".
  """
  parent, _, leaf = name.rpartition(".")
  # A top-level typo of a nested field ("lerning_rate") matches on the last
  # part of the name ("optim.learning_rate"); a nested one on the whole name.
  guesses = difflib.get_close_matches(name, known, n=3, cutoff=0.75)
  by_leaf = {k.rpartition(".")[2]: k for k in known}
  guesses += [by_leaf[g] for g in difflib.get_close_matches(leaf, list(by_leaf), n=3,
                                                             cutoff=0.75)]
  guesses = list(dict.fromkeys(guesses))[:3]
  hint = f"; did you mean {' or '.join(repr(g) for g in guesses)}?" if guesses else ";"
  siblings = sorted({k[len(parent) + 1:].split(".")[0] if parent else k.split(".")[0]
                     for k in known if not parent or k.startswith(parent + ".")})
  where = f"fields of {parent}" if parent and siblings else "top-level fields"
  if parent and not siblings:
    siblings = sorted({k.split(".")[0] for k in known})
  suffix = f" ({help_hint})" if help_hint else ""
  return f"config field {name!r} does not exist{hint} valid {where}: {', '.join(siblings)}{suffix}"
