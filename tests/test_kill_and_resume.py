"""A Flower run with unlearning, stopped once in each phase, ends where an uninterrupted run ends.

One run is stopped in its share round (SIGTERM), resumed with more rounds and unlearning and
stopped in a learning round (SIGKILL: the launcher's watchdog stops the rest), resumed and
stopped while unsharing requests are acknowledged (SIGTERM), resumed and stopped in the
unlearning phase (SIGKILL), and resumed to its end. After every stop no process of the run
is left within seconds, and the folder is free for the next resume; at the end the item
table equals the uninterrupted run's to 1e-5 (the in-process engine, which the Flower app
equals: tests/test_flower_unlearning.py), every round has its metrics row, the clients' saved
state is tagged with the run, and the erasure audit finds nothing. The moments are seeded
draws (:mod:`simulations.kill_moments`, which runs many more of them).
"""

from __future__ import annotations

import signal

import numpy as np
import pytest
from synthetic import tiny_prepared

from fedshare.federated.state_db import StateDB
from fedshare.run_lease import ensure_free
from simulations.experiment import resolve
from simulations.kill_moments import (
    Launch,
    Moment,
    check,
    committed_round,
    reference,
    resume,
    run_folder,
    stop_at,
)

pytestmark = pytest.mark.slow
SETTINGS = ["eval-every=2", "fraction=0.5", "dim=8", "server-steps=2", "local-epochs=2",
            "seed=0", "snapshots=2", "unlearn-rounds=3", "unlearn-steps=3", "num-supernodes=2",
            "defence=none"]


def _sets(settings: list[str]) -> list[str]:
    return [a for s in settings for a in ("--set", s)]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    folder = tiny_prepared().save(root / "tiny")
    common = [*SETTINGS, f"prepared={folder}"]
    rng = np.random.default_rng(16)
    delay = rng.uniform(0, 0.3, 4)
    stops, committed = [], []
    first = Launch(["--out", str(root / "runs"), *_sets([*common, "rounds=3"])])
    stops.append(stop_at(first, Moment("share", signal.SIGTERM, delay[0]), root / "runs"))
    out = run_folder(root / "runs")
    assert out is not None
    more = ["rounds=4", "unlearn=true"]  # a resumed run may add rounds and the phase
    for moment in (Moment("learning", signal.SIGKILL, delay[1], round=int(rng.integers(1, 3))),
                   Moment("acknowledgement", signal.SIGTERM, delay[2]),
                   Moment("unlearning", signal.SIGKILL, delay[3])):
        ensure_free(out)  # no server holds the folder any more
        stops.append(stop_at(Launch(["--resume", str(out), *_sets(more)]), moment,
                             root / "runs"))
        committed.append(committed_round(out / "state.db"))
    resume(out, more)  # overrides count once a resumed run has finished
    expected = reference(resolve(None, [*common, *more]).run)
    return out, stops, committed, expected


def test_every_stop_leaves_no_process_behind(chain):
    _, stops, _, _ = chain
    assert len(stops) == 4  # stop_at raises if anything is still running after 60 s
    print(f"processes gone {', '.join(f'{s:.1f}' for s in stops)} s after the signals")


def test_the_resumed_run_ends_where_an_uninterrupted_run_ends(chain):
    out, _, _, expected = chain
    result = check(out, expected)
    assert result.table_gap <= 1e-5, result
    assert result.forgotten and result.rows and result.residue == 0, result


def test_the_rounds_were_committed_before_each_later_stop(chain):
    _, _, committed, _ = chain  # after the learning, acknowledgement and unlearning stops
    assert committed[0] >= 1 and committed[1] == 4 and committed[2] >= 4


def test_clients_keep_their_state_in_files_tagged_with_the_run(chain):
    out, _, _, _ = chain
    clients = out / "client-state"
    files = sorted(p.name for p in clients.iterdir())
    assert files == ["partition-0-of-2.npz", "partition-1-of-2.npz"]
    store = StateDB(out / "state.db", 10, 40)
    key = store.run_key
    assert store.pending() == []
    store.close()
    for name in files:
        with np.load(clients / name) as saved:
            assert str(saved["run-key"]) == key and bool(saved["unshared"])
