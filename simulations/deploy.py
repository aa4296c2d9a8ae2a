"""Run the FedShare Flower app as a real deployment on this machine, over TLS with authenticated
SuperNodes, and stop everything it started.

A simulation (:mod:`simulations.flower_runner`) runs virtual nodes inside one SuperLink; here
every SuperNode is its own ``flower-supernode`` process that connects to the SuperLink's Fleet
API over HTTPS (checked against our own CA) and proves who it is with an EC key whose public
half was registered beforehand (``--enable-supernode-auth``). The steps are those of a
deployment on real machines; only the addresses are loopback ones:

1. :func:`simulations.credentials.make_credentials`: a CA, the SuperLink's server certificate
   and one OpenSSH EC key pair per SuperNode;
2. :class:`Deployment`: a SuperLink on a free port (:mod:`simulations.superlink`; Flower 1.42
   serves the Fleet, Control and Runtime APIs over one HTTPS port), a private ``FLWR_HOME``
   whose ``config.toml`` names the connection :data:`CONNECTION`, ``flwr supernode register``
   for every public key, one SuperNode per node config, then ``flwr run`` of this repository;
3. :func:`deploy`: all of it for one run, as ``fedshare deploy`` does.

Every process the deployment starts (and every process those start: the SuperLink's SuperExec
and ServerApp, the SuperNodes' SuperExecs and ClientApps, the ``flwr`` CLI calls) carries the
environment variable :data:`simulations.processes.MARKER` with a value of its own, so
:meth:`Deployment.stop` finds and stops them even when Flower detached them into sessions of
their own or their parent died (:mod:`simulations.processes`).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import psutil

from fedshare.errors import FedShareError
from simulations.credentials import Credentials, make_credentials
from simulations.flower_runner import REPO_ROOT, flower_env, toml_value, write_toml
from simulations.processes import (
    descendants,
    end_all,
    marked,
    new_marker,
    server_apps,
    signal_group,
    signals_interrupt,
    spawn,
    start_watchdog,
    stop_process,
    wait_until,
)
from simulations.superlink import HOST, flower_bin, free_port, scrub_database, start_superlink

CONNECTION = "fedshare-tls"
NodeConfig = Mapping[str, str | int | float | bool]
_KEY = re.compile(r"^[A-Za-z0-9_.-]+$")
_STARTED_RUN = re.compile(r"Successfully started run (\d+)")
TIMED_OUT = 124  # what run() returns when the run outlived its timeout (as coreutils timeout)


# ------------------------------------------------------------------------------ node config
def render_node_config(config: NodeConfig) -> str:
    """Flower's ``--node-config`` syntax (``key=1 key2="text"``).

    Flower splits the string with ``key=("..."|'...'|\\S+)``, so a string value may hold spaces
    but no double quote or line break: those are refused here rather than mangled there.
    """
    parts = []
    for key, value in config.items():
        if not _KEY.match(key):
            raise FedShareError(f"bad node-config key {key!r} (letters, digits, _ . - only)")
        if isinstance(value, str) and ('"' in value or "\n" in value or "\r" in value):
            raise FedShareError(f"node-config value of {key} holds a quote or a line break")
        parts.append(f"{key}={toml_value(value)}")
    return " ".join(parts)


class Deployment:
    """A SuperLink and one authenticated SuperNode per node config on this machine, over TLS.

    Use it as a context manager: entering starts everything and waits until every SuperNode is
    online; leaving (or a failure halfway through starting) stops every process it started.
    Logs: ``work_dir/superlink.log`` (also the ServerApp's output) and
    ``work_dir/supernode-<i>.log`` (also its ClientApps' output).
    """

    def __init__(self, work_dir: Path, credentials: Credentials,
                 node_configs: Sequence[NodeConfig], *, startup_timeout: float = 120.0,
                 max_retries: int = 10) -> None:
        if len(node_configs) > len(credentials.node_keys):
            raise FedShareError(f"{len(node_configs)} node configs but only "
                                f"{len(credentials.node_keys)} SuperNode keys")
        self.work_dir = work_dir.resolve()
        self.credentials = credentials
        self.node_configs = [dict(config) for config in node_configs]
        for config in node_configs:
            render_node_config(config)  # a bad node config fails before anything starts
        self.startup_timeout = startup_timeout
        self.max_retries = max_retries
        self.home = self.work_dir / "flwr-home"
        self.env = flower_env(self.home)
        self.marker = new_marker(self.env)
        self.port = 0
        self.superlink: subprocess.Popen[bytes] | None = None
        self.supernodes: list[subprocess.Popen[bytes]] = []
        self._runs: list[subprocess.Popen[bytes]] = []
        self._watchdog: subprocess.Popen[bytes] | None = None

    # ---------------------------------------------------------------- lifecycle
    def __enter__(self) -> Deployment:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        """Start the SuperLink, register the keys, start the SuperNodes and wait for them.

        Anything that fails (or an interrupt) stops what was already started before raising.
        """
        try:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            self.home.mkdir(parents=True, exist_ok=True)
            # ends the deployment's processes if this launcher is killed outright
            self._watchdog = start_watchdog(self.marker)
            self._start_superlink()
            self._write_connection()
            for i, public_key in enumerate(self.credentials.node_public_keys[
                    :len(self.node_configs)]):
                self._flwr("supernode", "register", str(public_key), CONNECTION,
                           "--name", f"fedshare-{i}")
            for i in range(len(self.node_configs)):
                self.supernodes.append(self._start_supernode(i))
            self._wait_for_nodes()
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 15.0) -> None:
        """Stop every process of the deployment: runs, SuperNodes (and their ClientApps), then
        the SuperLink (and its SuperExec and ServerApp), then anything else carrying our marker.
        Safe to call more than once. Its ServerApps go first (:func:`end_all`)."""
        end_all(server_apps(self.processes()), timeout)
        for process in [*self._runs, *self.supernodes]:
            stop_process(process, timeout)
        if self.superlink is not None:
            detached = descendants(self.superlink)  # its SuperExec leaves our group
            stop_process(self.superlink, timeout)
            end_all(detached, timeout)
        end_all(self.processes(), timeout)
        if self._watchdog is not None:
            stop_process(self._watchdog, 5.0, group=False)
            self._watchdog = None

    def processes(self) -> list[psutil.Process]:
        """Every live process of this deployment (zombies aside), found by its marker."""
        return marked(self.marker)

    # ---------------------------------------------------------------- SuperLink
    def _start_superlink(self, fresh: bool = True) -> None:
        """Start the SuperLink and wait until it serves; ``fresh``: on a new port and database,
        else on the port and database of the one before (a restart)."""
        database = self.work_dir / "superlink.db"
        if fresh:
            database.unlink(missing_ok=True)  # a deployment of its own: no stale runs or keys
            self.port = free_port()
        ca_cert = str(self.credentials.ca_cert.resolve())
        self.superlink = start_superlink(
            ["--ssl-ca-certfile", ca_cert,
             "--ssl-certfile", str(self.credentials.server_cert.resolve()),
             "--ssl-keyfile", str(self.credentials.server_key.resolve()),
             "--enable-supernode-auth", "--database", str(database)],
            self.port, self.work_dir / ("superlink.log" if fresh else "superlink-restarted.log"),
            self.env, timeout=self.startup_timeout,
            context=ssl.create_default_context(cafile=ca_cert), cwd=self.work_dir,
            new_session=True)

    @property
    def address(self) -> str:
        """The SuperLink's Fleet/Control/Runtime API address (one port since Flower 1.40)."""
        return f"{HOST}:{self.port}"

    def _write_connection(self) -> None:
        """``$FLWR_HOME/config.toml`` with the TLS connection the ``flwr`` CLI uses."""
        ca = str(self.credentials.ca_cert.resolve())  # flwr rejects relative paths
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f"address = {toml_value(self.address)}\nroot-certificates = {toml_value(ca)}\n")

    # ---------------------------------------------------------------- SuperNodes
    def supernode_command(self, private_key: Path, node_config: NodeConfig,
                          max_retries: int | None = None) -> list[str]:
        """The ``flower-supernode`` command line of a node with ``private_key`` (its public key
        must be registered) on a free Runtime API port; run it with :attr:`env`."""
        retries = self.max_retries if max_retries is None else max_retries
        return [flower_bin("flower-supernode"), "--superlink", self.address,
                "--root-certificates", str(self.credentials.ca_cert.resolve()),
                "--auth-supernode-private-key", str(private_key.resolve()),
                "--port", str(free_port()), "--node-config", render_node_config(node_config),
                "--max-retries", str(retries)]

    def _start_supernode(self, i: int) -> subprocess.Popen[bytes]:
        command = self.supernode_command(self.credentials.node_keys[i], self.node_configs[i])
        return self._spawn(command, self.work_dir / f"supernode-{i}.log")

    def online_nodes(self) -> int:
        """How many registered SuperNodes the SuperLink sees online."""
        listing = self._flwr("supernode", "ls", CONNECTION, "--format", "json")
        return sum(node.get("status") == "online" for node in _json(listing)["nodes"])

    def _wait_for_nodes(self) -> None:
        nodes = {f"SuperNode {i}": (node, self.work_dir / f"supernode-{i}.log")
                 for i, node in enumerate(self.supernodes)}
        wait_until(lambda: self.online_nodes() >= len(self.supernodes),
                   "not every SuperNode was online", self.startup_timeout, self.work_dir, nodes,
                   interval=1.0)

    # ---------------------------------------------------------------- runs
    def start_run(self, run_config: Mapping[str, Any], log_path: Path) -> subprocess.Popen[bytes]:
        """Start ``flwr run`` of this repository with ``run_config`` (keys of
        ``[tool.flwr.app.config]``), streaming the run's logs into ``log_path``."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        overrides = self.work_dir / f"run-config-{len(self._runs)}.toml"
        write_toml(overrides, run_config)
        command = [flower_bin("flwr"), "run", str(REPO_ROOT), CONNECTION, "--run-config",
                   str(overrides), "--stream"]
        process = self._spawn(command, log_path, cwd=REPO_ROOT)
        self._runs.append(process)
        return process

    def run(self, run_config: Mapping[str, Any], log_path: Path, timeout: float) -> int:
        """Run the app once and return its exit status: 0 only when the SuperLink reports the
        run ``finished:completed`` (``flwr run --stream`` exits 0 even for a failed run), else
        ``flwr run``'s own non-zero status, 1 for a failed or stopped run, or
        :data:`TIMED_OUT` after ``timeout`` seconds (the run is then stopped). Afterwards the
        SuperLink's database is scrubbed (:func:`simulations.superlink.scrub_database`)."""
        try:
            return self._run(run_config, log_path, timeout)
        finally:  # whatever the outcome, the run's messages leave no bytes behind
            try:
                scrub_database(self.work_dir / "superlink.db")
            except FedShareError as error:
                _note(log_path, f"fedshare deploy: {error}")

    def _run(self, run_config: Mapping[str, Any], log_path: Path, timeout: float) -> int:
        process = self.start_run(run_config, log_path)
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_process(process, 10.0)
            if (run_id := started_run_id(log_path)) is not None:
                with contextlib.suppress(FedShareError):
                    self.stop_run(run_id)
            _note(log_path, f"fedshare deploy: the run outlived its {timeout:.0f} s timeout")
            return TIMED_OUT
        if code != 0:
            return code
        try:
            status = self.run_status(started_run_id(log_path))
        except FedShareError as error:  # e.g. the SuperLink is gone: the caller decides
            status = f"unknown ({error})"
        if status != "finished:completed":
            _note(log_path, f"fedshare deploy: the SuperLink reports the run as {status}")
            return 1
        return 0

    def run_status(self, run_id: int | None, wait: float = 15.0) -> str:
        """The SuperLink's status of run ``run_id`` (``finished:completed`` on success), waiting
        up to ``wait`` seconds for it to be finished."""
        if run_id is None:
            return "unknown (no run was started)"
        deadline = time.monotonic() + wait
        while True:
            runs = _json(self._flwr("ls", CONNECTION, "--run-id", str(run_id), "--format",
                                    "json"))["runs"]
            status = str(runs[0]["status"]) if runs else "unknown"
            if status.startswith("finished") or time.monotonic() > deadline:
                return status
            time.sleep(0.5)

    def stop_run(self, run_id: int) -> None:
        """Ask the SuperLink to stop run ``run_id`` (``flwr stop``), e.g. after it outlived its
        timeout or its ServerApp died; a run that already finished is left as it is."""
        self._flwr("stop", str(run_id), CONNECTION, check=False)

    # ---------------------------------------------------------------- fault injection
    # What the failure of a machine does to the deployment, for the tests that check that a
    # run survives it. Nothing else calls these.
    def crash_superlink(self) -> None:
        """SIGKILL the SuperLink with its SuperExec and ServerApp, as when its machine dies."""
        if self.superlink is None:
            return
        detached = descendants(self.superlink)
        signal_group(self.superlink, signal.SIGKILL)
        end_all(detached, 10.0, signal.SIGKILL)
        self.superlink.wait()

    def restart_superlink(self) -> None:
        """Start the SuperLink again on its port and database: registrations and runs survive,
        and the SuperNodes reconnect by themselves (Flower's backoff: about 20-30 s)."""
        self._start_superlink(fresh=False)
        self._wait_for_nodes()

    def kill_supernode(self, i: int, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to SuperNode ``i`` and its process group (its SuperExec and ClientApps),
        as when its machine dies. The deployment's stop() reaps it."""
        signal_group(self.supernodes[i], sig)

    # ---------------------------------------------------------------- helpers
    def _spawn(self, command: list[str], log_path: Path, cwd: Path | None = None
               ) -> subprocess.Popen[bytes]:
        """Start ``command`` with our environment (and marker) in a session of its own (so its
        group can be signalled), its output in ``log_path``."""
        return spawn(command, log_path, self.env, cwd=cwd or self.work_dir, new_session=True)

    def _flwr(self, *args: str, check: bool = True, timeout: float = 60.0) -> str:
        """Run a ``flwr`` CLI command against this deployment; its output, or FedShareError."""
        try:
            done = subprocess.run([flower_bin("flwr"), *args], env=self.env, cwd=self.work_dir,
                                  capture_output=True, text=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL, check=False)
        except subprocess.TimeoutExpired:
            raise FedShareError(f"flwr {' '.join(args)} took over {timeout:.0f} s") from None
        if check and done.returncode != 0:
            raise FedShareError(f"flwr {' '.join(args)} failed with status {done.returncode}: "
                                f"{(done.stdout + done.stderr).strip()[-500:]}")
        return done.stdout


def _json(output: str) -> dict[str, Any]:
    """The (indented) JSON object a ``flwr ... --format json`` command printed last."""
    starts = [m.start() for m in re.finditer(r"^\{", output, re.MULTILINE)]
    for start in reversed(starts):
        with contextlib.suppress(json.JSONDecodeError):
            return dict(json.JSONDecoder().raw_decode(output, start)[0])
    raise FedShareError(f"no JSON in the output of flwr: {output.strip()[-300:]}")


def started_run_id(log_path: Path) -> int | None:
    """The run id ``flwr run`` reported in ``log_path`` (``None`` if it started none)."""
    match = _STARTED_RUN.search(log_path.read_text(errors="replace"))
    return int(match[1]) if match else None


def _note(log_path: Path, line: str) -> None:
    with open(log_path, "a") as log:
        log.write(line + "\n")


# ------------------------------------------------------------------------------ entry point
def deploy(work_dir: Path, node_configs: Sequence[NodeConfig], run_config: Mapping[str, Any],
           timeout: float, out: IO[str] | None = None) -> Path:
    """Deploy the app on this machine (one SuperNode per entry of ``node_configs``, e.g. from
    the per-device data files), run it once with ``run_config`` and stop everything.

    Returns the run's out-dir (``run_config["out-dir"]``, default ``work_dir/run``); raises
    :class:`FedShareError` when the run fails. ``num-nodes`` defaults to the node count.
    """
    if not node_configs:
        raise FedShareError("a deployment needs at least one node config")
    work_dir = work_dir.resolve()
    out_dir = Path(str(run_config.get("out-dir") or work_dir / "run")).resolve()
    if (out_dir / "state.db").exists() or (out_dir / "summary.json").exists():
        raise FedShareError(f"{out_dir} already holds a run; choose another out-dir")
    settings = {"num-nodes": len(node_configs), **run_config, "out-dir": str(out_dir)}
    work_dir.mkdir(parents=True, exist_ok=True)
    credentials_dir = work_dir / "credentials"
    shutil.rmtree(credentials_dir, ignore_errors=True)
    credentials = make_credentials(credentials_dir, len(node_configs))
    log_path = work_dir / "run.log"
    print(f"deployment in {work_dir}: logs superlink.log, supernode-<i>.log, run.log; "
          f"credentials in {credentials_dir}", file=out or sys.stdout, flush=True)
    with signals_interrupt(), Deployment(work_dir, credentials, node_configs) as deployment:
        code = deployment.run(settings, log_path, timeout)
    if code != 0:
        raise FedShareError(f"the deployed run failed (status {code}); see {log_path} and "
                            f"{work_dir / 'superlink.log'}")
    if not (out_dir / "summary.json").exists():
        raise FedShareError(f"the run finished without {out_dir / 'summary.json'}; see {log_path}")
    return out_dir
