"""Train replies are checked before they are averaged: forged or malformed ones are rejected
and logged, never averaged; a round with too many failures changes nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from synthetic import tiny_prepared

from fedshare.errors import FedShareError
from fedshare.federated.config import FederatedConfig
from fedshare.federated.directory import Directory
from fedshare.federated.population import NodeUpdate
from fedshare.federated.validation import share_problem, update_problem
from fedshare.protocol import FRU_BYTES, FRU_USERS, NUM_USERS, ROW_WEIGHT, TABLE, WEIGHT
from fedshare.storage_ledger import client
from fedshare.unlearning.fru import KIND
from simulations.experiment import resolve
from strategies.fedshare import FedShareStrategy

NUM_ITEMS, DIM = 40, 8


def _update(**changes) -> NodeUpdate:
    values = {"table": torch.zeros(NUM_ITEMS, DIM), "weight": 10.0,
              "row_weight": torch.full((NUM_ITEMS,), 4.0), "num_users": 2, **changes}
    return NodeUpdate(**values)


def test_a_sound_update_passes():
    assert update_problem(_update(), NUM_ITEMS, DIM, sampled=2) is None


@pytest.mark.parametrize(("changes", "words"), [
    ({"table": torch.full((NUM_ITEMS, DIM), float("nan"))}, "non-finite"),
    ({"table": torch.full((NUM_ITEMS, DIM), float("inf"))}, "non-finite"),
    ({"table": torch.zeros(NUM_ITEMS + 1, DIM)}, "shape"),
    ({"table": torch.zeros(NUM_ITEMS, DIM + 1)}, "shape"),
    ({"table": torch.zeros(NUM_ITEMS, DIM, dtype=torch.float64)}, "dtype"),
    ({"row_weight": torch.zeros(NUM_ITEMS - 1)}, "shape"),
    ({"row_weight": torch.full((NUM_ITEMS,), -1.0)}, "row weights"),
    ({"row_weight": torch.full((NUM_ITEMS,), 11.0)}, "exceeds"),
    ({"weight": float("nan")}, "weight"),
    ({"weight": -3.0}, "weight"),
    ({"num_users": 3}, "sampled"),
])
def test_forged_updates_are_rejected_with_a_reason(changes, words):
    problem = update_problem(_update(**changes), NUM_ITEMS, DIM, sampled=2)
    assert problem is not None and words in problem


@pytest.fixture
def strategy():
    data = tiny_prepared(10, NUM_ITEMS)
    config = FederatedConfig(dim=DIM, rounds=1, server_steps=0, seed=0)
    shared = data.plan.shared_data(data.split.train)
    directory = Directory({1: np.arange(5), 2: np.arange(5, 10)},
                          {u: 3 for u in range(10)}, shared)
    return FedShareStrategy(config, directory, max_failed=0.5)


def _reply(table: np.ndarray, weight: float = 3.0, users: int = 1,
           fru: tuple[list[int], list[int]] | None = None) -> RecordDict:
    arrays = ArrayRecord({TABLE: Array(table), ROW_WEIGHT: Array(
        np.full(NUM_ITEMS, weight, dtype=np.float32))})
    if fru is not None:
        arrays[FRU_USERS] = Array(np.array(fru[0], dtype=np.int64))
        arrays[FRU_BYTES] = Array(np.array(fru[1], dtype=np.int64))
    return RecordDict({"arrays": arrays,
                       "metrics": MetricRecord({WEIGHT: weight, NUM_USERS: users})})


def test_only_sound_replies_are_averaged_and_the_rest_logged(strategy):
    strategy.sampled = {1: [0], 2: [5], 3: [1], 4: [6]}
    start = strategy.server.table
    good = (start + 1.0).numpy().astype(np.float32)
    nan = good.copy()
    nan[0, 0] = np.nan
    missing = RecordDict({"arrays": ArrayRecord({TABLE: Array(good)}),
                          "metrics": MetricRecord({WEIGHT: 3.0, NUM_USERS: 1})})
    accepted = strategy.accept_replies(1, [(1, _reply(good, fru=([0], [136]))),
                                           (2, _reply(nan, fru=([5], [999]))),
                                           (3, missing),
                                           (4, _reply(good, users=5))])
    assert len(accepted) == 1 and torch.equal(accepted[0].table, start + 1.0)
    assert [(r["node"], r["round"]) for r in strategy.rejected] == [(2, 1), (3, 1), (4, 1)]
    assert "non-finite" in strategy.rejected[0]["reason"]
    assert "malformed" in strategy.rejected[1]["reason"]
    assert "sampled" in strategy.rejected[2]["reason"]
    # only accepted replies report FRU stores to the ledger
    assert strategy.server.ledger.held(client(0), KIND) == 136
    assert strategy.server.ledger.held(client(5), KIND) == 0


def test_a_round_with_too_many_failures_changes_nothing(strategy, caplog):
    strategy.sampled = {1: [0], 2: [5], 3: [6]}
    start = strategy.server.table.clone()
    bad = np.full((NUM_ITEMS, DIM), np.inf, dtype=np.float32)
    updates = strategy.accepted_updates(1, [])  # every node timed out
    table = strategy.learning(1, updates)
    assert updates is None and torch.equal(table, start)
    assert strategy.log.rounds[-1]["num-users"] == 0
    good = (start + 1).numpy()
    replies = [(1, _reply(good)), (2, _reply(bad)), (3, _reply(bad))]
    accepted = len(strategy.accept_replies(1, replies))
    assert accepted == 1 and strategy.checks.too_many_failures(3, accepted)  # 2 of 3 > 0.5
    strategy.sampled = {1: [0], 2: [5]}
    accepted = len(strategy.accept_replies(1, replies[:2]))
    assert accepted == 1 and not strategy.checks.too_many_failures(2, accepted)  # tolerated


@pytest.mark.parametrize("setting", ["max-failed-fraction=1.5", "fru-alpha=-0.1",
                                     "max-failed-fraction=true"])
def test_fault_settings_out_of_range_fail_early(setting):
    with pytest.raises(FedShareError):
        resolve(None, [setting])


SERVED = np.array([3, 4, 5])


def test_a_sound_share_reply_passes():
    assert share_problem(SERVED, np.array([3, 5]), np.array([1, 7]), 10, NUM_ITEMS, {0}) is None


@pytest.mark.parametrize(("served", "users", "items", "claimed", "words"), [
    (SERVED, np.array([3]), np.array([NUM_ITEMS]), set(), "unknown item"),
    (SERVED, np.array([3]), np.array([-1]), set(), "unknown item"),
    (SERVED, np.array([6]), np.array([1]), set(), "does not serve"),
    (SERVED, np.array([3, 3]), np.array([1, 1]), set(), "shared twice"),
    (SERVED, np.array([3]), np.array([1]), {4}, "another node"),
    (np.array([3, 3]), np.array([3]), np.array([1]), set(), "twice"),
    (np.array([3, 10]), np.array([3]), np.array([1]), set(), "outside the catalogue"),
    (SERVED, np.array([3, 4]), np.array([1]), set(), "malformed"),
])
def test_forged_share_replies_are_rejected(served, users, items, claimed, words):
    problem = share_problem(served, users, items, 10, NUM_ITEMS, claimed)
    assert problem is not None and words in problem


def test_replies_that_would_dominate_or_were_not_asked_for_are_rejected(strategy):
    strategy.sampled = {1: [0, 1], 2: [5]}  # |D_u| = 3 each: node 1 may weigh up to 6
    good = (strategy.server.table + 1).numpy()
    replies = [(1, _reply(good, weight=6.0, users=2)),       # at the bound: accepted
               (2, _reply(good, weight=1e30)),               # far above its users' |D_u|
               (7, _reply(good)),                            # never asked to train
               (2, _reply(good, weight=3.0, users=0))]       # a weight without users
    assert len(strategy.accept_replies(3, replies)) == 1
    reasons = [r["reason"] for r in strategy.rejected]
    assert "at most 3" in reasons[0] and "not asked" in reasons[1]
    assert "without trained users" in reasons[2]


@pytest.mark.parametrize("fru", [([0], [-5]), ([0, 1], [10]), ([5], [10])],
                         ids=["negative", "lengths", "other-users"])
def test_bad_fru_store_reports_reject_the_reply_and_change_no_ledger(strategy, fru):
    strategy.sampled = {1: [0, 1]}
    good = (strategy.server.table + 1).numpy()
    assert strategy.accept_replies(1, [(1, _reply(good, fru=fru))]) == []
    assert "malformed" in strategy.rejected[0]["reason"]
    assert strategy.server.ledger.held(kind=KIND) == 0


# ------------------------------------------------------------------ unsharing requests
@pytest.fixture
def durable_strategy(tmp_path):
    from fedshare.federated.state_db import StateDB

    data = tiny_prepared(10, NUM_ITEMS)
    config = FederatedConfig(dim=DIM, rounds=1, server_steps=0, seed=0)
    shared = data.plan.shared_data(data.split.train)
    store = StateDB(tmp_path / "state.db", 10, NUM_ITEMS)
    store.set_shared(shared)
    directory = Directory({1: np.arange(5), 2: np.arange(5, 10)},
                          {u: 3 for u in range(10)}, shared)
    yield data, FedShareStrategy(config, directory, max_failed=0.5, store=store)
    store.close()


def _request_reply(users, items) -> RecordDict:
    return RecordDict({"arrays": ArrayRecord({"unshare-users": Array(np.asarray(users)),
                                              "unshare-items": Array(np.asarray(items))})})


def _pairs(interactions) -> set[tuple[int, int]]:
    return set(zip(interactions.users.tolist(), interactions.items.tolist(), strict=True))


@pytest.mark.parametrize(("node", "content"), [
    (2, _request_reply([0], [1])),  # node 2 speaks for user 0, whom node 1 announced
    (3, _request_reply([0], [1])),  # a node that announced nobody
    (1, _request_reply([0, 1], [1])),  # lengths differ
    (1, _request_reply([[0]], [[1]])),  # not vectors
    (1, _request_reply([0.0], [1.0])),  # not integers
    (1, RecordDict({"arrays": ArrayRecord({"unshare-users": Array(np.array([0]))})})),
    (1, RecordDict({})),
])
def test_forged_and_malformed_unsharing_requests_are_dropped(durable_strategy, node, content):
    from strategies.unlearning import requests_from

    _, strategy = durable_strategy
    assert requests_from(strategy, node, content) == []
    assert strategy.rejected[-1]["node"] == node
    assert "unsharing requests" in strategy.rejected[-1]["reason"]


def test_requests_for_unshared_items_change_nothing_and_a_repeat_is_served_once(
        durable_strategy):
    from fedshare.unlearning.shared_store import SharedStore
    from strategies.unlearning import accept_requests

    data, strategy = durable_strategy
    train, plan = data.split.train, data.plan
    user = int(train.users[plan.shared][0])
    shared_items = train.items[plan.shared & (train.users == user)]
    local = train.items[~plan.shared & (train.users == user)]
    never = np.setdiff1d(np.arange(NUM_ITEMS), train.items[train.users == user])
    store = SharedStore(strategy.server.shared)
    before = _pairs(store.interactions())
    forged = [(user, np.append(shared_items[:1], never[0]))]  # one shared, one never seen
    if len(local):
        forged.append((user, local[:1]))  # a local interaction: the server never had it
    assert accept_requests(strategy, store, forged) == 0
    assert _pairs(store.interactions()) == before
    assert strategy.store.pending() == [] and strategy.store.served_count() == 0
    assert len(strategy.rejected) == len(forged)
    assert accept_requests(strategy, store, [(user, shared_items)]) == 1
    assert _pairs(store.interactions()) == before - {(user, int(i)) for i in shared_items}
    (pending,) = strategy.store.pending()
    assert pending.user == user and pending.items.tolist() == sorted(shared_items.tolist())
    again = SharedStore(strategy.server.shared)  # a restarted server, the device repeats
    assert accept_requests(strategy, again, [(user, shared_items)]) == 1  # the logged one
    assert _pairs(again.interactions()) == _pairs(store.interactions())
    assert len(strategy.store.pending()) == 1


@pytest.mark.parametrize(("metrics", "words"), [
    ({"valid:hr@20": 2.0, "valid:count": 3.0}, None),
    ({"valid:hr@20": 2.0}, "user count"),
    ({"valid:hr@20": 2.0, "valid:count": -1.0}, "user count"),
    ({"valid:hr@20": 2.0, "valid:count": 2.5}, "user count"),
    ({"valid:hr@20": 2.0, "valid:count": float("inf")}, "user count"),
    ({"valid:hr@20": float("nan"), "valid:count": 3.0}, "outside"),
    ({"valid:hr@20": 4.0, "valid:count": 3.0}, "outside"),
    ({"valid:hr@20": -0.5, "valid:count": 3.0}, "outside"),
    ({"valid:hr@20": 1.0, "valid:count": 3.0, "test:hr@20": 1.0}, "not asked"),
])
def test_forged_evaluations_are_not_counted(metrics, words):
    from fedshare.protocol import read_evaluate_reply

    content = RecordDict({"metrics": MetricRecord(metrics)})
    if words is None:
        assert read_evaluate_reply(content, ("valid",)) == {"valid": ({"hr@20": 2.0}, 3)}
    else:
        with pytest.raises(ValueError, match=words):
            read_evaluate_reply(content, ("valid",))


def test_a_user_may_unshare_more_later_and_served_items_are_not_asked_again(durable_strategy):
    from fedshare.unlearning.shared_store import SharedStore
    from strategies.unlearning import accept_requests

    data, strategy = durable_strategy
    train, plan = data.split.train, data.plan
    owners = np.unique(train.users[plan.shared])
    user = next(int(u) for u in owners if (plan.shared & (train.users == u)).sum() >= 2)
    items = np.sort(train.items[plan.shared & (train.users == user)])
    store = SharedStore(strategy.server.shared)
    assert accept_requests(strategy, store, [(user, items[:1])]) == 1
    strategy.store.serve(strategy.store.pending())
    assert strategy.store.unserved(user, items).tolist() == items[1:].tolist()
    later = SharedStore(strategy.store.shared())  # the device now announces both
    assert accept_requests(strategy, later, [(user, items)]) == 1
    (pending,) = strategy.store.pending()
    assert pending.items.tolist() == items[1:].tolist()
    strategy.store.serve(strategy.store.pending())
    assert accept_requests(strategy, SharedStore(strategy.store.shared()),
                           [(user, items)]) == 0  # everything in it was served
    assert strategy.store.served_count() == 2
