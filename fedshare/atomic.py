"""Files that are either absent or complete: every output of a run is written through here.

A crash (or a SIGKILL) while writing leaves the previous file, never half a new one: the
content goes to a temporary file beside the target, is flushed to disk, then renamed onto it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def write_json(path: Path, payload: dict) -> None:
    """Write ``payload`` so that ``path`` is either absent or complete."""
    write_atomically(path, lambda fh: json.dump(payload, fh, indent=2), "w")


def write_atomically(path: Path, write: Callable[[IO], object], mode: str = "wb") -> None:
    """``write(file)`` beside ``path``, flushed to disk, then renamed onto it: ``path`` is
    either the old file or the complete new one, never half a file, even after a crash."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
