"""Files that a run rewrites while it goes: written whole or not at all.

`write_atomically(path, data)` writes to `path + ".tmp"`, then renames it
over `path`: a run stopped mid-write (Ctrl-C, a time limit) leaves the
previous complete file, never half of one. The evaluators' reports, which
are rewritten after every setting or canvas, and MambaOut's parameters go
through it. Local paths (os.replace), plain Python, so every layer may use it.
"""

from __future__ import annotations

import os


def write_atomically(path: str | os.PathLike, data: str | bytes) -> None:
  """Replaces `path` with `data` (text, or bytes) in one rename."""
  tmp = f"{os.fspath(path)}.tmp"
  with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
    f.write(data)
  os.replace(tmp, path)
