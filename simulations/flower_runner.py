"""Launch the FedShare Flower app as a local simulation and wait for it to finish.

``flwr run`` submits the app (this repository) to a local SuperLink, which it starts in the
background when none answers; the Ray simulation engine then runs the ServerApp and the virtual
SuperNodes. This wrapper sets the offline settings (no runtime dependency installation, no
telemetry, no update check), a private ``FLWR_HOME``, streams the logs to a file and passes the
FedShare progress lines to a callback, and stops the SuperLink again if it started one.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fedshare.errors import FedShareError

REPO_ROOT = Path(__file__).resolve().parent.parent
PROGRESS = "fedshare-progress"
SUPERLINK_HEALTH = "http://127.0.0.1:39091/health"  # Flower's managed local SuperLink


def toml_value(value: Any) -> str:
    """A TOML scalar (strings via JSON escaping, which TOML basic strings accept)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def write_toml(path: Path, values: Mapping[str, Any]) -> None:
    path.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in values.items()))


def _superlink_running() -> bool:
    try:
        with urllib.request.urlopen(SUPERLINK_HEALTH, timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def _stop_processes_mentioning(text: str, wait: float = 15.0) -> None:
    """Stop the SuperLink this run started (its command line names our FLWR_HOME) and wait
    until it is gone, so that the next run starts its own."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline and "flower-superlink" in cmdline:
            with contextlib.suppress(OSError):
                os.kill(int(proc.name), signal.SIGTERM)
                pids.append(int(proc.name))
    deadline = time.monotonic() + wait
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if Path(f"/proc/{p}").exists()
                and "zombie" not in _state(p)]
        time.sleep(0.2)
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    while _superlink_running() and time.monotonic() < deadline + 5:
        time.sleep(0.2)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "zombie"


def flower_env(flwr_home: Path) -> dict[str, str]:
    env = os.environ.copy()
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env.update(FLWR_HOME=str(flwr_home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
               RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0", PYTHONWARNINGS="ignore")
    return env


def run_flower(run_config: Mapping[str, Any], num_supernodes: int, log_path: Path,
               on_progress: Callable[[str], None] | None = None, timeout: float = 6 * 3600,
               ) -> None:
    """Run the app with ``run_config`` on ``num_supernodes`` virtual nodes (1 CPU each).

    Raises :class:`FedShareError` when the run fails; its logs stay in ``log_path``.
    """
    flwr = Path(sys.executable).parent / "flwr"
    if not flwr.exists():
        raise FedShareError(f"flwr not found beside {sys.executable}; install the project")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fedshare-flwr-") as home:
        overrides = Path(home) / "run-config.toml"
        write_toml(overrides, run_config)
        started_here = not _superlink_running()
        command = [str(flwr), "run", str(REPO_ROOT), "--run-config", str(overrides),
                   "--federation-config",
                   f"num-supernodes={num_supernodes} client-resources-num-cpus=1", "--stream"]
        try:
            with open(log_path, "w") as log, subprocess.Popen(
                    command, env=flower_env(Path(home)), stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT, text=True, cwd=REPO_ROOT) as process:
                assert process.stdout is not None
                for line in process.stdout:
                    log.write(line)
                    if on_progress is not None and PROGRESS in line:
                        on_progress(line.split(PROGRESS, 1)[1].strip())
                code = process.wait(timeout=timeout)
        finally:
            if started_here:
                _stop_processes_mentioning(home)
    if code != 0:
        raise FedShareError(f"flwr run failed with exit status {code}; see {log_path}")
