"""Launch the FedShare Flower app as a local simulation and wait for it to finish.

``flwr run`` submits the app (this repository) to a SuperLink in simulation mode; the Ray
simulation engine then runs the ServerApp and the virtual SuperNodes. This wrapper starts a
private SuperLink on a free port for each run (so concurrent runs never share one), sets the
offline settings (no runtime dependency installation, no telemetry, no update check) and a
private ``FLWR_HOME``, streams the logs to a file, passes the FedShare progress lines to a
callback, and stops the SuperLink when the run ends.

Scale-out is Ray's: with ``ray_address`` (a cluster started with ``ray start --head`` and joined
with ``ray start --address=...``) the SuperLink's simulation engine calls ``ray.init()`` with
``RAY_ADDRESS`` set, so it attaches to that cluster instead of starting a local one, and Flower's
actor pool (one actor per ``client-resources-num-cpus`` of the cluster's CPUs) spreads the virtual
SuperNodes over every node of it. An exported ``RAY_ADDRESS`` counts as given; otherwise the run
uses a Ray instance of its own (``RAY_ADDRESS=local``), never one it happens to detect.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from fedshare.errors import FedShareError
from fedshare.federated.rounds import PROGRESS
from simulations.processes import (
    end_all,
    marked_trees,
    new_marker,
    start_watchdog,
    stop_process,
)
from simulations.superlink import HOST, flower_bin, free_port, start_superlink

REPO_ROOT = Path(__file__).resolve().parent.parent
STARTUP = 300.0
"""Seconds from the launch until the ServerApp's first progress line (its share round) at most;
a run takes some 10-20 s to get there on a 2-core machine."""


def toml_value(value: Any) -> str:
    """A TOML scalar (strings via JSON escaping, which TOML basic strings accept)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def write_toml(path: Path, values: Mapping[str, Any]) -> None:
    path.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in values.items()))


@contextlib.contextmanager
def private_superlink(home: Path, env: dict[str, str], startup: float = 60.0
                      ) -> Iterator[str]:
    """A simulation SuperLink of our own on a free port, stopped on exit.

    Flower's managed local SuperLink listens on one fixed port and is shared by every ``flwr
    run`` on the machine: a second run would borrow it and lose it when the first stops it.
    Yields the connection name written to ``home/config.toml``.
    """
    port = free_port()
    process = start_superlink(["--insecure", "--simulation", "--isolation", "subprocess",
                               "--log-file", str(home / "superlink.log")],
                              port, home / "superlink.out", env, timeout=startup)
    try:
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "fedshare"\n\n[superlink.fedshare]\n'
            f'address = "{HOST}:{port}"\ninsecure = true\n')
        yield "fedshare"
    finally:
        stop_process(process, 15.0, group=False)


def flower_env(flwr_home: Path) -> dict[str, str]:
    env = os.environ.copy()
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env.update(FLWR_HOME=str(flwr_home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
               RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0", PYTHONWARNINGS="ignore")
    return env


def check_ray_address(address: str, timeout: float = 5.0) -> None:
    """Fail at once, in one line, when nothing answers at a named ``host:port`` Ray address
    (``ray.init()`` would otherwise retry for a minute or more before the run could start)."""
    if address in ("local", "auto") or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return
    except (OSError, ValueError) as exc:
        raise FedShareError(f"no Ray cluster answers at {address} ({exc})") from None


def run_flower(run_config: Mapping[str, Any], num_supernodes: int, log_path: Path,
               on_progress: Callable[[str], None] | None = None, timeout: float = 6 * 3600,
               ray_address: str | None = None, startup: float = STARTUP) -> None:
    """Run the app with ``run_config`` on ``num_supernodes`` virtual nodes (1 CPU each),
    on a local Ray instance or on the Ray cluster at ``ray_address``.

    Raises :class:`FedShareError` when the run fails, or when its ServerApp has not begun its
    share round ``startup`` seconds after the launch (its engine could not start or reach its
    cluster, its nodes did not connect); its logs stay in ``log_path``.
    """
    flwr = flower_bin("flwr")
    # Without an address, a private local Ray: ray.init() would otherwise attach to any
    # cluster it detects on this machine (a `ray start` left running, another test's).
    address = ray_address or os.environ.get("RAY_ADDRESS") or "local"
    check_ray_address(address)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    late = threading.Event()
    with tempfile.TemporaryDirectory(prefix="fedshare-flwr-") as tmp:
        home = Path(tmp)
        env = flower_env(home)
        marker = new_marker(env)  # every process of the run carries it, Ray's included
        env["RAY_ADDRESS"] = address
        overrides = home / "run-config.toml"
        # Simulated nodes draw new ids in every run and prove nothing: no user binding.
        write_toml(overrides, {"bind-users": False, **run_config})
        watchdog = start_watchdog(marker)
        try:
            with private_superlink(home, env) as connection:
                command = [flwr, "run", str(REPO_ROOT), connection, "--run-config",
                           str(overrides), "--federation-config",
                           f"num-supernodes={num_supernodes} client-resources-num-cpus=1",
                           "--stream"]
                try:
                    # line-buffered: a launcher killed outright leaves its log up to then
                    with open(log_path, "w", buffering=1) as log, subprocess.Popen(
                            command, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=REPO_ROOT) as process:
                        assert process.stdout is not None
                        started = threading.Event()
                        timer = threading.Timer(startup, _give_up, (process, started, late))
                        timer.daemon = True
                        timer.start()
                        try:
                            for line in process.stdout:
                                log.write(line)
                                if PROGRESS in line:
                                    started.set()
                                    if on_progress is not None:
                                        on_progress(line.split(PROGRESS, 1)[1].strip())
                            code = process.wait(timeout=timeout)
                        finally:
                            timer.cancel()
                finally:  # however the run ended (an interrupt too), while the SuperLink still
                    # holds its process tree together: none of the run's processes outlives it
                    end_all(marked_trees(marker), timeout=10.0)
        finally:
            stop_process(watchdog, 5.0, group=False)
    if late.is_set():
        raise FedShareError(f"the simulation had not started {startup:.0f} s after the launch "
                            "(its Ray engine could not start or reach its cluster, or its nodes "
                            f"did not connect); see {log_path}")
    if code != 0:
        raise FedShareError(f"flwr run failed with exit status {code}; see {log_path}")


def _give_up(process: subprocess.Popen[str], started: threading.Event,
             late: threading.Event) -> None:
    """The start-up deadline passed: unless the run has started, stop it (the caller then
    ends the rest of its processes)."""
    if not started.is_set():
        late.set()
        process.terminate()
