"""A table command with a pool of workers stops whole: SIGTERM (or SIGHUP, SIGINT) ends its
workers at once rather than waiting for their cells, exit status 130; SIGKILL of the command
leaves the kernel to end them (parent-death signal). Stopping ``fedshare run`` in every phase
is tested in tests/test_kill_and_resume.py."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from synthetic import tiny_prepared

from simulations.processes import live

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["term", "kill"])
def test_a_stopped_learning_table_leaves_no_worker(tmp_path, sig):
    folder = tiny_prepared().save(tmp_path / "tiny")
    command = [sys.executable, "-m", "simulations.cli", "learning-table", "--seeds", "0",
               "--workers", "2", "--out", str(tmp_path / "tables"),
               "--set", f"prepared={folder}", "--set", "rounds=100000", "--set", "dim=8"]
    launcher = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    workers: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 120
        while len(workers) < 2:
            assert launcher.poll() is None and time.monotonic() < deadline
            workers = psutil.Process(launcher.pid).children(recursive=True)
            time.sleep(0.2)
        time.sleep(3)  # the cells are running
        launcher.send_signal(sig)
        code = launcher.wait(timeout=30)
        sent = time.monotonic()
        while any(live(w) for w in workers) and time.monotonic() < sent + 20:
            time.sleep(0.2)
        assert not any(live(w) for w in workers), "workers outlived the command"
        print(f"{sig.name}: {len(workers)} workers gone {time.monotonic() - sent:.1f} s after "
              "the command")
    finally:
        if launcher.poll() is None:
            launcher.kill()
        for worker in workers:
            if live(worker):
                worker.kill()
    if sig == signal.SIGTERM:
        assert code == 130
