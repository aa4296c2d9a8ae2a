"""One writer per run folder: the ServerApp holds an exclusive lease on the folder it writes.

The lease is an advisory ``flock`` on ``RUN_DIR/.lease``, taken without waiting. The kernel
releases it when the holder's file is closed, which includes the holder being killed (SIGKILL,
the OOM killer): a crashed server's lease is free at once, with nothing to clean up by hand,
while a server that still runs (an orphan whose launcher died, say) keeps it. The file holds the
holder's pid, for the error message only. Choice: ``flock`` rather than a pid file or a timed
lease, because "the holder is dead" is then decided by the kernel, not guessed from a pid that
may have been reused or a clock; it covers servers on one machine (a run folder on a network
file system shared by several machines would need a lease with a timeout).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from types import TracebackType

from fedshare.errors import FedShareError

LEASE = ".lease"


class RunLease:
    """``with RunLease(folder):`` the block runs as the folder's only writer, or not at all."""

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / LEASE
        self._fd: int | None = None

    def acquire(self) -> RunLease:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise FedShareError(f"{self.path.parent} is in use by another writer (pid {holder}); "
                                "wait for it to finish or stop it first") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the file releases the lock
            self._fd = None

    def __enter__(self) -> RunLease:
        return self.acquire()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.release()


def ensure_free(folder: str | Path) -> None:
    """Refuse (one :class:`FedShareError` line) when a live server holds ``folder``'s lease."""
    with RunLease(folder):
        pass
