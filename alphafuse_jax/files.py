"""Whole-or-nothing file writes: the one atomic-write helper of the package.

A leaf module (no project imports), so every room may use it: data and text caches below the
flow, checkpoints, results, reports and plots above it. A reader never sees a partial file: the
content goes to a temporary file in the same directory, which is renamed over the target.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from typing import Any, Callable


def atomic_write(path: str | os.PathLike[str], write: Callable[[Any], None],
                 mode: str = 'w') -> None:
  """Calls `write(f)` on a temp file beside `path`, then renames it to `path`.

  Args:
    path: the destination; its directory is created when missing.
    write: fills the open file (text for mode 'w', bytes for 'wb').
    mode: 'w' or 'wb'.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
  try:
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; results and caches are meant to be shared.
    with os.fdopen(fd, mode) as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
  """`obj` as indented, key-sorted JSON, atomically."""
  atomic_write(path, lambda f: json.dump(obj, f, indent=2, sort_keys=True))


def write_text(path: str | os.PathLike[str], text: str) -> None:
  atomic_write(path, lambda f: f.write(text))


def append_jsonl(path: str | os.PathLike[str], record: dict[str, Any]) -> None:
  """Appends one JSON line (a crash may lose the line, never corrupt earlier ones)."""
  with open(path, 'a') as f:
    f.write(json.dumps(record) + '\n')


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
  """Every record of a JSON-lines file ([] when it does not exist); blank lines skipped."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
