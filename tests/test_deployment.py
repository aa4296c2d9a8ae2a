"""A real Flower deployment on loopback: TLS, authenticated SuperNodes, one per user device.

One deployment (a SuperLink and 4 SuperNodes, each its own process) is shared by the module.
Each node holds only its own device file (``device-file``, :mod:`fedshare.data.device`) and
keeps its private state in a ``state-dir``. The run learns, unshares and unlearns while the
ServerApp is killed mid-learning, then the whole SuperLink once unsharing requests were
acknowledged but not yet served, and resumes each time from its ``state.db``; a SuperNode
killed mid-round does not stop the round; an unregistered key is refused; nothing is left
running.

Slow (every message starts a ClientApp process, and Flower's SuperNodes and ServerApp poll
every 3 s), but part of CI.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sqlite3
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from synthetic import tiny_prepared

from fedshare.data.device import DeviceData, pick_device_users, write_device_files
from fedshare.errors import FedShareError
from fedshare.federated.state_db import StateDB
from simulations.cli import main
from simulations.credentials import Credentials, make_credentials
from simulations.deploy import Deployment, render_node_config, started_run_id
from simulations.processes import descendants, live

DEVICES = 4
RUN = {"num-nodes": DEVICES, "rounds": 2, "fraction": 1.0, "eval-every": 100,
       "local-epochs": 1, "server-steps": 2, "dim": 8, "snapshots": 2, "unlearn": True,
       "unlearn-rounds": 2, "unlearn-steps": 2, "round-timeout": 30, "defence": "none"}


@pytest.fixture(scope="module")
def credentials(tmp_path_factory) -> Credentials:
    return make_credentials(tmp_path_factory.mktemp("credentials"), DEVICES)


@pytest.fixture(scope="module")
def seen() -> list[psutil.Process]:
    """Every process of the deployment seen while it ran (psutil guards against pid reuse)."""
    return []


def _alive(processes: list[psutil.Process]) -> list[str]:
    """The processes still running (zombies count as ended), as 'pid command'."""
    alive = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{process.pid} {Path(process.cmdline()[1]).name}")
        except (psutil.Error, IndexError):
            continue
    return alive


def _group(process: psutil.Process) -> int | None:
    try:
        return os.getpgid(process.pid)
    except OSError:
        return None


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, credentials, seen):
    data = tiny_prepared(num_users=12, unshare_user_fraction=1.0)
    root = tmp_path_factory.mktemp("deployment")
    users = pick_device_users(data, DEVICES)
    files = write_device_files(data, users, root / "devices")
    nodes = [{"device-file": str(f), "state-dir": str(root / "device-state")} for f in files]
    with Deployment(root / "federation", credentials, nodes) as running:
        seen.extend(running.processes())
        yield data, [DeviceData.load(f) for f in files], root, running
    assert not _alive(seen), f"left running: {_alive(seen)}"


def _read(path: Path, query: str) -> int | None:
    """One number from the server's store, read while the server may be writing it."""
    if not path.exists():
        return None
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True,
                                            timeout=5)) as db:
        try:
            row = db.execute(query).fetchone()
        except sqlite3.OperationalError:  # tables not created yet
            return None
    return None if row is None or row[0] is None else int(row[0])


def _last_round(path: Path) -> int:
    return _read(path, "SELECT value FROM meta WHERE key = 'round'") or 0


def _requests(path: Path) -> int:
    return _read(path, "SELECT COUNT(*) FROM requests") or 0


def _wait_for(condition: Callable[[], bool], timeout: float, what: str,
              run: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert run is None or run.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s"
        time.sleep(0.1)


def _serverapp_pids(deployment: Deployment) -> list[int]:
    """The live ServerApp processes (``python .../flwr-serverapp ...``) below the SuperLink."""
    assert deployment.superlink is not None
    found = []
    for process in descendants(deployment.superlink):
        with contextlib.suppress(psutil.Error):
            if (any(Path(arg).name == "flwr-serverapp" for arg in process.cmdline()[:2])
                    and live(process)):
                found.append(process.pid)
    return found


def _kill_server(deployment: Deployment, run: subprocess.Popen, log: Path) -> None:
    """SIGKILL the ServerApp process (a crash: no cleanup), stop the log stream and have the
    SuperLink mark the run stopped."""
    pids = _serverapp_pids(deployment)
    assert pids, "no ServerApp process found"
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    run_id = started_run_id(log)
    assert run_id is not None
    deployment.stop_run(run_id)


def _pairs(users, items) -> set[tuple[int, int]]:
    return set(zip(np.asarray(users).tolist(), np.asarray(items).tolist(), strict=True))


def test_node_config_rendering():
    assert render_node_config({"partition-id": 0, "num-partitions": 3, "path": "/a b/c",
                               "rate": 0.5, "flag": True}) == \
        'partition-id=0 num-partitions=3 path="/a b/c" rate=0.5 flag=true'
    with pytest.raises(FedShareError, match="quote"):
        render_node_config({"path": 'a"b'})


def test_credentials(credentials):
    ca = x509.load_pem_x509_certificate(credentials.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(credentials.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} >= {"127.0.0.1", "::1"}
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert len(credentials.node_keys) == len(credentials.node_public_keys) == DEVICES
    for private, public in zip(credentials.node_keys, credentials.node_public_keys, strict=True):
        key = serialization.load_ssh_private_key(private.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert isinstance(key.curve, ec.SECP384R1)
        assert public.read_bytes().startswith(b"ecdsa-sha2-nistp384 ")
        assert serialization.load_ssh_public_key(public.read_bytes()).public_numbers() == \
            key.public_key().public_numbers()
    for secret in (*credentials.node_keys, credentials.server_key):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600


@pytest.mark.slow
def test_learn_unshare_unlearn_survive_two_server_crashes(deployment, seen):
    """A ServerApp killed mid-learning, then a whole SuperLink killed mid-unlearning."""
    data, devices, root, running = deployment
    out = root / "run"
    config = {**RUN, "out-dir": str(out)}
    state = out / "state.db"

    seen.extend(p for p in running.processes() if p not in seen)
    first = running.start_run(config, root / "run-1.log")  # crash during learning
    _wait_for(lambda: _last_round(state) >= 1, 300, "committed round", first)
    _kill_server(running, first, root / "run-1.log")
    crashed_at = _last_round(state)
    assert 1 <= crashed_at < RUN["rounds"]

    # Then the whole server machine (SuperLink, SuperExec, ServerApp) dies once unsharing
    # requests are acknowledged and before they are served; the SuperLink restarts on its
    # database and the devices reconnect by themselves.
    second = running.start_run(config, root / "run-2.log")
    _wait_for(lambda: _requests(state) > 0, 300, "acknowledged request", second)
    running.crash_superlink()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(second.pid, signal.SIGKILL)
    second.wait()
    running.restart_superlink()
    with contextlib.closing(StateDB(state, data.num_users, data.num_items)) as store:
        pending = store.pending()
        assert pending and store.served_count() == 0  # acknowledged, not yet served
        assert store.last_round() == RUN["rounds"]  # learning done, unlearning not committed

    assert running.run(config, root / "run-3.log", timeout=600) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from_round"] == RUN["rounds"] and summary["nodes"] == DEVICES

    unshared = {(d.user, int(i)) for d in devices for i in d.unshare}
    shared = {(d.user, int(i)) for d in devices for i in d.shared}
    local = {(d.user, int(i)) for d in devices for i in d.local}
    assert unshared and local
    with contextlib.closing(StateDB(state, data.num_users, data.num_items)) as store:
        assert store.last_round() == RUN["rounds"] + RUN["unlearn-rounds"]
        assert store.pending() == []
        held = _pairs(store.shared().users, store.shared().items)
        assert held == shared  # no forgotten pair, and never a local-only one
        assert not held & (unshared | local)
        rows = store._db.execute("SELECT user, items, count, served FROM requests").fetchall()
        for device in devices:  # every request logged once, none lost, all served
            if len(device.unshare):
                logged = store.find(device.user, device.unshare)
                assert logged is not None and logged.served
    assert len(rows) == len({d.user for d in devices if len(d.unshare)})
    assert sum(count for _, _, count, _ in rows) == len(unshared)
    assert all(items is None and served is not None for _, items, _, served in rows)
    # the erasure audit, with the devices' own files as ground truth, finds nothing left
    # and so does the SuperLink's database: no message left, no upload in its bytes
    superlink = running.work_dir / "superlink.db"
    assert main(["audit", str(out), "--devices", str(root / "devices"), "--superlink",
                 str(superlink)]) == 0


@pytest.mark.slow
def test_a_supernode_killed_mid_round_does_not_stop_the_round(deployment, seen):
    _, _, root, running = deployment
    seen.extend(p for p in running.processes() if p not in seen)
    out = root / "run-without-a-node"
    # long enough for every node's first reply on a loaded machine (the share round waits as
    # long as a round), short enough that the round missing the killed node ends soon
    config = {**RUN, "out-dir": str(out), "unlearn": False, "round-timeout": 40}
    run = running.start_run(config, root / "run-4.log")
    _wait_for(lambda: _last_round(out / "state.db") >= 1, 300, "committed round", run)
    running.kill_supernode(DEVICES - 1)
    assert run.wait(timeout=600) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == RUN["rounds"]
    with contextlib.closing(StateDB(out / "state.db", 12, 40)) as store:
        assert store.last_round() == RUN["rounds"]


@pytest.mark.slow
def test_unregistered_supernode_is_refused(deployment, tmp_path):
    deployment = deployment[-1]
    online = deployment.online_nodes()
    stranger = make_credentials(tmp_path / "stranger", 1).node_keys[0]
    command = deployment.supernode_command(stranger, {"user-id": 0},
                                           max_retries=0)
    log = tmp_path / "stranger.log"
    # A file, not a pipe: the SuperNode's SuperExec holds its output open until it sees the
    # SuperNode gone, which (a zombie counts as alive) needs our wait() first.
    with open(log, "wb") as out:
        node = subprocess.Popen(command, env=deployment.env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        code = node.wait(timeout=60)
    finally:
        node.kill()
        node.wait()
    assert code != 0, log.read_text()
    assert "Failed to activate SuperNode" in log.read_text()
    assert deployment.online_nodes() <= online  # the stranger never counts


@pytest.mark.slow
def test_failed_startup_leaves_no_process(tmp_path, credentials):
    broken = tmp_path / "not-a-key.pub"
    broken.write_text("not a key\n")
    bad = dataclasses.replace(credentials, node_public_keys=[broken])
    deployment = Deployment(tmp_path / "work", bad, [{"user-id": 0}])
    with pytest.raises(FedShareError, match="register"), deployment:
        pass
    assert deployment.superlink is not None  # it got as far as starting the SuperLink
    assert not deployment.processes()
    assert deployment.superlink.poll() is not None


@pytest.mark.slow
def test_stop_leaves_no_process(deployment, seen):
    """Last test of the module: a SuperNode killed as if its machine died, then stop() (the
    fixture's exit calls it again: a no-op)."""
    deployment = deployment[-1]
    assert len({p.pid for p in seen}) >= 2 + 2 * DEVICES  # SuperLink, SuperNodes, SuperExecs
    node = psutil.Process(deployment.supernodes[0].pid)
    group = [p for p in seen if p.is_running() and _group(p) == node.pid]
    assert len(group) >= 2  # the SuperNode and its SuperExec
    deployment.kill_supernode(0)
    assert deployment.supernodes[0].wait(timeout=10) < 0
    psutil.wait_procs(group, timeout=10)
    assert not _alive(group)
    deployment.stop()
    assert not _alive(seen), f"left running: {_alive(seen)}"
    assert not deployment.processes()
    assert all(node.poll() is not None for node in deployment.supernodes)

