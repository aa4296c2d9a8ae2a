"""Processes that Flower starts, found and stopped as a whole; the memory of a process tree.

Flower's commands start further processes (a SuperLink its SuperExec and ServerApp, a SuperNode
its SuperExec and ClientApps, ``flwr run`` nothing that outlives it), and some of them leave
the session or process group they were started in. So a deployment starts each command with
:func:`spawn` in a session of its own (its group can then be signalled as a whole:
:func:`signal_group`, :func:`stop_process`), gathers the descendants a leader has before
stopping it (:func:`descendants`, :func:`end_all`), and finally sweeps up every process whose
environment carries its :data:`MARKER` value (:func:`marked`), which survives detaching and a
dead parent alike. While waiting for what they start to be ready, the launchers give up as
soon as one of those processes exits (:func:`wait_until`) and quote its log.

:func:`tree_memory` sums the resident memory of a process tree, as the bench samples it while
the README's main job runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import NamedTuple

import psutil

from fedshare.errors import FedShareError

MARKER = "FEDSHARE_DEPLOYMENT"
"""The environment variable whose value tells a deployment's processes from all others."""


def new_marker(env: dict[str, str]) -> str:
    """Give ``env`` a :data:`MARKER` value of its own (every process started with it, and every
    process those start, inherits it) and return that value."""
    env[MARKER] = uuid.uuid4().hex
    return env[MARKER]


def spawn(command: Sequence[str], log_path: Path, env: Mapping[str, str], *,
          cwd: Path | None = None, new_session: bool = False) -> subprocess.Popen[bytes]:
    """Start ``command`` with its output (stdout and stderr) in ``log_path`` and no stdin; with
    ``new_session`` it leads a session and process group of its own, which
    :func:`stop_process` and :func:`signal_group` can then signal as a whole."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(list(command), env=dict(env), cwd=cwd, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=new_session)


def signal_group(process: subprocess.Popen[bytes], sig: int) -> None:
    """Send ``sig`` to the process group led by ``process`` (started with ``new_session``),
    unless ``process`` was already reaped: its group id could then belong to others."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)


def stop_process(process: subprocess.Popen[bytes], timeout: float, *, group: bool = True) -> None:
    """SIGTERM ``process`` (Flower's graceful exit) and, with ``group``, its process group;
    SIGKILL after ``timeout`` seconds; reap it. Group members that outlive their leader are
    left to :func:`end_all` or :func:`marked` (signalling the group of a reaped leader could
    hit a reused process group id)."""
    def send(sig: int) -> None:
        if group:
            signal_group(process, sig)
        else:
            process.send_signal(sig)  # a no-op once the process was reaped

    if process.poll() is not None:
        return
    send(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        process.wait()


def wait_until(ready: Callable[[], bool], failure: str, timeout: float, see: Path,
               watched: Mapping[str, tuple[subprocess.Popen[bytes], Path]],
               interval: float) -> None:
    """Check ``ready`` every ``interval`` seconds until it holds.

    Raises :class:`FedShareError` as soon as one of the ``watched`` processes (by name: their
    process and log) exits, naming its log, or ``failure`` ("the SuperLink was not ready")
    after ``timeout`` seconds, naming ``see``; with the end of the log where it is a file.
    Started processes fail at once, not after the whole timeout, and say why.
    """
    deadline = time.monotonic() + timeout
    while not ready():
        for name, (process, log) in watched.items():
            if process.poll() is not None:
                raise FedShareError(f"{name} exited with status {process.returncode}; "
                                    f"see {log}{_tail(log)}")
        if time.monotonic() > deadline:
            raise FedShareError(f"{failure} after {timeout:.0f} s; see {see}{_tail(see)}")
        time.sleep(interval)


def _tail(log: Path, chars: int = 500) -> str:
    """The end of a log file for an error message (a simulation's log folder is deleted with
    the run, so naming it is not enough); nothing for a folder."""
    try:
        text = log.read_text(errors="replace").strip()
    except OSError:
        return ""
    return f":\n{text[-chars:]}" if text else ""


def descendants(process: subprocess.Popen[bytes]) -> list[psutil.Process]:
    """Every process below ``process`` (none once it was reaped: its orphans belong to others
    then, and its pid may too)."""
    if process.poll() is not None:
        return []
    try:
        return psutil.Process(process.pid).children(recursive=True)
    except psutil.Error:
        return []


SERVER_APPS = ("flwr-simulation", "flwr-serverapp")
"""The processes that run a ServerApp (in a simulation, and in a deployment)."""


def server_apps(processes: Sequence[psutil.Process]) -> list[psutil.Process]:
    """Those of ``processes`` that run a ServerApp."""
    found = []
    for process in processes:
        with contextlib.suppress(psutil.Error):
            if any(name in arg for arg in process.cmdline()[:3] for name in SERVER_APPS):
                found.append(process)
    return found


def end_all(processes: Sequence[psutil.Process], timeout: float, sig: int = signal.SIGTERM
        ) -> None:
    """Send ``sig`` to each process, wait up to ``timeout`` seconds for all of them to end,
    SIGKILL the rest and wait for those as long again. Processes already gone are skipped
    (psutil refuses to signal a pid that now belongs to another process).

    ServerApps go first, with SIGKILL: a server still running while its nodes are being
    stopped would see them fail and could commit a failed round as progress, which a resumed
    run would then skip (the kill-and-resume test caught one). Its state database is built
    for a kill (every round one transaction).
    """
    servers = server_apps(processes)
    for server in servers:
        with contextlib.suppress(psutil.Error):
            server.kill()
    deadline = time.monotonic() + timeout  # gone or a zombie (its parent reaps it later)
    while any(live(server) for server in servers) and time.monotonic() < deadline:
        time.sleep(0.05)
    processes = [p for p in processes if p not in servers]
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.send_signal(sig)
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(alive, timeout=timeout)


def live(process: psutil.Process) -> bool:
    """Running (the same process, not another one with its pid), not a zombie (Flower's
    SuperExecs reap their apps only now and then)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def marked(value: str) -> list[psutil.Process]:
    """Every live process but this one whose environment has :data:`MARKER` set to ``value``."""
    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if (process.pid != os.getpid() and live(process)
                    and process.environ().get(MARKER) == value):
                found.append(process)
    return found


def marked_trees(value: str) -> list[psutil.Process]:
    """The processes marked ``value`` and every process below them (Ray starts some agents with
    an environment of its own), this one excepted."""
    found = set(marked(value))
    for process in list(found):
        with contextlib.suppress(psutil.Error):
            found.update(process.children(recursive=True))
    return [p for p in found if p.pid != os.getpid()]


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Have the kernel send ``sig`` to this process when its parent dies (Linux
    ``prctl(PR_SET_PDEATHSIG)``; elsewhere nothing): a worker or command of a launcher killed
    outright stops by itself. Run in the child (a pool initializer, a ``preexec_fn``)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(sig))  # 1: PR_SET_PDEATHSIG


def start_watchdog(marker: str) -> subprocess.Popen[bytes]:
    """A process of its own session that ends the processes marked ``marker`` if this launcher
    dies without cleaning up (:mod:`simulations.watchdog`); stop it with :func:`stop_process`
    (``group=False``) once they were ended."""
    me = psutil.Process()
    env = {k: v for k, v in os.environ.items() if k != MARKER}
    return subprocess.Popen([sys.executable, "-m", "simulations.watchdog", str(me.pid),
                             repr(me.create_time()), marker], env=env,
                            cwd=Path(__file__).resolve().parent.parent,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


@contextlib.contextmanager
def worker_pool(workers: int) -> Iterator[ProcessPoolExecutor]:
    """A process pool that never outlives its command: interrupted, its workers (and whatever
    they started) are ended at once instead of waited for; if the command is killed outright
    the kernel ends them (:func:`die_with_parent`), and what they started is stopped by its
    own watchdog."""
    before = set(multiprocessing.active_children())
    pool = ProcessPoolExecutor(max_workers=workers, initializer=die_with_parent)
    try:
        yield pool
    except BaseException:
        workers_now = [psutil.Process(p.pid) for p in multiprocessing.active_children()
                       if p not in before and p.pid is not None]
        tree = list(workers_now)
        for worker in workers_now:
            with contextlib.suppress(psutil.Error):
                tree += worker.children(recursive=True)
        pool.shutdown(wait=False, cancel_futures=True)
        end_all(tree, timeout=10.0)
        raise
    pool.shutdown(wait=True)


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP (a CI timeout, a closed terminal) interrupt like Ctrl-C while inside,
    so processes that run in sessions of their own (out of reach of the terminal's signals) are
    stopped by the ``finally`` and ``__exit__`` code they unwind through."""
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class TreeMemory(NamedTuple):
    """Resident memory of a process tree in bytes, summed over its processes."""

    rss: int
    """Resident set sizes: pages shared between processes (libraries, Ray's object store) count
    once per process, so this bounds the tree's true footprint from above."""
    pss: int
    """Proportional set sizes: each shared page split between the processes that map it."""


def tree_memory(root: int) -> TreeMemory:
    """The memory of process ``root`` and every descendant; processes that end while they are
    read (or that may not be read) count nothing, a ``root`` already gone counts nothing."""
    try:
        top = psutil.Process(root)
        tree = [top, *top.children(recursive=True)]
    except psutil.Error:
        return TreeMemory(0, 0)
    return TreeMemory(rss=_total(tree, lambda p: p.memory_info().rss),
                      pss=_total(tree, lambda p: p.memory_full_info().pss))


def _total(processes: Sequence[psutil.Process], size: Callable[[psutil.Process], int]) -> int:
    total = 0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            total += size(process)
    return total
