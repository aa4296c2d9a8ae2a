"""Device files: a deployed node holds only its own user's data, and trains exactly as the same
user does inside a simulated cohort."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from synthetic import tiny_prepared

from fedshare.data.device import DeviceData, write_device_files
from fedshare.errors import FedShareError
from fedshare.federated.population import ClientPopulation
from fedshare.models.local import LocalTrainConfig
from fedshare.runconfig import data_key, load_data, node_label, node_users


@pytest.fixture(scope="module")
def data():
    return tiny_prepared(num_users=12, unshare_user_fraction=1.0)


def _pairs(users: np.ndarray, items: np.ndarray) -> set[tuple[int, int]]:
    return set(zip(users.tolist(), items.tolist(), strict=True))


def test_device_files_hold_exactly_their_users_data(data, tmp_path):
    paths = write_device_files(data, np.arange(data.num_users), tmp_path)
    train, plan = data.split.train, data.plan
    for user, path in enumerate(paths):
        device = DeviceData.load(path)
        assert device.user == user and path.name == f"user-{user}.json"
        mine = train.users == user
        assert set(device.local.tolist()) == set(train.items[mine & ~plan.shared].tolist())
        assert set(device.shared.tolist()) == set(
            train.items[mine & plan.shared & ~plan.unlearn].tolist())
        assert set(device.unshare.tolist()) == set(train.items[mine & plan.unlearn].tolist())
        view = device.prepared()
        for part in (view.split.train, view.split.valid, view.split.test):
            assert set(part.users.tolist()) <= {user}  # nothing of anybody else
        for full, own in ((data.split.valid, view.split.valid), (data.split.test,
                                                                  view.split.test)):
            assert _pairs(own.users, own.items) == _pairs(full.users[full.users == user],
                                                          full.items[full.users == user])
        shared = view.plan.shared_data(view.split.train)
        expected = data.plan.shared_data(train)
        assert _pairs(shared.users, shared.items) == _pairs(
            expected.users[expected.users == user], expected.items[expected.users == user])
    assert sum(1 for _ in tmp_path.glob(".*")) == 0  # no temporary file left behind


def test_a_device_trains_and_ranks_like_its_user_in_a_cohort(data, tmp_path):
    user = int(np.flatnonzero(data.plan.group == 1)[0])  # a partial sharer: local and shared
    (path,) = write_device_files(data, np.array([user]), tmp_path)
    node = {"device-file": str(path)}
    device_data = load_data(data_key({}, node))
    users = node_users(node, device_data.num_users)
    assert users.tolist() == [user] and node_label(node) == f"user-{user}"
    device = ClientPopulation(device_data, users, 8, seed=3)
    cohort = ClientPopulation(data, np.arange(data.num_users), 8, seed=3)
    assert device.local_count(users).tolist() == cohort.local_count(users).tolist()
    assert _pairs(*device.shared_interactions()) == {
        p for p in _pairs(*cohort.shared_interactions()) if p[0] == user}
    table = torch.randn(data.num_items, 8, generator=torch.Generator().manual_seed(0))
    config = LocalTrainConfig(epochs=2, lr=0.5)
    a = device.train(users, table, config, seed=3, round_=1)
    b = cohort.train(users, table, config, seed=3, round_=1)
    assert torch.equal(a.table, b.table) and a.weight == b.weight
    assert torch.equal(device.embeddings[0], cohort.embeddings[user])
    sums_a, n_a = device.evaluate(users, table, "test")
    sums_b, n_b = cohort.evaluate(users, table, "test")
    assert n_a == n_b and sums_a == pytest.approx(sums_b)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d.update(format="other"), "not a fedshare-device/1"),
    (lambda d: d.update(user=99), "outside"),
    (lambda d: d["train"]["shared"].append(10_000), "outside the catalogue"),
    (lambda d: d["train"]["local"].append(-1), "non-negative"),
    (lambda d: d["train"]["unshare"].append(d["train"]["local"][0]), "listed twice"),
    (lambda d: d["train"].pop("local"), "malformed"),
    (lambda d: d.update(valid="12"), "JSON arrays"),
])
def test_a_bad_device_file_is_one_clear_error(data, tmp_path, edit, message):
    (path,) = write_device_files(data, np.array([0]), tmp_path)
    document = json.loads(path.read_text())
    document["train"]["local"] = document["train"]["local"] or [0]
    edit(document)
    path.write_text(json.dumps(document))
    with pytest.raises(FedShareError, match=message) as caught:
        DeviceData.load(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_missing_and_unreadable_device_files(tmp_path):
    with pytest.raises(FedShareError, match="does not exist"):
        DeviceData.load(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(FedShareError, match="not readable JSON"):
        DeviceData.load(tmp_path / "bad.json")
