"""A stopped Flower run resumes from its state.db: a run of 2 rounds resumed to 4 (then
unlearning) ends where an uninterrupted run of 4 rounds ends, and a resumed run may not
change the model's settings. Killing a server mid-round is tested on a real deployment
(tests/test_deployment.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from synthetic import tiny_prepared

from fedshare.errors import FedShareError
from fedshare.federated.config import FederatedConfig
from fedshare.federated.directory import Directory, ShareReply, build_directory
from fedshare.federated.state_db import StateDB, open_store, stored_directory
from fedshare.runconfig import federated_config
from fedshare.unlearning.config import UnlearningConfig
from fedshare.unlearning.phase import learn, unlearn
from simulations.experiment import resolve, resume_settings, run_experiment

SETTINGS = ["eval-every=10", "fraction=0.5", "dim=8", "server-steps=2", "local-epochs=2",
            "seed=0", "snapshots=2", "unlearn-rounds=2", "unlearn-steps=3", "num-supernodes=2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    data = tiny_prepared()
    root = tmp_path_factory.mktemp("resume")
    folder = data.save(root / "tiny")
    common = [*SETTINGS, f"prepared={folder}"]
    first = resolve(None, [*common, "rounds=2"], name="stopped")  # client state: the default
    stopped_out, _ = run_experiment(first, root / "runs", "flower")
    again = resume_settings(stopped_out, ["rounds=4", "unlearn=true"])
    resumed_out, resumed_summary = run_experiment(again, root / "runs", "flower",
                                                  resume=stopped_out)
    return data, root, again, (stopped_out, resumed_out, resumed_summary)


def test_a_resumed_run_ends_where_an_uninterrupted_run_ends(runs):
    """The uninterrupted reference is the in-process engine, which the Flower app equals
    (tests/test_flower_unlearning.py)."""
    data, _, again, (stopped_out, resumed_out, resumed) = runs
    assert resumed_out == stopped_out and resumed["resumed_from_round"] == 2
    torch.set_num_threads(1)
    config = federated_config(again.run)
    learned = learn(data, config)
    outcome = unlearn(learned, data, "fedshare", UnlearningConfig(rounds=2, steps=3),
                      config.rounds)
    assert np.allclose(np.load(resumed_out / "item_table.npy"),
                       outcome.federation.server.table.numpy(), atol=1e-5)
    assert resumed["forgotten_interactions"] == int(data.plan.unlearn.sum()) > 0
    rounds = pd.read_csv(resumed_out / "metrics.csv")["round"].tolist()
    assert rounds == [1, 2, 3, 4]  # the stopped run's rounds, then the resumed ones
    store = StateDB(resumed_out / "state.db", data.num_users, data.num_items)
    assert store.last_round() == 4 + 2 and store.pending() == []
    store.close()


def test_clients_keep_their_state_in_files_tagged_with_the_run(runs):
    """By default under the run folder (``client-state/``), recorded for the resume."""
    _, _, again, (stopped_out, _, _) = runs
    clients = stopped_out / "client-state"
    assert again.run["client-state-dir"] == str(clients)
    files = sorted(p.name for p in clients.iterdir())
    assert files == ["partition-0-of-2.npz", "partition-1-of-2.npz"]
    store = StateDB(stopped_out / "state.db", 10, 40)
    key = store.run_key
    store.close()
    for name in files:
        with np.load(clients / name) as saved:
            assert str(saved["run-key"]) == key and bool(saved["unshared"])


def test_a_resumed_run_may_not_change_the_model(tmp_path):
    data = tiny_prepared()
    shared = data.plan.shared_data(data.split.train)

    def directory() -> Directory:
        return Directory({1: np.arange(data.num_users)}, {}, shared)

    open_store(tmp_path / "state.db", directory(), FederatedConfig(dim=8)).close()
    again = directory()
    store = open_store(tmp_path / "state.db", again, FederatedConfig(dim=8, rounds=500))
    store.close()  # more rounds: allowed, and D_s comes from the store
    with pytest.raises(FedShareError, match=r"other settings \(dim, seed\); use a new out-dir"):
        open_store(tmp_path / "state.db", directory(), FederatedConfig(dim=16, seed=1))


def test_resuming_needs_a_run_folder_with_a_store(tmp_path):
    with pytest.raises(FedShareError, match=r"no state\.db"):
        resume_settings(tmp_path)


def _reply(shared, node: int, users: np.ndarray, catalogue=(10, 40), counts=None
           ) -> ShareReply:
    mine = np.isin(shared.users, users)
    return ShareReply(node, users, np.full(len(users), 3) if counts is None else counts,
                      shared.users[mine], shared.items[mine], catalogue)


def test_a_user_stays_bound_to_the_node_that_announced_it(tmp_path):
    data = tiny_prepared()
    shared = data.plan.shared_data(data.split.train)
    low, high = np.arange(5), np.arange(5, 10)
    big = 2**64 - 5  # Flower's node ids are unsigned 64-bit
    first, _ = build_directory([_reply(shared, 2, high), _reply(shared, big, low)])
    open_store(tmp_path / "state.db", first, FederatedConfig(dim=8)).close()
    catalogue, bound = stored_directory(tmp_path / "state.db")
    assert catalogue == (10, 40)
    assert bound == {**{u: big for u in range(5)}, **{u: 2 for u in range(5, 10)}}
    # After a restart node 3 claims node big's users: it is out, even with the lowest id.
    forged, refused = build_directory([_reply(shared, 2, high), _reply(shared, 3, low),
                              _reply(shared, big, low)], catalogue, bound)
    assert set(forged.node_users) == {2, big} and [node for node, _ in refused] == [3]
    with pytest.raises(FedShareError, match="no node sent an acceptable"):
        build_directory([_reply(shared, 3, np.arange(10))], catalogue, bound)


def test_share_replies_that_disagree_or_lie_are_rejected():
    data = tiny_prepared()
    shared = data.plan.shared_data(data.split.train)
    users = [np.array([0, 1]), np.array([2, 3]), np.array([4, 5]), np.array([6, 7])]
    directory, refused = build_directory([
        _reply(shared, 1, users[0]), _reply(shared, 2, users[1]),
        _reply(shared, 3, users[2], catalogue=(10**9, 40)),  # the minority's catalogue
        _reply(shared, 4, users[3], counts=np.array([3, -1])),  # a negative local count
        _reply(shared, 5, users[0]),  # user 0 and 1 are node 1's already
    ])
    assert set(directory.node_users) == {1, 2}
    assert [node for node, _ in refused] == [3, 4, 5]
    assert (directory.shared.num_users, directory.shared.num_items) == (10, 40)
    assert set(directory.local_counts) == {0, 1, 2, 3}
