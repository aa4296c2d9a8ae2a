"""Fetch a published dataset archive into a local cache, verified by checksum.

Used only where no local copy exists and a network does; tests never reach it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from fedshare.errors import FedShareError


def cache_dir() -> Path:
    """Where downloaded datasets live: ``$FEDSHARE_DATA`` or ``~/.cache/fedshare``."""
    return Path(os.environ.get("FEDSHARE_DATA", Path.home() / ".cache" / "fedshare"))


def file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(url: str, target: Path, md5: str | None = None) -> Path:
    """Download ``url`` to ``target`` atomically; check ``md5`` when the publisher gives one.

    Without a published checksum (the Amazon 2018 files) the SHA-256 of the first download is
    written beside the file and checked on every later use (trust on first use).
    """
    if target.exists():
        _check(target, md5)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, suffix=".part")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
            while block := response.read(1 << 20):
                out.write(block)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise FedShareError(f"cannot download {url}: {exc}") from None
    if md5 is not None and file_digest(tmp, "md5") != md5:
        tmp.unlink(missing_ok=True)
        raise FedShareError(f"checksum mismatch for {url}: the download is corrupt or changed")
    os.replace(tmp, target)
    if md5 is None:
        target.with_name(target.name + ".sha256").write_text(file_digest(target, "sha256"))
    return target


def _check(path: Path, md5: str | None) -> None:
    if md5 is not None:
        ok = file_digest(path, "md5") == md5
    else:
        recorded = path.with_name(path.name + ".sha256")
        ok = not recorded.exists() or recorded.read_text().strip() == file_digest(path, "sha256")
    if not ok:
        raise FedShareError(f"cached file {path} fails its checksum; delete it to download again")


def extract_zip(archive: Path, into: Path) -> None:
    """Unpack ``archive`` under ``into`` (a GroupLens zip holds one top-level folder)."""
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(into)
    except zipfile.BadZipFile:
        raise FedShareError(f"{archive} is not a valid zip archive") from None
