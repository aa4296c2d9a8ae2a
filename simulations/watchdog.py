"""Stops a run's processes when the launcher that started them is gone.

``fedshare run`` marks every process it starts (and every process those start: the SuperLink,
SuperExec, the simulation, Ray's daemons and workers inherit the environment) with a value of
:data:`simulations.processes.MARKER`, and starts this watchdog in a session of its own. If the
launcher dies without a chance to clean up (SIGKILL, the OOM killer, a crashed terminal), the
watchdog sees its pid gone (or reused: the start time is compared) within ``POLL`` seconds and
ends every marked process and every process below them (Ray starts some agents with an
environment of their own); a launcher that ends normally stops the watchdog itself. Only the
run's processes are touched: other children of the launcher (a library caller's own, say) are
not.

Usage: ``python -m simulations.watchdog PARENT_PID PARENT_START_TIME MARKER``.
"""

from __future__ import annotations

import sys
import time

import psutil

from simulations.processes import end_all, marked_trees

POLL = 0.5  # seconds between two looks at the launcher


def alive(pid: int, started: float) -> bool:
    try:
        process = psutil.Process(pid)
        return process.create_time() == started and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def main(argv: list[str]) -> int:
    pid, started, marker = int(argv[0]), float(argv[1]), argv[2]
    while alive(pid, started):
        time.sleep(POLL)
    end_all(marked_trees(marker), timeout=10.0)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
