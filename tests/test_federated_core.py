"""The Flower-free core of the learning phase: aggregation (Eq. 16), client populations, the
server (Eq. 17-18), settings, node assignment and the in-process simulation.

Everything runs on a tiny synthetic dataset (10 users x 40 items) and is checked against
by-hand formulas written with numpy, or against the same computation done one user at a time.
"""

from __future__ import annotations

import math
import tomllib
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from synthetic import tiny_prepared

from fedshare.data.interactions import Interactions
from fedshare.data.prepared import PreparedData
from fedshare.data.sharing import FULL, NONE, PARTIAL
from fedshare.errors import FedShareError
from fedshare.federated.aggregation import aggregate
from fedshare.federated.config import AGGREGATIONS, VARIANTS, FederatedConfig
from fedshare.federated.inprocess import run_inprocess
from fedshare.federated.population import ClientPopulation, NodeUpdate, initial_user_embeddings
from fedshare.federated.rounds import sample_users
from fedshare.federated.server import Server
from fedshare.models.embeddings import xavier_table
from fedshare.models.local import LocalTrainConfig
from fedshare.runconfig import APP_KEYS, DATA_KEYS, federated_config, node_users
from fedshare.unlearning.remaining import remaining_data

NUM_USERS, NUM_ITEMS, DIM, SEED = 10, 40, 8, 0
PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
LOCAL = LocalTrainConfig(epochs=2, lr=0.5, reg=1e-3, num_negatives=1)


@pytest.fixture(scope="module")
def data() -> PreparedData:
    prepared = tiny_prepared()
    degrees = prepared.split.train.user_degrees()
    assert (degrees >= 1).all()
    assert set(prepared.plan.group.tolist()) == {FULL, PARTIAL, NONE}
    assert len(prepared.split.valid) > 0 and len(prepared.split.test) > 0
    return prepared


def _start_table(seed: int = 1) -> torch.Tensor:
    return xavier_table(NUM_ITEMS, DIM, torch.Generator().manual_seed(seed))


def _pairs(users: np.ndarray, items: np.ndarray) -> list[tuple[int, int]]:
    return sorted(zip(users.tolist(), items.tolist(), strict=True))


def _local_sizes(data: PreparedData) -> np.ndarray:
    """|I_local(u)| for every user, straight from the plan's flags."""
    train = data.split.train
    return np.bincount(train.users[~data.plan.shared], minlength=data.num_users)


def _trainable_users(data: PreparedData) -> np.ndarray:
    return np.flatnonzero(_local_sizes(data) > 0)


# ---------------------------------------------------------------- aggregation (Eq. 16)
def _hand_updates(seed: int = 0) -> tuple[torch.Tensor, list[NodeUpdate], list[np.ndarray]]:
    """Single-user replies with random weights, each touching a random subset of rows."""
    rng = np.random.default_rng(seed)
    start = _start_table(seed)
    updates, touched = [], []
    for k in range(4):
        rows = np.sort(rng.choice(NUM_ITEMS, size=int(rng.integers(3, 12)), replace=False))
        rows = rows[rows != 0]  # row 0 is touched by nobody
        weight = float(rng.integers(1, 9))
        table = start.clone()
        table[torch.from_numpy(rows)] += torch.from_numpy(
            rng.normal(size=(len(rows), DIM)).astype(np.float32))
        row_weight = torch.zeros(NUM_ITEMS)
        row_weight[torch.from_numpy(rows)] = weight
        if k == 3:  # a user that trained nothing (weight 0) must not count anywhere
            weight, row_weight = 0.0, torch.zeros(NUM_ITEMS)
            table = start.clone()
        updates.append(NodeUpdate(table, weight, row_weight, 1))
        touched.append(rows if weight > 0 else np.zeros(0, np.int64))
    return start, updates, touched


def test_eq16_is_the_weighted_mean_of_full_tables():
    start, updates, _ = _hand_updates()
    weights = np.array([u.weight for u in updates])
    tables = np.stack([u.table.numpy() for u in updates]).astype(np.float64)
    expected = np.tensordot(weights, tables, axes=1) / weights.sum()
    got = aggregate(start, updates, "eq16", 1.0)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-6)


def test_touched_averages_each_row_over_the_users_that_touched_it():
    start, updates, touched = _hand_updates(seed=3)
    expected = start.numpy().astype(np.float64).copy()
    for row in range(NUM_ITEMS):
        who = [k for k, rows in enumerate(touched) if row in rows]
        if not who:
            continue
        w = np.array([updates[k].weight for k in who])
        values = np.stack([updates[k].table[row].numpy() for k in who])
        expected[row] = (w[:, None] * values).sum(0) / w.sum()
    got = aggregate(start, updates, "touched", 1.0)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-6)
    untouched = sorted(set(range(NUM_ITEMS)) - set(np.concatenate(touched).tolist()))
    assert 0 in untouched
    assert torch.equal(got[untouched], start[untouched])


def test_eq16_with_real_single_user_tables(data):
    start = _start_table()
    users = _trainable_users(data)[:5]
    updates = [ClientPopulation(data, np.array([u]), DIM, SEED).train(
        np.array([u]), start, LOCAL, SEED, 1) for u in users]
    sizes = _local_sizes(data)[users].astype(np.float64)
    assert [u.weight for u in updates] == sizes.tolist()
    expected = sum(w * u.table.double() for w, u in zip(sizes, updates, strict=True)) / sizes.sum()
    got = aggregate(start, updates, "eq16", 1.0)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-6)
    assert not torch.allclose(got, start)


@pytest.mark.parametrize("mode", AGGREGATIONS)
@pytest.mark.parametrize("server_lr", [0.0, 0.5, 2.0])
def test_server_lr_scales_the_step(mode, server_lr):
    start, updates, _ = _hand_updates(seed=5)
    full = aggregate(start, updates, mode, 1.0)
    got = aggregate(start, updates, mode, server_lr)
    np.testing.assert_allclose(got.numpy(), (start + server_lr * (full - start)).numpy(),
                               atol=1e-6)


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_zero_total_weight_returns_the_start_table(mode):
    start = _start_table()
    idle = NodeUpdate(start + 1.0, 0.0, torch.zeros(NUM_ITEMS), 0)
    for updates in ([], [idle], [idle, idle]):
        got = aggregate(start, updates, mode, 1.0)
        assert torch.equal(got, start)
        assert got is not start


# ------------------------------------------------------------ client populations
def test_cohort_training_equals_one_population_per_user(data):
    """One node serving everyone gives what one node per user gives (Eq. 16 over users)."""
    everyone = np.arange(NUM_USERS)
    cohort = ClientPopulation(data, everyone, DIM, SEED)
    singles = {u: ClientPopulation(data, np.array([u]), DIM, SEED) for u in everyone}
    full_sharer = int(np.flatnonzero(data.plan.group == FULL)[0])
    rounds = [np.union1d(sample_users(_trainable_users(data), 0.6, SEED, r), [full_sharer])
              for r in (1, 2)]
    table_c = table_s = _start_table()
    for round_, users in enumerate(rounds, start=1):
        up_c = cohort.train(users, table_c, LOCAL, SEED, round_)
        up_s = [singles[int(u)].train(np.array([u]), table_s, LOCAL, SEED, round_)
                for u in users]
        trained = users[_local_sizes(data)[users] > 0]
        assert up_c.num_users == len(trained) == sum(u.num_users for u in up_s)
        assert up_c.weight == pytest.approx(sum(u.weight for u in up_s))
        assert up_c.weight == float(_local_sizes(data)[trained].sum())
        torch.testing.assert_close(up_c.row_weight, sum(u.row_weight for u in up_s),
                                   atol=1e-5, rtol=0)
        for mode in AGGREGATIONS:
            torch.testing.assert_close(aggregate(table_c, [up_c], mode),
                                       aggregate(table_s, up_s, mode), atol=1e-5, rtol=0)
        table_c = aggregate(table_c, [up_c], "touched")
        table_s = aggregate(table_s, up_s, "touched")
    for u in everyone:
        torch.testing.assert_close(cohort.embeddings[u], singles[int(u)].embeddings[0],
                                   atol=1e-5, rtol=0)
    trained_ever = np.union1d(*[r[_local_sizes(data)[r] > 0] for r in rounds])
    untouched = np.setdiff1d(everyone, trained_ever)
    initial = initial_user_embeddings(everyone, NUM_USERS, DIM, SEED)
    assert not torch.allclose(cohort.embeddings[trained_ever], initial[trained_ever])
    assert torch.equal(cohort.embeddings[untouched], initial[untouched])


def test_initial_user_embeddings_do_not_depend_on_the_cohort(data):
    everyone = initial_user_embeddings(np.arange(NUM_USERS), NUM_USERS, DIM, SEED)
    for cohort in ([3], [7, 2, 5], [9, 0], list(range(NUM_USERS))[::-1]):
        got = initial_user_embeddings(np.array(cohort), NUM_USERS, DIM, SEED)
        assert torch.equal(got, everyone[cohort])
        population = ClientPopulation(data, np.array(cohort), DIM, SEED)
        assert torch.equal(population.embeddings, everyone[cohort])
    bound = (6.0 / (NUM_USERS + DIM)) ** 0.5
    assert everyone.abs().max() <= bound
    other_seed = initial_user_embeddings(np.arange(NUM_USERS), NUM_USERS, DIM, SEED + 1)
    assert not torch.equal(everyone, other_seed)


@pytest.mark.parametrize("cohort", [list(range(NUM_USERS)), [0, 1, 2, 3, 4], [5, 6, 7, 8, 9],
                                    [2], [7]])
def test_shared_interactions_are_exactly_the_node_users_i_share(data, cohort):
    train, shared = data.split.train, data.plan.shared
    users = np.array(cohort)
    population = ClientPopulation(data, users, DIM, SEED)
    got_u, got_i = population.shared_interactions()
    mine = np.isin(train.users, users)
    assert _pairs(got_u, got_i) == _pairs(train.users[mine & shared], train.items[mine & shared])
    local = set(_pairs(train.users[mine & ~shared], train.items[mine & ~shared]))
    assert local.isdisjoint(_pairs(got_u, got_i))
    np.testing.assert_array_equal(population.local_count(users), _local_sizes(data)[users])


def test_shared_interactions_of_all_cohorts_make_up_d_s(data):
    train, shared = data.split.train, data.plan.shared
    pieces = [ClientPopulation(data, part, DIM, SEED).shared_interactions()
              for part in np.array_split(np.arange(NUM_USERS), 3)]
    got = _pairs(np.concatenate([p[0] for p in pieces]), np.concatenate([p[1] for p in pieces]))
    assert got == _pairs(train.users[shared], train.items[shared])
    assert len(got) == int(shared.sum()) > 0


def test_trainable_excludes_full_sharers(data):
    population = ClientPopulation(data, np.arange(NUM_USERS), DIM, SEED)
    full = np.flatnonzero(data.plan.group == FULL)
    assert len(full) > 0
    np.testing.assert_array_equal(population.trainable(), _trainable_users(data))
    np.testing.assert_array_equal(population.trainable(), np.flatnonzero(data.plan.group != FULL))
    assert (population.local_count(full) == 0).all()
    subset = ClientPopulation(data, np.array([*full, 9]), DIM, SEED)
    assert subset.trainable().tolist() == ([9] if data.plan.group[9] != FULL else [])


def test_without_sharing_everything_is_local(data):
    everyone = np.arange(NUM_USERS)
    population = ClientPopulation(data, everyone, DIM, SEED, shares=False)
    users, items = population.shared_interactions()
    assert len(users) == len(items) == 0
    np.testing.assert_array_equal(population.local_count(everyone),
                                  data.split.train.user_degrees())
    np.testing.assert_array_equal(population.trainable(), everyone)
    update = population.train(everyone, _start_table(), LOCAL, SEED, 1)
    assert update.weight == float(len(data.split.train))
    assert update.num_users == NUM_USERS


def test_weight_is_the_sum_of_local_sizes_of_trained_users(data):
    population = ClientPopulation(data, np.arange(NUM_USERS), DIM, SEED)
    sizes = _local_sizes(data)
    for users in ([0, 1, 2], [4, 6, 8, 9], list(range(NUM_USERS))):
        users = np.array(users)
        update = population.train(users, _start_table(), LOCAL, SEED, 1)
        trained = users[sizes[users] > 0]
        assert update.weight == float(sizes[trained].sum())
        assert update.num_users == len(trained)
        # each trained user adds its weight to the rows it touched: at least its local items
        assert float(update.row_weight.max()) <= update.weight + 1e-4
    start = _start_table()
    for u in _trainable_users(data):
        # one user's row weights cover every row it moved: averaging it alone gives it back
        single = population.train(np.array([u]), start, LOCAL, SEED, 2)
        moved = (single.table - start).abs().amax(1) > 1e-6
        assert moved.any() and (single.row_weight[moved] == single.weight).all()
        torch.testing.assert_close(aggregate(start, [single], "touched"), single.table,
                                   atol=1e-6, rtol=0)
    full_only = np.flatnonzero(data.plan.group == FULL)
    idle = population.train(full_only, start, LOCAL, SEED, 1)
    assert (idle.weight, idle.num_users) == (0.0, 0)
    assert torch.equal(idle.table, start) and float(idle.row_weight.abs().sum()) == 0.0


def test_train_rejects_users_the_node_does_not_serve(data):
    population = ClientPopulation(data, np.array([0, 1, 2]), DIM, SEED)
    served = population.trainable()
    outsider = int(_trainable_users(data)[-1])
    assert outsider not in served
    with pytest.raises(ValueError, match="not served"):
        population.train(np.array([outsider]), _start_table(), LOCAL, SEED, 1)


# ------------------------------------------------------------ client-side evaluation
def _brute_force(data: PreparedData, vectors: np.ndarray, users: np.ndarray, table: np.ndarray,
                 part: str, k: int) -> tuple[dict[str, float], int]:
    split = data.split
    heldout = split.valid if part == "valid" else split.test
    excluded = [split.train] if part == "valid" else [split.train, split.valid]
    items = table / np.linalg.norm(table, axis=1, keepdims=True)
    sums = {f"hr@{k}": 0.0, f"recall@{k}": 0.0, f"ndcg@{k}": 0.0}
    count = 0
    for b, u in enumerate(users):
        relevant = set(heldout.items[heldout.users == u].tolist())
        if not relevant:
            continue
        count += 1
        seen = set().union(*[set(p.items[p.users == u].tolist()) for p in excluded])
        v = vectors[b] / np.linalg.norm(vectors[b])
        scores = items @ v
        ranking = [i for i in np.argsort(-scores, kind="stable") if i not in seen][:k]
        hits = [r for r, i in enumerate(ranking) if i in relevant]
        dcg = sum(1.0 / math.log2(r + 2) for r in hits)
        idcg = sum(1.0 / math.log2(r + 2) for r in range(min(k, len(relevant))))
        sums[f"hr@{k}"] += float(bool(hits))
        sums[f"recall@{k}"] += len(hits) / len(relevant)
        sums[f"ndcg@{k}"] += dcg / idcg
    return sums, count


@pytest.mark.parametrize("part", ["valid", "test"])
def test_evaluate_matches_a_brute_force_ranking(data, part):
    everyone = np.arange(NUM_USERS)
    population = ClientPopulation(data, everyone, DIM, SEED)
    table = _start_table(seed=7)
    population.train(_trainable_users(data), table, LOCAL, SEED, 1)  # move the user embeddings
    for users in (everyone, np.array([1, 3, 4, 8])):
        vectors = population.user_vectors(users, table)
        sums, count = population.evaluate(users, table, part, ks=(5, 20))
        for k in (5, 20):
            expected, n = _brute_force(data, vectors.numpy().astype(np.float64), users,
                                       table.numpy().astype(np.float64), part, k)
            assert count == n == len(users)  # every tiny user has one valid and one test item
            for name, value in expected.items():
                assert sums[name] == pytest.approx(value, abs=1e-5), name


def test_user_vectors_are_the_ego_graph_lightgcn_over_the_whole_history(data):
    population = ClientPopulation(data, np.arange(NUM_USERS), DIM, SEED, local=LOCAL)
    table = _start_table(seed=2)
    train = data.split.train
    population.train(_trainable_users(data), table, LOCAL, SEED, 1)  # move the user embeddings
    vectors = population.user_vectors(np.arange(NUM_USERS), table)
    embeddings = population.ranking_embeddings(np.arange(NUM_USERS), table)
    for u in range(NUM_USERS):
        items = train.items[train.users == u]  # local and shared: the client holds both
        expected = 0.5 * (embeddings[u] + table[items].sum(0) / math.sqrt(len(items)))
        torch.testing.assert_close(vectors[u], expected, atol=1e-6, rtol=0)


def test_users_with_local_data_rank_with_their_trained_embedding(data):
    population = ClientPopulation(data, np.arange(NUM_USERS), DIM, SEED, local=LOCAL)
    table = _start_table(seed=2)
    trained = _trainable_users(data)
    population.train(trained, table, LOCAL, SEED, 1)
    assert not torch.equal(population.embeddings[trained],
                           initial_user_embeddings(trained, NUM_USERS, DIM, SEED))
    assert torch.equal(population.ranking_embeddings(trained, table),
                       population.embeddings[trained])
    full = np.flatnonzero(data.plan.group == FULL)
    before = population.embeddings.clone()
    population.user_vectors(np.arange(NUM_USERS), table)  # fitting full sharers keeps no state
    assert torch.equal(population.embeddings, before)
    assert torch.equal(population.embeddings[full],
                       initial_user_embeddings(full, NUM_USERS, DIM, SEED))


# ------------------------------------------ full sharers: e_u fitted on the device for ranking
FIT_USERS, FIT_ITEMS = 40, 60
FIT_LOCAL = LocalTrainConfig(epochs=5, lr=0.5)  # the run's defaults (FederatedConfig)


@pytest.fixture(scope="module")
def fit_data() -> PreparedData:
    return tiny_prepared(num_users=FIT_USERS, num_items=FIT_ITEMS)


def _held_auc(table: torch.Tensor, embedding: torch.Tensor, held: np.ndarray) -> float:
    """P(cos(e_u, v_i) > cos(e_u, v_j)) over held items i and every unseen item j."""
    scores = F.normalize(table, dim=-1) @ F.normalize(embedding, dim=0)
    unseen = np.setdiff1d(np.arange(len(table)), held)
    return float((scores[held][:, None] > scores[unseen][None, :]).double().mean())


def test_a_full_sharer_ranks_with_an_embedding_fitted_on_its_held_history(fit_data):
    full = np.flatnonzero(fit_data.plan.group == FULL)
    assert len(full) >= 5
    population = ClientPopulation(fit_data, np.arange(FIT_USERS), DIM, SEED, local=FIT_LOCAL)
    assert (population.local_count(full) == 0).all() and (population.held_count(full) > 0).all()
    table = xavier_table(FIT_ITEMS, DIM, torch.Generator().manual_seed(1))
    initial = initial_user_embeddings(full, FIT_USERS, DIM, SEED)
    fitted = population.ranking_embeddings(full, table)
    torch.testing.assert_close(fitted, population.fitted_embeddings(full, table), atol=0, rtol=0)
    vectors = population.user_vectors(full, table)
    train = fit_data.split.train
    gains = []
    for b, u in enumerate(full):
        held = train.items[train.users == u]
        untrained = 0.5 * (initial[b] + table[held].sum(0) / math.sqrt(len(held)))
        assert (vectors[b] - untrained).abs().max() > 1e-3  # not the random projection
        gains.append(_held_auc(table, fitted[b], held) - _held_auc(table, initial[b], held))
    # measured: every full sharer gains (min 0.034), on average 0.08 (0.44 -> 0.52)
    assert min(gains) > 0.01 and np.mean(gains) > 0.05


def test_the_fitted_embedding_does_not_depend_on_the_cohort_or_the_call(fit_data):
    full = np.flatnonzero(fit_data.plan.group == FULL)
    table = xavier_table(FIT_ITEMS, DIM, torch.Generator().manual_seed(3))
    everyone = ClientPopulation(fit_data, np.arange(FIT_USERS), DIM, SEED, local=FIT_LOCAL)
    expected = everyone.user_vectors(full, table)
    torch.testing.assert_close(everyone.user_vectors(full, table), expected, atol=0, rtol=0)
    for parts in (3, 7):
        for cohort in np.array_split(np.random.default_rng(parts).permutation(FIT_USERS), parts):
            node = ClientPopulation(fit_data, np.sort(cohort), DIM, SEED, local=FIT_LOCAL)
            mine = np.isin(full, cohort)
            torch.testing.assert_close(node.user_vectors(full[mine], table), expected[mine],
                                       atol=0, rtol=0)
    for u, vector in zip(full, expected, strict=True):  # alone, and among users with local data
        alone = ClientPopulation(fit_data, np.array([u]), DIM, SEED, local=FIT_LOCAL)
        torch.testing.assert_close(alone.user_vectors(np.array([u]), table)[0], vector,
                                   atol=0, rtol=0)
    scores = everyone.scorer(table)(torch.from_numpy(full))
    node = ClientPopulation(fit_data, full, DIM, SEED, local=FIT_LOCAL)
    torch.testing.assert_close(node.scorer(table)(torch.from_numpy(full)), scores, atol=0,
                               rtol=0)


def test_a_user_who_holds_no_data_ranks_with_its_initial_embedding(fit_data):
    remaining = remaining_data(fit_data)
    emptied = np.flatnonzero(remaining.split.train.user_degrees() == 0)
    assert len(emptied) > 0  # full sharers that unshared everything
    population = ClientPopulation(remaining, np.arange(FIT_USERS), DIM, SEED, local=FIT_LOCAL)
    table = xavier_table(FIT_ITEMS, DIM, torch.Generator().manual_seed(1))
    initial = initial_user_embeddings(emptied, FIT_USERS, DIM, SEED)
    torch.testing.assert_close(population.ranking_embeddings(emptied, table), initial,
                               atol=0, rtol=0)
    torch.testing.assert_close(population.user_vectors(emptied, table), 0.5 * initial,
                               atol=0, rtol=0)


# ------------------------------------------------------------------------ server
def _shared(data: PreparedData) -> Interactions:
    return data.plan.shared_data(data.split.train)


def _config(**overrides) -> FederatedConfig:
    return FederatedConfig(**{"dim": DIM, "server_steps": 2, **overrides})


def test_snapshots_keep_the_last_m_tables(data):
    server = Server(_shared(data), _config(snapshots=3))
    returned = []
    for round_ in range(1, 6):
        returned.append(server.finish_round(_start_table(seed=round_), round_))
        assert len(server.snapshots) == min(round_, 3)
    assert all(torch.equal(a, b) for a, b in zip(server.snapshots, returned[-3:], strict=True))
    assert torch.equal(server.table, returned[-1])
    assert server.snapshot_bytes() == 3 * NUM_ITEMS * DIM * 4
    none_kept = Server(_shared(data), _config(snapshots=0))
    none_kept.finish_round(_start_table(), 1)
    assert len(none_kept.snapshots) == 0 and none_kept.snapshot_bytes() == 0


def test_a_server_restored_from_its_state_continues_exactly(data, tmp_path):
    """Resuming from the state database: V_s, user embeddings and Adam's moments are enough for
    the next round to be what an uninterrupted server computes."""
    from fedshare.federated.state_db import StateDB

    server = Server(_shared(data), _config(snapshots=3))
    for round_ in (1, 2):
        server.finish_round(_start_table(seed=round_), round_)
    store = StateDB(tmp_path / "state.db", data.num_users, data.num_items)
    store.commit_round(2, server.table, list(server.snapshots), server.state())
    store.close()
    reopened = StateDB(tmp_path / "state.db", data.num_users, data.num_items)
    resumed = Server(_shared(data), _config(snapshots=3))
    resumed.load_state(reopened.model(), reopened.state())
    for snapshot in reopened.snapshots():
        resumed.snapshots.append(snapshot)
    expected = server.finish_round(_start_table(seed=3), 3)
    assert torch.equal(resumed.finish_round(_start_table(seed=3), 3), expected)
    assert torch.equal(resumed.user.detach(), server.user.detach())
    fresh = Server(_shared(data), _config(snapshots=3))  # without the moments it differs
    fresh.restore((reopened.model(), reopened.state()["user"]))
    assert not torch.equal(fresh.finish_round(_start_table(seed=3), 3), expected)


@pytest.mark.parametrize("config", [
    _config(variant="no-sharing"),
    _config(variant="fedshare", server_steps=0),
    _config(variant="fedshare-fedavg"),
], ids=["no-sharing", "no-server-steps", "fedshare-fedavg"])
def test_finish_round_without_refinement_returns_the_aggregate(data, config):
    server = Server(_shared(data), config)
    aggregated = _start_table(seed=4)
    table = server.finish_round(aggregated, 1)
    assert torch.equal(table, aggregated)
    assert torch.equal(server.table, aggregated)


def test_no_sharing_server_on_empty_shared_data(data):
    shared = _shared(data)
    empty = shared.subset(np.zeros(len(shared), bool))
    server = Server(empty, _config(variant="no-sharing"))
    assert not server.trains_on_graph
    assert server.server_client_update(1) is None
    aggregated = _start_table(seed=4)
    assert torch.equal(server.finish_round(aggregated, 1), aggregated)


@pytest.mark.parametrize("variant", ["fedshare", "wo-cl", "wo-bpr"])
def test_refinement_changes_the_table(data, variant):
    server = Server(_shared(data), _config(variant=variant))
    aggregated = _start_table(seed=4)
    table = server.finish_round(aggregated, 1)
    assert table.shape == aggregated.shape
    assert torch.isfinite(table).all()
    assert not torch.allclose(table, aggregated)
    assert torch.equal(aggregated, _start_table(seed=4))  # the input is not modified


def test_refinement_does_not_depend_on_the_row_order_of_d_s(data):
    """D_s is a set (Eq. 7): the Flower server assembles it from share replies in arrival order,
    the in-process engine in training-row order; both must refine to the same table."""
    shared = _shared(data)
    perm = np.random.default_rng(1).permutation(len(shared))
    shuffled = Interactions.from_arrays(shared.users[perm], shared.items[perm],
                                        shared.num_users, shared.num_items)
    aggregated = _start_table(seed=4)
    for variant in ("fedshare", "fedshare-fedavg"):
        a, b = Server(shared, _config(variant=variant)), Server(shuffled, _config(variant=variant))
        for round_ in (1, 2):
            ua, ub = a.server_client_update(round_), b.server_client_update(round_)
            if ua is not None:
                torch.testing.assert_close(ua.table, ub.table, atol=1e-5, rtol=0)
            torch.testing.assert_close(a.finish_round(aggregated, round_),
                                       b.finish_round(aggregated, round_), atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "fedshare-fedavg"])
def test_server_client_update_only_for_fedshare_fedavg(data, variant):
    assert Server(_shared(data), _config(variant=variant)).server_client_update(1) is None


def test_fedshare_fedavg_server_joins_with_weight_d_s(data):
    shared = _shared(data)
    server = Server(shared, _config(variant="fedshare-fedavg"))
    before = server.table.clone()
    update = server.server_client_update(1)
    assert update is not None
    assert update.weight == float(len(shared)) == float(data.plan.shared.sum())
    assert update.num_users == 1
    on_graph = torch.from_numpy(shared.item_degrees() > 0)
    assert set(update.row_weight.unique().tolist()) <= {0.0, float(len(shared))}
    assert (update.row_weight[on_graph] == float(len(shared))).all()
    assert not torch.allclose(update.table, before)
    assert torch.equal(server.table, before)
    # Like a client's, the reply's row weights must cover every row its update moved (BPR
    # negatives may lie off G_s), so that row-wise averaging of it alone gives it back.
    moved = (update.table - before).abs().amax(1) > 1e-6
    assert (update.row_weight[moved] > 0).all(), \
        f"rows {np.flatnonzero((moved & (update.row_weight == 0)).numpy())} moved, weight 0"
    torch.testing.assert_close(aggregate(before, [update], "touched"), update.table,
                               atol=1e-6, rtol=0)
    no_steps = Server(shared, _config(variant="fedshare-fedavg", server_steps=0))
    assert no_steps.server_client_update(1) is None


# ---------------------------------------------------------------------- settings
@pytest.mark.parametrize("kwargs", [
    {"variant": "fedprox"}, {"variant": ""}, {"aggregation": "median"},
    {"fraction": 0.0}, {"fraction": -0.1}, {"fraction": 1.5},
    {"tau": 0.0}, {"tau": -1.0}, {"rounds": 0}, {"dim": 0}, {"eval_every": 0},
    {"local_epochs": 0}, {"num_negatives": 0}, {"server_batch_size": 0},
    {"server_steps": -1}, {"snapshots": -1}, {"num_layers": -1}, {"local_batch_size": -2},
])
def test_config_rejects_invalid_values(kwargs):
    with pytest.raises(FedShareError):
        FederatedConfig(**kwargs)


def test_config_accepts_edge_values():
    config = FederatedConfig(fraction=1.0, server_steps=0, snapshots=0, num_layers=0,
                             local_batch_size=0, tau=1e-3)
    assert config.local.batch_size is None
    assert FederatedConfig(local_batch_size=4).local.batch_size == 4
    assert FederatedConfig(variant="wo-cl").contrastive_weight == 0.0
    assert FederatedConfig(variant="fedshare", lambda1=0.3).contrastive_weight == 0.3
    assert not FederatedConfig(variant="wo-bpr").uses_bpr
    assert not FederatedConfig(variant="no-sharing").shares


def test_from_mapping_accepts_dashes_underscores_and_toml_numbers():
    config = FederatedConfig.from_mapping({"local-epochs": 3, "server_lr": 1, "fraction": 1,
                                           "variant": "wo-cl", "eval-every": 2})
    assert (config.local_epochs, config.server_lr, config.fraction) == (3, 1.0, 1.0)
    assert isinstance(config.server_lr, float) and isinstance(config.fraction, float)
    assert (config.variant, config.eval_every) == ("wo-cl", 2)
    assert FederatedConfig.from_mapping({}) == FederatedConfig()
    assert FederatedConfig.from_mapping(FederatedConfig(dim=16).to_run_config()) == \
        FederatedConfig(dim=16)


@pytest.mark.parametrize("mapping", [{"bogus": 1}, {"local-epoch": 2}, {"rounds": 3, "lr": 1}])
def test_from_mapping_rejects_unknown_keys(mapping):
    with pytest.raises(FedShareError, match="unknown setting"):
        FederatedConfig.from_mapping(mapping)


@pytest.mark.parametrize("mapping", [
    {"rounds": "many"}, {"fraction": "half"}, {"tau": None}, {"dim": [8]},
    {"rounds": 2.5}, {"local-epochs": 1.5},
], ids=["str-for-int", "str-for-float", "none", "list", "fractional-rounds",
        "fractional-epochs"])
def test_from_mapping_rejects_wrong_types(mapping):
    with pytest.raises(FedShareError, match="expects"):
        FederatedConfig.from_mapping(mapping)


def test_run_config_keys_match_pyproject():
    table = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    defaults = FederatedConfig().to_run_config()
    federated = {k: v for k, v in table.items() if k not in DATA_KEYS + APP_KEYS}
    assert federated == defaults
    for key, value in defaults.items():
        assert type(federated[key]) is type(value), key
    assert set(table) - set(defaults) == set(DATA_KEYS + APP_KEYS)
    assert len(DATA_KEYS + APP_KEYS) == len(set(DATA_KEYS + APP_KEYS))
    assert set(defaults) == {f.replace("_", "-") for f in FederatedConfig().to_dict()}
    assert federated_config(table) == FederatedConfig()


# ------------------------------------------------------------ node assignment
def test_node_users_user_id_mode():
    assert node_users({"user-id": 3}, NUM_USERS).tolist() == [3]
    assert node_users({"user-id": 0, "partition-id": 1, "num-partitions": 2}, 4).tolist() == [0]
    assert node_users({"user-id": NUM_USERS - 1}, NUM_USERS).dtype == np.int64


@pytest.mark.parametrize("user", [-1, NUM_USERS, NUM_USERS + 5])
def test_node_users_rejects_out_of_range_user_id(user):
    with pytest.raises(FedShareError, match="user-id"):
        node_users({"user-id": user}, NUM_USERS)


@pytest.mark.parametrize("parts", [1, 2, 3, 4, 7, NUM_USERS])
def test_node_users_partitions_cover_every_user_once(parts):
    cohorts = [node_users({"partition-id": p, "num-partitions": parts}, NUM_USERS)
               for p in range(parts)]
    np.testing.assert_array_equal(np.concatenate(cohorts), np.arange(NUM_USERS))
    sizes = [len(c) for c in cohorts]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    for c in cohorts:
        np.testing.assert_array_equal(c, np.arange(c[0], c[0] + len(c)))  # contiguous ranges
    if parts == NUM_USERS:
        assert sizes == [1] * NUM_USERS


@pytest.mark.parametrize("node_config", [{}, {"partition-id": 0}, {"num-partitions": 2},
                                         {"node-id": 3}])
def test_node_users_rejects_missing_keys(node_config):
    with pytest.raises(FedShareError, match="user-id"):
        node_users(node_config, NUM_USERS)


@pytest.mark.parametrize("node_config", [{"partition-id": 2, "num-partitions": 2},
                                         {"partition-id": -1, "num-partitions": 2},
                                         {"partition-id": 0, "num-partitions": 0}])
def test_node_users_rejects_a_partition_outside_the_range(node_config):
    with pytest.raises(FedShareError):
        node_users(node_config, NUM_USERS)


# -------------------------------------------------------------------- simulation
@pytest.mark.parametrize(("fraction", "n"), [
    (0.1, 10), (0.1, 30), (0.25, 7), (0.5, 7), (0.7, 10), (1.0, 9), (0.01, 5), (0.33, 3),
    (0.07, 100), (0.14, 50), (0.1, 943),
])
def test_sample_users_size_sorted_subset_deterministic(fraction, n):
    candidates = np.arange(n) * 3 + 1  # not contiguous, not starting at 0
    expected = max(1, math.ceil(Fraction(str(fraction)) * n))
    samples = []
    for round_ in (1, 2, 3):
        got = sample_users(candidates, fraction, seed=4, round_=round_)
        assert len(got) == expected
        assert np.all(np.diff(got) > 0)
        assert np.isin(got, candidates).all()
        np.testing.assert_array_equal(got, sample_users(candidates, fraction, 4, round_))
        samples.append(tuple(got.tolist()))
    if 1 < expected < n:
        assert len(set(samples)) > 1 or sample_users(candidates, fraction, 5, 1).tolist() != \
            list(samples[0])


def test_sample_users_depends_on_seed_and_round():
    candidates = np.arange(200)
    draws = {(s, r): tuple(sample_users(candidates, 0.1, s, r).tolist())
             for s in (0, 1) for r in (1, 2, 3)}
    assert len(set(draws.values())) == len(draws)


def test_simulate_is_deterministic(data):
    config = FederatedConfig(rounds=3, eval_every=1, fraction=0.5, dim=DIM, server_steps=2,
                             local_epochs=2)
    first, second = run_inprocess(data, config), run_inprocess(data, config)
    assert torch.equal(first.table, second.table)
    assert first.history[-1]["valid_ndcg@20"] == second.history[-1]["valid_ndcg@20"]
    assert first.test == second.test and first.valid == second.valid
    assert [row["round"] for row in first.history] == [1, 2, 3]
    for row in first.history:
        for key, value in row.items():
            if key.startswith("valid_"):
                assert 0.0 <= value <= 1.0
    for metrics in (first.valid, first.test):
        assert set(metrics) == {"hr@20", "recall@20", "ndcg@20"}
        assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert first.valid == pytest.approx({k.removeprefix("valid_"): v
                                         for k, v in first.history[-1].items()
                                         if k.startswith("valid_")})
    assert first.table.shape == (NUM_ITEMS, DIM)
    assert first.config == config.to_dict()
    other = run_inprocess(data, FederatedConfig(rounds=3, eval_every=1, fraction=0.5, dim=DIM,
                                           server_steps=2, local_epochs=2, seed=1))
    assert not torch.equal(first.table, other.table)


def test_simulate_evaluates_every_eval_every_rounds_and_at_the_end(data):
    seen = []
    result = run_inprocess(data, FederatedConfig(rounds=5, eval_every=2, dim=DIM, server_steps=1,
                                            local_epochs=1), seen.append)
    assert [row["round"] for row in result.history] == [2, 4, 5]
    assert seen == result.history


def test_a_run_without_validation_trains_the_same_table(data):
    """Retrain's timed region: the rounds only, the same model as a validated run."""
    config = FederatedConfig(rounds=3, eval_every=1, fraction=0.5, dim=DIM, server_steps=1,
                             local_epochs=1)
    seen = []
    quiet = run_inprocess(data, config, seen.append, validate=False)
    assert torch.equal(quiet.table, run_inprocess(data, config).table)
    assert quiet.history == seen == [] and quiet.valid == quiet.test == {}
    assert [row["round"] for row in quiet.rounds] == [1, 2, 3]


@pytest.mark.parametrize("variant", VARIANTS)
def test_simulate_runs_every_variant(data, variant):
    config = FederatedConfig(variant=variant, rounds=2, eval_every=1, fraction=0.5, dim=DIM,
                             server_steps=2, local_epochs=1)
    result = run_inprocess(data, config)
    assert torch.isfinite(result.table).all()
    assert not torch.allclose(result.table, Server(_shared(data), config).table)
    assert all(0.0 <= v <= 1.0 for v in result.test.values())


def test_simulate_no_sharing_equals_plain_fedavg_by_hand(data):
    """No sharing, no server training: the run is sample -> train -> aggregate, nothing else."""
    config = FederatedConfig(variant="no-sharing", rounds=2, eval_every=2, fraction=0.5,
                             dim=DIM, local_epochs=1, aggregation="eq16")
    result = run_inprocess(data, config)
    shared = _shared(data)
    table = Server(shared.subset(np.zeros(len(shared), bool)), config).table
    population = ClientPopulation(data, np.arange(NUM_USERS), DIM, config.seed, shares=False)
    for round_ in (1, 2):
        users = sample_users(np.arange(NUM_USERS), config.fraction, config.seed, round_)
        update = population.train(users, table, config.local, config.seed, round_)
        table = aggregate(table, [update], "eq16", 1.0)
    torch.testing.assert_close(result.table, table, atol=1e-6, rtol=0)
    assert F.cosine_similarity(result.table, table).min() > 0.999


def test_a_cohort_averaged_in_chunks_equals_one_call(data, monkeypatch):
    """ClientPopulation.train averages TRAIN_CHUNK users at a time: the node's reply is the
    same however the users are grouped."""
    from fedshare.federated import population as module

    table = torch.randn(data.num_items, 8, generator=torch.Generator().manual_seed(2))
    replies = []
    for chunk in (512, 3):
        monkeypatch.setattr(module, "TRAIN_CHUNK", chunk)
        node = ClientPopulation(data, np.arange(data.num_users), 8, 0)
        replies.append((node.train(node.trainable(), table, LocalTrainConfig(epochs=2), 0, 1),
                        node.embeddings))
    (one, emb_one), (many, emb_many) = replies
    assert one.weight == many.weight and one.num_users == many.num_users
    torch.testing.assert_close(many.table, one.table, atol=1e-6, rtol=0)
    torch.testing.assert_close(many.row_weight, one.row_weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(emb_many, emb_one, atol=1e-6, rtol=0)
