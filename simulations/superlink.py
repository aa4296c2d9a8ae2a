"""Start a Flower SuperLink of our own and wait until it serves.

Both launchers need one: the simulation (:mod:`simulations.flower_runner`: plain HTTP, the Ray
simulation engine) and the deployment (:mod:`simulations.deploy`: TLS, authenticated
SuperNodes). Each takes a free loopback port (:func:`free_port`) rather than Flower's fixed one,
so concurrent runs never share a SuperLink, and waits for the ``/health`` endpoint of the port
that serves Flower's APIs (:func:`healthy`) before anything dials it: a SuperLink that exits or
never answers fails at once, naming its log, instead of leaving its clients to retry.
"""

from __future__ import annotations

import contextlib
import socket
import sqlite3
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from fedshare.errors import FedShareError
from simulations.processes import spawn, stop_process, wait_until

HOST = "127.0.0.1"


def flower_bin(name: str) -> str:
    """A Flower command of this interpreter's environment (never one found elsewhere on PATH)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise FedShareError(f"{name} not found beside {sys.executable}; install the project")
    return str(path)


def free_port() -> int:
    """A TCP port of the loopback interface that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def healthy(port: int, context: ssl.SSLContext | None = None) -> bool:
    """Whether the SuperLink on ``port`` answers its health check: over HTTPS with a certificate
    ``context`` trusts when one is given, else over plain HTTP (an ``--insecure`` SuperLink)."""
    scheme = "http" if context is None else "https"
    try:
        with urllib.request.urlopen(f"{scheme}://{HOST}:{port}/health", timeout=2,
                                    context=context) as response:
            return response.status == 200
    except OSError:
        return False


def start_superlink(args: Sequence[str], port: int, log_path: Path, env: Mapping[str, str], *,
                    timeout: float, context: ssl.SSLContext | None = None,
                    cwd: Path | None = None, new_session: bool = False
                    ) -> subprocess.Popen[bytes]:
    """Start ``flower-superlink`` with ``args`` on ``port`` of the loopback interface, its output
    in ``log_path``, and return it once :func:`healthy` (with ``context``) says it serves.

    Raises :class:`FedShareError` naming ``log_path`` (and quoting its end) when the SuperLink
    exits first or is not healthy within ``timeout`` seconds; it is stopped then. With
    ``new_session`` it leads a process group of its own (see :func:`simulations.processes.spawn`).
    """
    command = [flower_bin("flower-superlink"), *args, "--host", HOST, "--port", str(port)]
    process = spawn(command, log_path, env, cwd=cwd, new_session=new_session)
    try:
        wait_until(lambda: healthy(port, context), "the SuperLink was not ready", timeout,
                   log_path, {"the SuperLink": (process, log_path)}, interval=0.3)
    except BaseException:
        stop_process(process, 15.0, group=new_session)
        raise
    return process


def scrub_database(path: Path, timeout: float = 60.0) -> None:
    """Rewrite a SuperLink's SQLite database so that no deleted message survives in its bytes.

    Flower's SuperLink deletes a run's messages but does not overwrite them: their bytes stay in
    free pages and WAL frames (the erasure audit found devices' share replies there, forgotten
    items included). ``VACUUM`` rebuilds the file without free space and a truncating
    checkpoint empties the WAL; both retry while the live SuperLink holds a lock. Raises
    :class:`FedShareError` if that does not succeed within ``timeout`` seconds.
    """
    if not path.exists():  # no SuperLink ever wrote it (connecting would create it)
        return
    deadline = time.monotonic() + timeout
    problem = "busy"
    while time.monotonic() < deadline:
        try:
            with contextlib.closing(sqlite3.connect(path, timeout=5.0,
                                                    isolation_level=None)) as db:
                db.execute("VACUUM")
                busy = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
                if not busy:
                    return
        except sqlite3.Error as exc:
            problem = str(exc)
        time.sleep(0.5)
    raise FedShareError(f"could not scrub the SuperLink database {path} ({problem})")
