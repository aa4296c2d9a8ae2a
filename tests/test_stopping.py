"""A Flower run stopped from outside leaves no process behind: SIGTERM (and SIGHUP, SIGINT)
make the launcher stop everything it started, Flower's and Ray's processes included; after a
SIGKILL, which gives it no chance, its watchdog does. The run folder stays resumable."""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from synthetic import tiny_prepared

from fedshare.run_lease import ensure_free
from simulations.experiment import resume_settings

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _round(state: Path) -> int:
    if not state.exists():
        return 0
    with contextlib.closing(sqlite3.connect(f"file:{state}?mode=ro", uri=True,
                                            timeout=5)) as db, contextlib.suppress(sqlite3.Error):
        row = db.execute("SELECT value FROM meta WHERE key = 'round'").fetchone()
        return int(row[0]) if row else 0
    return 0


def _alive(processes: set[psutil.Process]) -> list[str]:
    alive = []
    for process in processes:
        with contextlib.suppress(psutil.Error):
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{process.pid} {' '.join(process.cmdline()[:3])}")
    return alive


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["term", "kill"])
def test_a_stopped_run_leaves_no_process(tmp_path, sig):
    folder = tiny_prepared().save(tmp_path / "tiny")
    command = [sys.executable, "-m", "simulations.cli", "run", "--out", str(tmp_path / "runs")]
    for setting in (f"prepared={folder}", "rounds=500", "eval-every=1000", "fraction=0.5",
                    "dim=8", "server-steps=1", "local-epochs=1"):
        command += ["--set", setting]
    launcher = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    seen: set[psutil.Process] = set()
    deadline = time.monotonic() + 240
    try:
        while True:
            assert launcher.poll() is None, "the run ended before it was stopped"
            assert time.monotonic() < deadline, "the run did not reach round 2"
            with contextlib.suppress(psutil.Error):
                seen |= set(psutil.Process(launcher.pid).children(recursive=True))
            states = list((tmp_path / "runs").glob("*/state.db"))
            if states and _round(states[0]) >= 2:
                break
            time.sleep(0.2)
        assert any("ray" in " ".join(p.cmdline()) for p in seen if p.is_running())
        launcher.send_signal(sig)
        launcher.wait(timeout=60)
        stopped = time.monotonic()
        while _alive(seen) and time.monotonic() < stopped + 30:
            time.sleep(0.5)
        assert not _alive(seen), f"left running {time.monotonic() - stopped:.0f} s after " \
                                 f"{sig.name}: {_alive(seen)}"
        print(f"{sig.name}: {len(seen)} processes, all ended {time.monotonic() - stopped:.1f} s "
              "after the launcher")
    finally:
        if launcher.poll() is None:
            launcher.kill()
        for process in seen:
            with contextlib.suppress(psutil.Error):
                process.kill()
    if sig == signal.SIGTERM:
        assert launcher.returncode == 130
    out = states[0].parent
    ensure_free(out)  # no server holds the folder any more
    assert resume_settings(out, ["rounds=3"]).config.rounds == 3  # and it can be resumed
