"""What a resumed run may and may not do with its state.db: it may not change the model's
settings, users stay bound to their nodes, and share replies that disagree are refused.
Stopping a run in each phase and resuming it is tested in tests/test_kill_and_resume.py;
killing a server mid-round on a real deployment in tests/test_deployment.py."""

from __future__ import annotations

import numpy as np
import pytest
from synthetic import tiny_prepared

from fedshare.errors import FedShareError
from fedshare.federated.config import FederatedConfig
from fedshare.federated.directory import Directory, ShareReply, build_directory
from fedshare.federated.state_db import open_store, stored_directory
from simulations.experiment import resume_settings


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


def test_resuming_needs_a_run_folder(tmp_path):
    with pytest.raises(FedShareError, match=r"not a run folder \(no config\.toml\)"):
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
