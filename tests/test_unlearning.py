"""The unlearning phase (Sec. IV-C, IV-D; Eq. 19-25; Algorithm 2) on a tiny synthetic dataset.

The shared store is checked pair by pair, the forgotten graph and views against dense matrices,
L_CU against a hand-computed 2-D example, canaries and the remaining data against their
definitions, and every unlearning method on one small learned federation: no server store may
hold a forgotten interaction afterwards, the learned state must stay as it was, and each method
must be deterministic.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time

import numpy as np
import pytest
import synthetic
import torch

from fedshare.data.interactions import Interactions
from fedshare.data.prepared import PreparedData
from fedshare.errors import FedShareError
from fedshare.federated.config import FederatedConfig
from fedshare.federated.population import ClientPopulation
from fedshare.graph import BipartiteGraph
from fedshare.unlearning import phase
from fedshare.unlearning.config import UnlearningConfig
from fedshare.unlearning.contrastive import contrastive_unlearning_loss, forgotten_views
from fedshare.unlearning.effect import forgotten_recall, membership_auc
from fedshare.unlearning.remaining import add_canaries, remaining_data
from fedshare.unlearning.report import outcome_scorer, unlearning_row
from fedshare.unlearning.shared_store import SharedStore, UnshareRequest

NUM_USERS, NUM_ITEMS, DIM = 12, 40, 8
CONFIG = FederatedConfig(rounds=3, eval_every=3, fraction=0.5, server_steps=3, snapshots=2,
                         server_batch_size=64, dim=DIM, seed=0)
UNLEARNING = UnlearningConfig(rounds=2, steps=2)
FEDSHARE_TYPE = ("fedshare", "wo-forgotten-graph", "wo-remaining-fl", "fedshare-reset")


def tiny_prepared(seed: int = 0) -> PreparedData:
    """12 users x 40 items, 8-15 distinct items per user; half of the sharers unshare."""
    return synthetic.tiny_prepared(NUM_USERS, NUM_ITEMS, seed, unshare_user_fraction=0.5)


def pairs(data: Interactions) -> set[tuple[int, int]]:
    return set(zip(data.users.tolist(), data.items.tolist(), strict=True))


def user_items(data: Interactions, user: int) -> set[int]:
    return set(data.items[data.users == user].tolist())


@pytest.fixture(scope="module")
def data() -> PreparedData:
    prepared = tiny_prepared()
    train = prepared.split.train
    assert len(prepared.plan.unsharing_users(train)) >= 2
    assert prepared.plan.unlearn.sum() >= 4
    assert len(pairs(train)) == len(train)  # no duplicate rows
    return prepared


@pytest.fixture(scope="module")
def shared(data) -> Interactions:
    return data.plan.shared_data(data.split.train)


@pytest.fixture(scope="module")
def forgotten_pairs(data) -> set[tuple[int, int]]:
    return pairs(data.plan.to_unlearn(data.split.train))


# ---------------------------------------------------------------- SharedStore (Eq. 19-20)
def _two_sharers(shared: Interactions) -> tuple[int, int]:
    """Two users who each shared at least three items."""
    degrees = shared.user_degrees()
    a, b = np.flatnonzero(degrees >= 3)[:2]
    return int(a), int(b)


def test_store_starts_as_d_s(shared):
    store = SharedStore(shared)
    assert len(store) == len(shared)
    assert pairs(store.interactions()) == pairs(shared)
    assert store.log == []
    assert len(store.forgotten()) == 0
    u, i = int(shared.users[0]), int(shared.items[0])
    assert store.contains(u, i)


def test_unshare_removes_exactly_the_requested_pairs(shared):
    store = SharedStore(shared)
    user, _ = _two_sharers(shared)
    items = sorted(user_items(shared, user))[:2]
    before = time.time()
    request = store.unshare(user, items)
    assert request == store.log[-1]
    assert (request.user, request.count) == (user, 2)
    assert before <= request.at <= time.time()
    expected = pairs(shared) - {(user, i) for i in items}
    got = store.interactions()
    assert pairs(got) == expected and len(got) == len(expected)
    assert (got.num_users, got.num_items) == (shared.num_users, shared.num_items)
    assert len(store) == len(shared) - 2
    assert not store.contains(user, items[0]) and not store.contains(user, items[1])
    assert pairs(store.forgotten()) == {(user, i) for i in items}


def _bad_requests(shared: Interactions) -> list[tuple[str, int, list[int]]]:
    a, b = _two_sharers(shared)
    mine, theirs = user_items(shared, a), user_items(shared, b)
    never = sorted(set(range(NUM_ITEMS)) - mine)[0]
    other = sorted(theirs - mine)[0]
    return [("unknown user (negative)", -1, [0]),
            ("unknown user (too large)", NUM_USERS, [0]),
            ("item the user never shared", a, [never]),
            ("item shared by another user", a, [other]),
            ("one valid and one invalid item", a, [sorted(mine)[0], never]),
            ("empty request", a, [])]


BAD_REQUESTS = ("unknown user (negative)", "unknown user (too large)",
                "item the user never shared", "item shared by another user",
                "one valid and one invalid item", "empty request")


@pytest.mark.parametrize("case", range(len(BAD_REQUESTS)), ids=BAD_REQUESTS)
def test_invalid_unshare_raises_and_changes_nothing(shared, case):
    store = SharedStore(shared)
    a, _ = _two_sharers(shared)
    store.unshare(a, [sorted(user_items(shared, a))[-1]])  # one earlier, valid request
    current, log_length, pending = pairs(store.interactions()), len(store.log), \
        pairs(store.forgotten())
    what, user, items = _bad_requests(shared)[case]
    assert what == BAD_REQUESTS[case]
    with pytest.raises(FedShareError):
        store.unshare(user, items)
    assert pairs(store.interactions()) == current, what
    assert len(store) == len(current)
    assert len(store.log) == log_length
    assert pairs(store.forgotten()) == pending


@pytest.mark.parametrize(("user", "item"), [(0, 4), (2, -1), (0, 5), (1, -3)])
def test_out_of_range_item_ids_never_alias_another_users_pair(user, item):
    """Keys are ``user * num_items + item``: an item id outside [0, num_items) must be rejected
    rather than hit a neighbouring user's key ((0, 4) is the key of (1, 0); (2, -1) of (1, 3);
    (0, 5) of (1, 1), which nobody shared; (1, -3) of (0, 1))."""
    shared = Interactions.from_arrays(np.array([0, 1, 1, 2]), np.array([1, 0, 3, 2]), 3, 4)
    store = SharedStore(shared)
    with pytest.raises(FedShareError):
        store.unshare(user, [item])
    assert pairs(store.interactions()) == pairs(shared)
    assert store.log == []
    assert len(store.forgotten()) == 0


def test_unsharing_an_item_twice_fails_the_second_time(shared):
    store = SharedStore(shared)
    a, _ = _two_sharers(shared)
    item = sorted(user_items(shared, a))[0]
    store.unshare(a, [item])
    with pytest.raises(FedShareError):
        store.unshare(a, [item])
    assert len(store.log) == 1
    assert pairs(store.forgotten()) == {(a, item)}


def test_duplicate_items_in_a_request_are_tolerated(shared):
    store = SharedStore(shared)
    a, _ = _two_sharers(shared)
    first, second = sorted(user_items(shared, a))[:2]
    request = store.unshare(a, np.array([first, second, first, first]))
    assert request.count == 2
    assert pairs(store.interactions()) == pairs(shared) - {(a, first), (a, second)}
    forgotten = store.forgotten()
    assert len(forgotten) == 2
    assert pairs(forgotten) == {(a, first), (a, second)}


def test_several_requests_then_erase_pending(shared):
    store = SharedStore(shared)
    a, b = _two_sharers(shared)
    first = sorted(user_items(shared, a))[:2]
    second = sorted(user_items(shared, b))[:3]
    third = sorted(user_items(shared, a))[2:3]
    union = {(a, i) for i in first + third} | {(b, i) for i in second}
    store.unshare(a, first)
    store.unshare(b, second)
    store.unshare(a, third)
    forgotten = store.forgotten()
    assert pairs(forgotten) == union and len(forgotten) == len(union)
    assert (forgotten.num_users, forgotten.num_items) == (NUM_USERS, NUM_ITEMS)
    assert pairs(store.interactions()) == pairs(shared) - union
    assert len(store) == len(shared) - len(union)

    store.erase_pending()
    assert len(store.forgotten()) == 0
    assert pairs(store.interactions()) == pairs(shared) - union  # D_s stays reduced
    assert [(r.user, r.count) for r in store.log] == [(a, 2), (b, 3), (a, 1)]
    times = [r.at for r in store.log]
    assert times == sorted(times)
    # the permanent log keeps who, how many and when: never which items
    assert [f.name for f in dataclasses.fields(UnshareRequest)] == ["user", "count", "at"]
    for request in store.log:
        assert all(isinstance(getattr(request, f), int | float) for f in ("user", "count", "at"))
        assert not hasattr(request, "items")


# ---------------------------------------------------------------- forgotten graph (Eq. 23-24)
@pytest.fixture(scope="module")
def forgotten(data) -> Interactions:
    store = SharedStore(data.plan.shared_data(data.split.train))
    phase.issue_requests(data, store)
    return store.forgotten()


def _dense_adjacency(edges: Interactions) -> np.ndarray:
    n = edges.num_users + edges.num_items
    a = np.zeros((n, n))
    for u, i in zip(edges.users, edges.items, strict=True):
        a[u, edges.num_users + i] = a[edges.num_users + i, u] = 1.0
    return a


def _normalised(a: np.ndarray) -> np.ndarray:
    deg = a.sum(1)
    inv = np.zeros(len(deg))
    inv[deg > 0] = deg[deg > 0] ** -0.5
    return inv[:, None] * a * inv[None, :]


def _dense_lightgcn_items(edges: Interactions, users: torch.Tensor, items: torch.Tensor,
                          num_layers: int, include_self: bool) -> np.ndarray:
    a_hat = _normalised(_dense_adjacency(edges))
    x = np.concatenate([users.double().numpy(), items.double().numpy()])
    total = x.copy() if include_self else np.zeros_like(x)
    for _ in range(num_layers):
        x = a_hat @ x
        total = total + x
    return (total / (num_layers + int(include_self)))[edges.num_users:]


def test_forgotten_interactions_are_the_to_unlearn_rows(forgotten, forgotten_pairs):
    assert pairs(forgotten) == forgotten_pairs
    assert len(forgotten) == len(forgotten_pairs)


def test_forgotten_graph_has_exactly_the_unshared_edges(forgotten, forgotten_pairs):
    graph = BipartiteGraph(forgotten)
    adj = graph.adj.to_dense().double().numpy()
    rows, cols = np.nonzero(adj)
    expected = {(u, NUM_USERS + i) for u, i in forgotten_pairs} | \
        {(NUM_USERS + i, u) for u, i in forgotten_pairs}
    assert set(zip(rows.tolist(), cols.tolist(), strict=True)) == expected
    np.testing.assert_allclose(adj, _normalised(_dense_adjacency(forgotten)), atol=1e-6)
    in_graph = np.zeros(NUM_USERS + NUM_ITEMS, bool)
    in_graph[forgotten.users] = True
    in_graph[NUM_USERS + forgotten.items] = True
    assert in_graph.sum() < len(in_graph)
    assert not adj[~in_graph].any() and not adj[:, ~in_graph].any()


@pytest.fixture(scope="module")
def tables() -> tuple[torch.Tensor, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    users = torch.randn(NUM_USERS, DIM, generator=gen)
    return users, [torch.randn(NUM_ITEMS, DIM, generator=gen) for _ in range(2)]


def test_forgotten_views_without_graph_are_the_snapshots(forgotten, tables):
    users, snapshots = tables
    views = forgotten_views(snapshots, users, forgotten, 3, use_graph=False)
    assert views.shape == (2, NUM_ITEMS, DIM)
    assert torch.equal(views, torch.stack(snapshots))


@pytest.mark.parametrize("num_layers", [1, 3])
def test_forgotten_views_with_self(forgotten, tables, num_layers):
    users, snapshots = tables
    views = forgotten_views(snapshots, users, forgotten, num_layers, use_graph=True,
                            include_self=True)
    graph = BipartiteGraph(forgotten)
    assert views.shape == (2, NUM_ITEMS, DIM)
    for m, snapshot in enumerate(snapshots):
        expected = graph.propagate(users, snapshot, num_layers)[1]
        torch.testing.assert_close(views[m], expected)
        dense = _dense_lightgcn_items(forgotten, users, snapshot, num_layers, True)
        np.testing.assert_allclose(views[m].numpy(), dense, atol=1e-5)


@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_forgotten_views_without_self_are_the_mean_of_layers_1_to_l(forgotten, tables,
                                                                    num_layers):
    users, snapshots = tables
    views = forgotten_views(snapshots, users, forgotten, num_layers, use_graph=True,
                            include_self=False)
    assert not views.requires_grad
    outside = np.setdiff1d(np.arange(NUM_ITEMS), forgotten.items)
    assert len(outside) > 0
    for m, snapshot in enumerate(snapshots):
        dense = _dense_lightgcn_items(forgotten, users, snapshot, num_layers, False)
        np.testing.assert_allclose(views[m].numpy(), dense, atol=1e-5)
        assert not views[m][torch.from_numpy(outside)].any()  # not in G_f: nothing arrives
        assert views[m][torch.from_numpy(np.unique(forgotten.items))].abs().sum(1).gt(0).all()


def test_forgotten_views_need_a_snapshot(forgotten, tables):
    users, _ = tables
    for use_graph in (True, False):
        with pytest.raises(FedShareError):
            forgotten_views([], users, forgotten, 3, use_graph=use_graph)


# ---------------------------------------------------------------- L_CU (Eq. 25)
def _polar(angle: float, radius: float) -> list[float]:
    return [radius * math.cos(angle), radius * math.sin(angle)]


def test_contrastive_unlearning_loss_by_hand():
    tau = 0.5
    # item: (local angle, global angle, forgotten angles (M = 2), has forgotten views)
    spec = [(0.0, 0.4, (1.0, -0.7), True),
            (1.2, 2.0, (0.1, 0.2), False),
            (-2.5, 3.0, (0.5, -2.0), True)]
    local = torch.tensor([_polar(s[0], 3.0) for s in spec])
    global_ = torch.tensor([_polar(s[1], 0.5) for s in spec])
    forgotten = torch.tensor([[_polar(s[2][m], 1.0 + m) for s in spec] for m in range(2)])
    has = torch.tensor([s[3] for s in spec])
    assert forgotten.shape == (2, 3, 2)

    terms = []
    for l_angle, g_angle, f_angles, has_f in spec:
        term = -math.cos(l_angle - g_angle) / tau
        if has_f:
            term += math.log(sum(math.exp(math.cos(l_angle - f) / tau) for f in f_angles))
        terms.append(term)
    expected = sum(terms) / len(terms)
    got = contrastive_unlearning_loss(local, global_, forgotten, has, tau)
    assert got.shape == ()
    assert float(got) == pytest.approx(expected, abs=1e-5)

    # explicit numbers for the item without forgotten views alone: -cos(0.8) / 0.5
    alone = contrastive_unlearning_loss(local[1:2], global_[1:2], forgotten[:, 1:2], has[1:2],
                                        tau)
    assert float(alone) == pytest.approx(-1.3934134, abs=1e-5)
    # no forgotten items: plain alignment
    none = contrastive_unlearning_loss(local, global_, forgotten, torch.zeros(3, dtype=bool),
                                       tau)
    assert float(none) == pytest.approx(
        -sum(math.cos(s[0] - s[1]) for s in spec) / 3 / tau, abs=1e-5)


def test_contrastive_unlearning_gradient_pushes_local_away_from_forgotten_views():
    tau = 0.5
    local = torch.tensor([[1.0, 0.0], _polar(2.0, 1.0)], requires_grad=True)
    global_ = local.detach() * 2.0  # aligned: the positive term has zero gradient
    forgotten = torch.tensor([[_polar(0.6, 1.0), _polar(0.3, 1.0)],
                              [_polar(0.9, 2.0), _polar(2.5, 1.0)]])
    has = torch.tensor([True, False])
    loss = contrastive_unlearning_loss(local, global_, forgotten, has, tau)
    loss.backward()
    grad = local.grad
    assert grad[0].abs().sum() > 1e-3
    assert grad[1].abs().sum() < 1e-6  # aligned, no negatives: nothing to change
    stepped = (local - 0.05 * grad).detach()

    def cos(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(torch.nn.functional.cosine_similarity(a, b, dim=0))

    for m in range(2):
        assert cos(stepped[0], forgotten[m, 0]) < cos(local[0].detach(), forgotten[m, 0])
    stepped_loss = contrastive_unlearning_loss(stepped, global_, forgotten, has, tau)
    assert float(stepped_loss) < float(loss.detach())


# ---------------------------------------------------------------- UnlearningConfig
@pytest.mark.parametrize("kwargs", [{"rounds": 0}, {"rounds": -1}, {"steps": -1}, {"tau": 0.0},
                                    {"tau": -0.5}, {"lr": 0.0}, {"lr": -1e-3}])
def test_unlearning_config_rejects_bad_values(kwargs):
    with pytest.raises(FedShareError):
        UnlearningConfig(**kwargs)


def test_unlearning_config_accepts_edges_and_round_trips():
    config = UnlearningConfig(rounds=1, steps=0, tau=1e-3, lr=1e-6)
    assert UnlearningConfig(**config.to_dict()) == config
    assert set(config.to_dict()) == {f.name for f in dataclasses.fields(UnlearningConfig)}


# ---------------------------------------------------------------- remaining data, canaries
def _frames_equal(a: Interactions, b: Interactions) -> bool:
    return (a.num_users, a.num_items) == (b.num_users, b.num_items) and a.frame.equals(b.frame)


def test_remaining_data_drops_exactly_the_to_unlearn_rows(data):
    train, plan = data.split.train, data.plan
    before = train.frame.copy()
    remaining = remaining_data(data)
    new_train, new_plan = remaining.split.train, remaining.plan
    assert new_train.frame.equals(train.frame[~plan.unlearn].reset_index(drop=True))
    assert len(new_train) == len(train) - int(plan.unlearn.sum())
    assert len(new_plan.shared) == len(new_plan.unlearn) == len(new_train)
    assert not new_plan.unlearn.any()
    np.testing.assert_array_equal(new_plan.shared, plan.shared[~plan.unlearn])
    np.testing.assert_array_equal(new_plan.group, plan.group)
    assert pairs(new_plan.shared_data(new_train)) == pairs(plan.remaining_shared(train))
    assert pairs(new_plan.local(new_train)) == pairs(plan.local(train))
    assert len(new_plan.unsharing_users(new_train)) == 0
    assert _frames_equal(remaining.split.valid, data.split.valid)
    assert _frames_equal(remaining.split.test, data.split.test)
    assert (remaining.dataset, remaining.split_seed, remaining.split_fractions) == \
        (data.dataset, data.split_seed, data.split_fractions)
    assert train.frame.equals(before)  # the input is not modified


@pytest.mark.parametrize("common", [False, True])
def test_add_canaries(data, common):
    per_user = 3
    train, plan = data.split.train, data.plan
    unsharing = plan.unsharing_users(train)
    new, canaries = add_canaries(data, per_user, seed=0, common=common)
    new_train, new_plan = new.split.train, new.plan

    # appended to train as shared, to-unlearn rows; the rest untouched
    assert len(new_train) == len(train) + len(canaries)
    assert new_train.frame.iloc[:len(train)].reset_index(drop=True).equals(train.frame)
    assert pairs(new_train.subset(np.arange(len(new_train)) >= len(train))) == pairs(canaries)
    np.testing.assert_array_equal(new_plan.shared[:len(train)], plan.shared)
    np.testing.assert_array_equal(new_plan.unlearn[:len(train)], plan.unlearn)
    assert new_plan.shared[len(train):].all() and new_plan.unlearn[len(train):].all()
    np.testing.assert_array_equal(new_plan.group, plan.group)
    assert _frames_equal(new.split.valid, data.split.valid)
    assert _frames_equal(new.split.test, data.split.test)
    np.testing.assert_array_equal(new_plan.unsharing_users(new_train), unsharing)

    # only unsharing users, per_user distinct canaries each, never an item they interacted with
    assert set(canaries.users.tolist()) == set(unsharing.tolist())
    assert len(pairs(canaries)) == len(canaries) == per_user * len(unsharing)
    every = [data.split.train, data.split.valid, data.split.test]
    for user in unsharing:
        mine = set(canaries.items[canaries.users == user].tolist())
        assert len(mine) == per_user
        for part in every:
            assert not mine & user_items(part, int(user))
    if common:
        sets = {frozenset(canaries.items[canaries.users == u].tolist()) for u in unsharing}
        assert len(sets) == 1
        (chosen,) = sets
        for part in every:
            touched = part.items[np.isin(part.users, unsharing)]
            assert not chosen & set(touched.tolist())

    # deterministic per seed; canaries disappear with the remaining data
    again, canaries_again = add_canaries(data, per_user, seed=0, common=common)
    assert canaries_again.frame.equals(canaries.frame)
    assert again.split.train.frame.equals(new_train.frame)
    assert not pairs(remaining_data(new).split.train) & pairs(canaries)


def test_per_user_canaries_depend_on_the_seed(data):
    _, a = add_canaries(data, 3, seed=0)
    _, b = add_canaries(data, 3, seed=1)
    assert pairs(a) != pairs(b)


# ---------------------------------------------------------------- the unlearning methods
def _state(federation) -> dict:
    """Copies of everything an unlearning method must not touch on the learned federation."""
    server, population = federation.server, federation.population
    return {"table": server.table.clone(), "item": server.item.detach().clone(),
            "user": server.user.detach().clone(),
            "snapshots": [s.clone() for s in server.snapshots],
            "shared": pairs(server.shared), "graph_edges": server.graph.num_edges,
            "adj": server.graph.adj.to_dense().clone(),
            "embeddings": population.embeddings.clone(),
            "train": pairs(population.train_data),
            "client_shared": set(zip(*(x.tolist() for x in population.shared_interactions()),
                                     strict=True)),
            "data": federation.data}


@pytest.fixture(scope="module")
def learned(data):
    torch.set_num_threads(1)
    federation = phase.learn(data, CONFIG, record=True)
    assert len(federation.server.snapshots) == CONFIG.snapshots
    return federation, _state(federation)


@pytest.fixture(scope="module")
def outcomes(data, learned):
    federation, _ = learned
    return {m: phase.unlearn(federation, data, m, UNLEARNING, CONFIG.rounds)
            for m in phase.METHODS}


def test_methods_are_listed():
    assert set(phase.METHODS) == {"no-unlearning", "retrain", "fru", "cufru", *FEDSHARE_TYPE}


def _assert_unchanged(federation, before: dict) -> None:
    after = _state(federation)
    for key in ("table", "item", "user", "embeddings", "adj"):
        assert torch.equal(after[key], before[key]), key
    assert len(after["snapshots"]) == len(before["snapshots"])
    for a, b in zip(after["snapshots"], before["snapshots"], strict=True):
        assert torch.equal(a, b)
    for key in ("shared", "graph_edges", "train", "client_shared"):
        assert after[key] == before[key], key
    assert after["data"] is before["data"]


def test_learned_state_is_not_mutated(learned, outcomes):
    federation, before = learned
    _assert_unchanged(federation, before)
    for outcome in outcomes.values():
        assert outcome.federation is not federation
        assert outcome.federation.server is not federation.server


@pytest.mark.parametrize("method", phase.METHODS)
def test_no_server_store_holds_a_forgotten_pair(data, outcomes, forgotten_pairs, method):
    outcome = outcomes[method]
    assert outcome.method == method
    server = outcome.federation.server
    remaining_shared = pairs(data.plan.remaining_shared(data.split.train))
    assert pairs(server.shared) == remaining_shared
    assert not pairs(server.shared) & forgotten_pairs
    adj = server.graph.adj.to_dense()
    rows, cols = (x.tolist() for x in adj.nonzero(as_tuple=True))
    edges = set(zip(rows, cols, strict=True))
    assert edges == {(u, NUM_USERS + i) for u, i in remaining_shared} | \
        {(NUM_USERS + i, u) for u, i in remaining_shared}
    assert server.graph.num_edges == len(remaining_shared)


@pytest.mark.parametrize("method", phase.METHODS)
def test_clients_forget_their_unshared_interactions(data, outcomes, forgotten_pairs, method):
    federation = outcomes[method].federation
    population = federation.population
    assert not pairs(population.train_data) & forgotten_pairs
    assert pairs(population.train_data) == pairs(remaining_data(data).split.train)
    client_shared = set(zip(*(x.tolist() for x in population.shared_interactions()),
                            strict=True))
    assert not client_shared & forgotten_pairs
    assert not pairs(federation.data.split.train) & forgotten_pairs


@pytest.mark.parametrize("method", phase.METHODS)
def test_store_pending_list_is_erased(data, outcomes, method):
    outcome = outcomes[method]
    if method == "retrain":
        assert outcome.store is None
        return
    store = outcome.store
    assert len(store.forgotten()) == 0
    train = data.split.train
    unlearn_users = train.users[data.plan.unlearn]
    expected = sorted((int(u), int((unlearn_users == u).sum()))
                      for u in np.unique(unlearn_users))
    assert sorted((r.user, r.count) for r in store.log) == expected
    assert pairs(store.interactions()) == pairs(data.plan.remaining_shared(train))


@pytest.mark.parametrize("method", FEDSHARE_TYPE)
def test_pre_request_snapshots_are_deleted(learned, outcomes, method):
    _, before = learned
    server = outcomes[method].federation.server
    assert len(server.snapshots) == 1
    assert torch.equal(server.snapshots[0], server.table)
    for old in before["snapshots"]:
        for kept in server.snapshots:
            assert not torch.equal(kept, old)


@pytest.mark.parametrize("method", phase.METHODS)
def test_kept_bytes(learned, outcomes, method):
    expected = CONFIG.snapshots * NUM_ITEMS * DIM * 4 if method in FEDSHARE_TYPE else 0
    if method in ("fru", "cufru"):  # every store of the method (formulas: test_fru_cufru.py)
        ledger = learned[0].ledger
        expected = sum(ledger.held(kind=k) for k in phase.KEPT_KINDS[method])
        assert expected > 0
    assert outcomes[method].kept_bytes == expected
    assert outcomes[method].client_bytes == (expected if method == "fru" else 0) - (
        sum(learned[0].ledger.held("server", k) for k in phase.KEPT_KINDS["fru"])
        if method == "fru" else 0)
    assert outcomes[method].seconds > 0


def test_which_methods_change_the_model(learned, outcomes):
    _, before = learned
    tables = {m: o.federation.server.table for m, o in outcomes.items()}
    embeddings = {m: o.federation.population.embeddings for m, o in outcomes.items()}
    assert torch.equal(tables["no-unlearning"], before["table"])
    assert torch.equal(embeddings["no-unlearning"], before["embeddings"])
    for method in (*FEDSHARE_TYPE, "fru", "cufru", "retrain"):
        assert not torch.equal(tables[method], before["table"]), method
    assert not torch.equal(tables["fedshare"], tables["wo-forgotten-graph"])
    # wo-remaining-fl reuses the table as the local view: no client trains
    assert torch.equal(embeddings["wo-remaining-fl"], before["embeddings"])
    for method in ("fedshare", "wo-forgotten-graph"):
        assert not torch.equal(embeddings[method], before["embeddings"]), method


@pytest.mark.parametrize(("method", "rounds_trained"),
                         [("no-unlearning", 0), ("wo-remaining-fl", 0), ("fedshare", 2),
                          ("wo-forgotten-graph", 2)])
def test_client_training_calls(data, learned, monkeypatch, method, rounds_trained):
    federation, _ = learned
    calls = []
    original = ClientPopulation.train

    def counting(self, users, table, config, seed, round_, *args, **kwargs):
        calls.append(round_)
        return original(self, users, table, config, seed, round_, *args, **kwargs)

    monkeypatch.setattr(ClientPopulation, "train", counting)
    phase.unlearn(federation, data, method, UNLEARNING, CONFIG.rounds)
    assert sorted(set(calls)) == list(range(CONFIG.rounds + 1,
                                            CONFIG.rounds + 1 + rounds_trained))


@pytest.mark.parametrize("method", phase.METHODS)
def test_methods_are_deterministic(data, learned, outcomes, method):
    federation, _ = learned
    again = phase.unlearn(federation, data, method, UNLEARNING, CONFIG.rounds)
    first = outcomes[method].federation
    assert torch.equal(again.federation.server.table, first.server.table)
    assert torch.equal(again.federation.population.embeddings, first.population.embeddings)
    assert again.kept_bytes == outcomes[method].kept_bytes


def test_unlearning_works_from_a_deep_copy_of_the_learned_state(data, learned):
    """Two methods run back to back from the same learned state agree with fresh runs."""
    federation, _ = learned
    clone = copy.deepcopy(federation)
    a = phase.unlearn(clone, data, "fedshare", UNLEARNING, CONFIG.rounds)
    b = phase.unlearn(federation, data, "fedshare", UNLEARNING, CONFIG.rounds)
    assert torch.equal(a.federation.server.table, b.federation.server.table)


def test_learned_state_is_still_unchanged_after_every_rerun(learned):
    federation, before = learned
    _assert_unchanged(federation, before)


# ---------------------------------------------------------------- report rows, end to end
RATES = ("valid_hr@20", "valid_ndcg@20", "test_hr@20", "test_ndcg@20", "forgotten_hr@20",
         "forgotten_recall@20", "mia_auc", "top20_jaccard", "canary_exposure", "canary_auc")


@pytest.fixture(scope="module")
def report(data):
    torch.set_num_threads(1)
    canary_data, canaries = add_canaries(data, 3, seed=0, common=True)
    federation = phase.learn(canary_data, CONFIG, record=True)
    outcomes = {m: phase.unlearn(federation, canary_data, m, UNLEARNING, CONFIG.rounds)
                for m in phase.METHODS}
    rows = {m: unlearning_row(outcomes[m], canary_data, canaries, outcomes["retrain"])
            for m in phase.METHODS}
    return canary_data, canaries, outcomes, rows


@pytest.mark.parametrize("method", phase.METHODS)
def test_unlearning_row(report, method):
    _, _, outcomes, rows = report
    row = rows[method]
    forgetting = [k for k in (*RATES, "spearman") if not k.startswith(("valid_", "test_"))]
    assert set(row) == {"method", "seconds", "kept_bytes", "client_bytes", "server_bytes",
                        "client_messages", "bytes_down", "bytes_up", "devices_online",
                        "spearman", "users_with_data", "users_no_data", *RATES,
                        *(f"{k}_no_data" for k in forgetting)}
    assert row["method"] == method
    for key in RATES:
        assert 0.0 <= row[key] <= 1.0, key
    assert -1.0 <= row["spearman"] <= 1.0
    assert row["users_with_data"] > 0
    assert row["seconds"] == outcomes[method].seconds > 0
    assert row["kept_bytes"] == outcomes[method].kept_bytes
    assert row["client_bytes"] + row["server_bytes"] == row["kept_bytes"]
    test = outcomes[method].federation.evaluate("test")
    assert row["test_hr@20"] == test["hr@20"]
    assert row["test_ndcg@20"] == test["ndcg@20"]


def test_retrain_agrees_with_itself(report):
    _, _, _, rows = report
    assert rows["retrain"]["top20_jaccard"] == 1.0
    assert rows["retrain"]["spearman"] == pytest.approx(1.0, abs=1e-6)


def test_unlearning_row_measures_forgetting_without_canaries(report):
    """Forgotten-interaction metrics cover the unshared interactions, canaries excluded, of
    the users who still hold training data afterwards (the others are reported apart)."""
    data, canaries, outcomes, rows = report
    scorer = outcome_scorer(outcomes["fedshare"])
    train = data.split.train
    remaining = remaining_data(data).split.train
    canary_pairs = pairs(canaries)
    holding = np.isin(train.users, remaining.users)
    keep = np.array([(u, i) not in canary_pairs for u, i in
                     zip(train.users, train.items, strict=True)]) & data.plan.unlearn
    assert 0 < keep.sum() < data.plan.unlearn.sum()
    forgotten = train.subset(keep & holding)
    assert rows["fedshare"]["users_with_data"] == len(np.unique(forgotten.users))
    expected = forgotten_recall(scorer, forgotten, remaining)
    for key, value in expected.items():
        assert rows["fedshare"][key] == pytest.approx(value)
    assert rows["fedshare"]["mia_auc"] == pytest.approx(
        membership_auc(scorer, forgotten, data.split.test))
    # the users who unshared everything, apart: the two groups cover every unsharing user
    gone = train.subset(keep & ~holding)
    assert rows["fedshare"]["users_no_data"] == len(np.unique(gone.users)) > 0
    assert rows["fedshare"]["users_with_data"] + rows["fedshare"]["users_no_data"] == \
        len(np.unique(train.users[data.plan.unlearn]))
    for key, value in forgotten_recall(scorer, gone, remaining).items():
        assert rows["fedshare"][f"{key}_no_data"] == pytest.approx(value)


def test_unlearning_row_without_retrain_or_canaries(data, outcomes):
    row = unlearning_row(outcomes["fedshare"], data, None, None)
    assert "top20_jaccard" not in row and "spearman" not in row
    assert "canary_exposure" not in row and "canary_auc" not in row
    assert 0.0 <= row["forgotten_hr@20"] <= 1.0


@pytest.mark.parametrize("common", [False, True])
def test_canaries_are_erased_with_the_rest(data, common):
    """Canaries ride along with the unshared data: after the phase no server store holds one."""
    torch.set_num_threads(1)
    canary_data, canaries = add_canaries(data, 3, seed=1, common=common)
    federation = phase.learn(canary_data, CONFIG)
    assert pairs(canaries) <= pairs(federation.server.shared)  # learned with them
    outcome = phase.unlearn(federation, canary_data, "fedshare", UNLEARNING, CONFIG.rounds)
    server = outcome.federation.server
    assert not pairs(server.shared) & pairs(canaries)
    adj = server.graph.adj.to_dense()
    for user, item in pairs(canaries):
        assert adj[user, NUM_USERS + item] == 0 and adj[NUM_USERS + item, user] == 0
    assert len(server.snapshots) == 1 and torch.equal(server.snapshots[0], server.table)
    assert not any(torch.equal(server.snapshots[0], s) for s in federation.server.snapshots)
    assert len(outcome.store.forgotten()) == 0
    assert not pairs(outcome.federation.population.train_data) & pairs(canaries)


