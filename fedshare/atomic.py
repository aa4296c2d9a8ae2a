"""Files that are either absent or complete: every output of a run is written through here.

A crash (or a SIGKILL) while writing leaves the previous file, never half a new one: the
content goes to a temporary file beside the target, is flushed to disk, then renamed onto it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

import numpy as np

from fedshare.errors import FedShareError

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: results are shared files, made with the user's usual mode


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
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 would hide results from others
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_data_folder(folder: Path, arrays_name: str, arrays: dict[str, np.ndarray],
                      meta: dict) -> Path:
    """A data folder (``meta.json`` and a compressed ``arrays_name``) that appears only when
    complete: written beside ``folder`` and renamed onto it. Refuses an existing folder."""
    folder = Path(folder)
    if folder.exists():
        raise FedShareError(f"{folder} already exists; choose a new folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        np.savez_compressed(tmp / arrays_name, **arrays)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def read_data_folder(folder: Path, arrays_name: str, what: str
                     ) -> tuple[dict, dict[str, np.ndarray]]:
    """``meta.json`` (a JSON object) and the arrays of a folder :func:`write_data_folder`
    wrote; a missing or corrupt one is a one-line :class:`FedShareError` naming ``what``."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / "meta.json").read_text())
        with np.load(folder / arrays_name, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError as exc:
        raise FedShareError(f"{folder} is not a {what} folder ({exc.filename} missing)"
                            ) from None
    except (json.JSONDecodeError, ValueError, OSError, zipfile.BadZipFile):
        raise FedShareError(f"{folder} holds a corrupt {what} file") from None
    if not isinstance(meta, dict):
        raise FedShareError(f"{folder}/meta.json is not a JSON object")
    return meta, arrays
