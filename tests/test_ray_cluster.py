"""Scale-out through Ray: a Flower simulation attached to a Ray cluster (a head and one worker
node, started here with one CPU each) gives the same model as the in-process engine.

The cluster lives in a private Ray temp folder (``RAY_TMPDIR``): ``ray start`` records its address
in ``<temp>/ray/ray_current_cluster``, and a record left in the default ``/tmp/ray`` would make
every later ``ray.init()`` on this machine (the README's ``flwr run .`` among them) try to join the
dead cluster. The module checks that it leaves ``/tmp/ray``'s record and ``~/.flwr`` as it found
them.

With one CPU per Ray node and one CPU per virtual-node actor, Flower's actor pool has two
actors and Ray can place only one on each node: the virtual SuperNodes run on both.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from synthetic import tiny_prepared

from simulations.experiment import resolve, run_experiment
from simulations.superlink import free_port

RAY = str(Path(sys.executable).parent / "ray")
RECORD = Path("/tmp/ray/ray_current_cluster")  # where ray.init() looks for a cluster to join
FLWR_HOME = Path.home() / ".flwr"


def _global_state() -> tuple[str | None, list[str] | None]:
    """The default Ray cluster record and the user's Flower home, as this machine has them."""
    record = RECORD.read_text() if RECORD.exists() else None
    home = sorted(str(p.relative_to(FLWR_HOME)) for p in FLWR_HOME.rglob("*")) \
        if FLWR_HOME.exists() else None
    return record, home


@pytest.fixture(scope="module")
def ray_env():
    """A short private temp folder for Ray (its socket paths must stay under 107 bytes)."""
    folder = tempfile.mkdtemp(prefix="fsray-")
    try:
        yield {**os.environ, "RAY_TMPDIR": folder}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _probe(address: str, expression: str) -> str | None:
    """``expression`` evaluated by a fresh driver attached to the cluster (None if it fails)."""
    probe = (f"import json, ray; from ray._private import state; "
             f"ray.init(address={address!r}, logging_level='ERROR'); print({expression})")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=60)
    return out.stdout.strip().splitlines()[-1] if out.returncode == 0 and out.stdout else None


def _alive_nodes(address: str) -> int:
    return int(_probe(address, "sum(n['Alive'] for n in ray.nodes())") or 0)


def _actor_nodes(address: str) -> set[str]:
    """Ray nodes that hosted one of Flower's virtual-node actors (the GCS keeps dead ones)."""
    found = _probe(address, "json.dumps(sorted({a['Address']['NodeID'] for a in "
                            "state.actors().values() if a['ActorClassName'] == 'ClientAppActor'}))")
    return set(json.loads(found)) if found else set()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, ray_env):
    """``ray start --head`` and ``ray start --address=...`` (blocking processes we own), in a
    private Ray temp folder; on teardown, the machine's Ray record and Flower home are as the
    module found them."""
    before = _global_state()
    port = free_port()
    address = f"127.0.0.1:{port}"
    logs = tmp_path_factory.mktemp("ray")
    common = ["--num-cpus=1", "--block", "--disable-usage-stats"]
    processes = []
    try:
        with open(logs / "head.log", "w") as out:
            processes.append(subprocess.Popen(
                [RAY, "start", "--head", f"--port={port}", "--include-dashboard=false",
                 "--node-ip-address=127.0.0.1", *common], stdout=out, stderr=subprocess.STDOUT,
                env=ray_env))
        deadline = time.monotonic() + 90
        while _alive_nodes(address) < 1:
            assert time.monotonic() < deadline, (logs / "head.log").read_text()
            time.sleep(1)
        with open(logs / "worker.log", "w") as out:
            processes.append(subprocess.Popen(
                [RAY, "start", f"--address={address}", "--node-ip-address=127.0.0.1", *common],
                stdout=out, stderr=subprocess.STDOUT, env=ray_env))
        while _alive_nodes(address) < 2:
            assert time.monotonic() < deadline, (logs / "worker.log").read_text()
            time.sleep(1)
        yield address
    finally:
        for process in reversed(processes):
            process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=30)
            if process.poll() is None:
                process.kill()
    assert _global_state() == before, "the Ray cluster test changed /tmp/ray or ~/.flwr"


def test_flower_on_a_ray_cluster_equals_a_single_process_run(cluster, tmp_path):
    folder = tiny_prepared().save(tmp_path / "tiny")
    settings = [f"prepared={folder}", "rounds=2", "eval-every=2", "fraction=0.5", "dim=8",
                "server-steps=2", "local-epochs=2", "seed=3", "num-supernodes=2", "defence=none"]
    out, summary = run_experiment(resolve(None, settings, name="ray-cluster"),
                                  tmp_path / "runs", "flower", ray_address=cluster)
    ref_out, reference = run_experiment(resolve(None, settings, name="single"),
                                        tmp_path / "runs", "inprocess")
    nodes = _probe(cluster, "json.dumps(sorted(n['NodeID'] for n in ray.nodes()))")
    assert nodes is not None and len(json.loads(nodes)) == 2
    assert _actor_nodes(cluster) == set(json.loads(nodes))  # virtual nodes ran on both
    np.testing.assert_allclose(np.load(out / "item_table.npy"),
                               np.load(ref_out / "item_table.npy"), atol=1e-5, rtol=0)
    for part in ("valid", "test"):
        for key, value in reference[part].items():
            assert summary[part][key] == pytest.approx(value, abs=1e-5)
