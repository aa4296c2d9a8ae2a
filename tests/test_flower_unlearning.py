"""The unlearning phase through the real Flower app equals the in-process phase, and the
server only ever receives unsharing requests for interactions it already held (I_share)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from synthetic import tiny_prepared

from fedshare.runconfig import federated_config
from fedshare.unlearning.config import UnlearningConfig
from fedshare.unlearning.phase import learn, unlearn
from simulations.cli import main
from simulations.experiment import resolve, run_experiment

SETTINGS = ["rounds=2", "eval-every=2", "fraction=0.5", "dim=8", "server-steps=2",
            "local-epochs=2", "seed=0", "snapshots=2", "unlearn=true", "unlearn-rounds=2",
            "unlearn-steps=3", "defence=none"]


@pytest.fixture(scope="module")
def flower_run(tmp_path_factory):
    data = tiny_prepared()
    assert data.plan.unlearn.any()
    root = tmp_path_factory.mktemp("flower-unlearning")
    folder = data.save(root / "tiny")
    audit = root / "audit"
    experiment = resolve(None, [*SETTINGS, f"prepared={folder}", "num-supernodes=2",
                                f"audit-dir={audit}"], name="unlearn")
    out, summary = run_experiment(experiment, root / "runs", "flower")
    return data, experiment, out, summary, audit


def test_the_erasure_audit_finds_nothing_left(flower_run, capsys):
    _, _, out, _, _ = flower_run
    assert main(["audit", str(out)]) == 0
    assert "0 found in 8 checks" in capsys.readouterr().out


def test_summary_reports_the_phase(flower_run):
    data, _, _, summary, _ = flower_run
    assert summary["forgotten_interactions"] == int(data.plan.unlearn.sum())
    assert summary["unshare_requests"] == len(data.plan.unsharing_users(data.split.train))
    assert summary["unlearning_kept_bytes"] == 2 * data.num_items * 8 * 4  # M * I * d * 4
    assert summary["snapshots"] == 1  # pre-request snapshots deleted, the final one kept
    assert summary["unlearning_seconds"] > 0
    assert set(summary["learned_test"]) == set(summary["test"])


def test_flower_phase_equals_the_inprocess_phase(flower_run):
    data, experiment, out, _, _ = flower_run
    torch.set_num_threads(1)
    config = federated_config(experiment.run)
    learned = learn(data, config)
    outcome = unlearn(learned, data, "fedshare", UnlearningConfig(rounds=2, steps=3),
                      config.rounds)
    flower_table = np.load(out / "item_table.npy")
    assert np.allclose(flower_table, outcome.federation.server.table.numpy(), atol=1e-5)


def test_unshare_replies_carry_only_shared_interactions(flower_run):
    data, _, _, _, audit = flower_run
    train = data.split.train
    shared = set(zip(train.users[data.plan.shared].tolist(),
                     train.items[data.plan.shared].tolist(), strict=True))
    local = set(zip(train.users[~data.plan.shared].tolist(),
                    train.items[~data.plan.shared].tolist(), strict=True))
    requested = set()
    for path in sorted(audit.glob("*-unshare-*.npz")):
        with np.load(path) as arrays:
            assert set(arrays.files) == {"arrays/unshare-users", "arrays/unshare-items"}
            requested |= set(zip(arrays["arrays/unshare-users"].tolist(),
                                 arrays["arrays/unshare-items"].tolist(), strict=True))
        assert json.loads(path.with_suffix(".json").read_text()) == {}
    expected = set(zip(train.users[data.plan.unlearn].tolist(),
                       train.items[data.plan.unlearn].tolist(), strict=True))
    assert requested == expected
    assert requested <= shared
    assert not requested & local


def test_the_durable_server_state_holds_no_forgotten_interaction(flower_run):
    """After the run, the server's SQLite store holds the unlearned table, its one snapshot,
    the remaining D_s (no forgotten pair) and every request, served once."""
    from fedshare.federated.state_db import StateDB

    data, experiment, out, _, _ = flower_run
    store = StateDB(out / "state.db", data.num_users, data.num_items)
    config = federated_config(experiment.run)
    assert store.last_round() == config.rounds + 2  # learning rounds + unlearn-rounds
    assert np.allclose(store.model().numpy(), np.load(out / "item_table.npy"))
    (snapshot,) = store.snapshots()
    assert torch.equal(snapshot, store.model())
    assert store.pending() == []
    train = data.split.train
    remaining = data.plan.remaining_shared(train)
    held = set(zip(store.shared().users.tolist(), store.shared().items.tolist(), strict=True))
    assert held == set(zip(remaining.users.tolist(), remaining.items.tolist(), strict=True))
    forgotten = set(zip(train.users[data.plan.unlearn].tolist(),
                        train.items[data.plan.unlearn].tolist(), strict=True))
    assert not held & forgotten
    served = store._db.execute("SELECT COUNT(*) FROM requests WHERE served IS NOT NULL")
    assert served.fetchone()[0] == len(data.plan.unsharing_users(train))
    store.close()
