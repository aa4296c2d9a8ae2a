"""FRU at its paper's settings (``FruSettings``): the semi-hard pool, the negatives drawn from
it, and the stored bytes against FRU's formula, every expectation computed here by loops."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import synthetic
import torch

from fedshare.errors import FedShareError
from fedshare.federated.config import FederatedConfig
from fedshare.federated.inprocess import run_inprocess
from fedshare.federated.recording import RoundRecorder
from fedshare.models.local import LocalUpdate
from fedshare.runconfig import fru_settings
from fedshare.storage_ledger import SERVER, client
from fedshare.unlearning import phase
from fedshare.unlearning.fru import KIND, FruHistory, FruSettings, id_dtype, row_bytes
from fedshare.unlearning.fru_selection import semi_hard_pool, stored_rows

NUM_USERS, NUM_ITEMS, DIM = 12, 40, 8
CONFIG = FederatedConfig(rounds=3, eval_every=3, fraction=0.5, server_steps=3, snapshots=2,
                         server_batch_size=64, dim=DIM, seed=0)
ID_BYTES = 2  # 40 items: int16 ids


def ceil_frac(x: float, n: int) -> int:
    return math.ceil(Fraction(str(x)) * n)


def brute_pool(table: torch.Tensor, embedding: torch.Tensor, positives: list[int],
               history: list[int], fraction: float) -> set[int]:
    """The user-item mixed semi-hard pool by loops (ties to the smaller id)."""
    points = table.double().tolist()
    outside = [i for i in range(len(points)) if i not in set(history)]
    count = ceil_frac(fraction, len(outside))
    mean = [sum(points[p][k] for p in positives) / len(positives) for k in range(len(points[0]))]
    pool: set[int] = set()
    for centre in (embedding.double().tolist(), mean):
        ranked = sorted(outside, key=lambda i, c=centre: (math.dist(points[i], c), i))
        pool |= set(ranked[:count])
    return pool


# ---------------------------------------------------------------- (a) pool and draw by hand
def test_pool_is_the_brute_force_pool_on_a_hand_made_example():
    table = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0], [4.0, 4.0],
                          [-1.0, 0.0], [0.5, 0.5], [3.0, 3.0], [0.0, -2.0], [6.0, 6.0],
                          [-3.0, -3.0], [0.2, 0.1]])
    user = torch.tensor([0.1, 0.0])
    positives, history = [3, 9], [3, 9, 4]  # item 4 was interacted with (shared, say)
    # non-interacted: 9 items; 0.25 -> ceil(2.25) = 3 per half
    pool = semi_hard_pool(table, user, np.array(positives), np.array(history), 0.25)
    expected = brute_pool(table, user, positives, history, 0.25)
    assert set(pool.tolist()) == expected
    assert expected == {0, 11, 6} | {7, 6, 1}  # near the user | near the positives' mean (5.5)
    # exact ties go to the smaller id: items 1 and 2 are at the same distance from the origin
    tie = semi_hard_pool(table, torch.zeros(2), np.array([3]), np.array([3]), 0.3)
    assert set(tie.tolist()) == brute_pool(table, torch.zeros(2), [3], [3], 0.3)
    # ceil(0.3 * 11) = 4 nearest the origin: 0, 11, 6, then 1 of 1, 2, 5 (all at 1); nearest
    # item 3 = (5, 5): 4 and 9 (tied), 7, 6
    assert set(tie.tolist()) == {0, 11, 6, 1} | {4, 9, 7}


def hand_update(table: torch.Tensor, items: list[int], still: set[int]) -> LocalUpdate:
    """One user (id 5) who touched ``items``; every row moved but those in ``still``."""
    rng = torch.Generator().manual_seed(0)
    values = table[items].clone()
    for k, item in enumerate(items):
        if item not in still:
            values[k] += torch.randn(table.shape[1], generator=rng)
    return LocalUpdate(np.array([5]), torch.tensor([[0.3, -0.2, 0.1]]),
                       torch.zeros(len(items), dtype=torch.long), torch.tensor(items), values)


def test_drawn_negatives_lie_in_the_pool_and_moved_rows():
    gen = torch.Generator().manual_seed(1)
    table = torch.randn(30, 3, generator=gen)
    positives = [0, 1, 2, 3, 4, 5]
    history = [*positives, 29]
    negatives = list(range(6, 29))  # every non-interacted item touched...
    still = {6, 7, 8, 9, 10, 11, 12, 13}  # ...but these did not move
    update = hand_update(table, positives + negatives, still | {2})  # a positive did not move
    pool = brute_pool(table, update.user_embeddings[0], positives, history, 0.3)
    available = pool & (set(negatives) - still)
    assert 0 < len(available) < len(pool)  # the restriction to moved rows bites
    for seed in range(6):
        ((user, items, rows),) = stored_rows(update, table, [np.array(positives)],
                                             [np.array(history)],
                                             FruSettings(alpha=1.0, beta=0.5, pool=0.3), seed, 4)
        assert user == 5 and items.dtype == torch.int16 and rows.dtype == torch.float32
        chosen = set(items.tolist())
        assert chosen & set(positives) == set(positives) - {2}  # moved positives only
        drawn = chosen - set(positives)
        assert drawn <= available and len(drawn) == min(3, len(available))  # ceil(0.5 * 6)
    draws = {frozenset(next(stored_rows(update, table, [np.array(positives)],
                                        [np.array(history)], FruSettings(1.0, 0.5, 0.3), s,
                                        4))[1].tolist()) for s in range(12)}
    assert len(draws) > 1  # the seed changes the draw...
    again = next(stored_rows(update, table, [np.array(positives)], [np.array(history)],
                             FruSettings(1.0, 0.5, 0.3), 3, 4))[1]
    first = next(stored_rows(update, table, [np.array(positives)], [np.array(history)],
                             FruSettings(1.0, 0.5, 0.3), 3, 4))[1]
    assert torch.equal(again, first)  # ...and nothing else does
    # fewer available than beta * |pos|: all of them
    assert len(available) < 6
    ((_, items, _),) = stored_rows(update, table, [np.array(positives)], [np.array(history)],
                                   FruSettings(1.0, 1.0, 0.3), 0, 4)
    assert set(items.tolist()) - set(positives) == available


# ---------------------------------------------------------------- (b) bytes vs FRU's formula
class Capture(RoundRecorder):
    """Per round and trained user: touched rows, start table, rows after, embedding after."""

    name = "capture"

    def begin(self, ledger, table, user, sharers) -> None:
        self.rounds: dict[int, dict] = {}

    def clients(self, round_, update, weights, start) -> None:
        record = self.rounds.setdefault(round_, {"start": start.clone(), "users": {}})
        for b, user in enumerate(update.users.tolist()):
            mine = update.row_user == b
            record["users"][user] = {"items": update.row_item[mine].tolist(),
                                     "values": update.row_value[mine].clone(),
                                     "embedding": update.user_embeddings[b].clone()}


@pytest.fixture(scope="module")
def data():
    torch.set_num_threads(1)
    return synthetic.tiny_prepared(NUM_USERS, NUM_ITEMS, 0, unshare_user_fraction=0.5)


@pytest.fixture(scope="module")
def paper(data):
    capture = Capture()
    result = run_inprocess(data, CONFIG, recorders=(FruHistory(FruSettings()), capture),
                           validate=False)
    return result.federation, capture


def paper_formula(data, capture: Capture, settings: FruSettings) -> dict[int, int]:
    """sum over (user, round) of ceil(alpha * (|pos moved| + min(ceil(beta |pos|),
    available))) * (4d + id bytes), from the fixture's data alone."""
    train = data.split.train
    local = data.plan.local(train)
    out: dict[int, int] = {}
    for record in capture.rounds.values():
        start = record["start"]
        for user, rec in record["users"].items():
            pos = sorted(set(local.items[local.users == user].tolist()))
            history = sorted(set(train.items[train.users == user].tolist()))
            moved = {i for i, v in zip(rec["items"], rec["values"], strict=True)
                     if not torch.equal(v, start[i])}
            pool = brute_pool(start, rec["embedding"], pos, history, settings.pool)
            available = len((moved - set(pos)) & pool)
            candidates = len(moved & set(pos)) + min(ceil_frac(settings.beta, len(pos)),
                                                     available)
            out[user] = out.get(user, 0) + ceil_frac(settings.alpha, candidates) * (
                4 * DIM + ID_BYTES)
    return out


def test_fru_bytes_equal_the_paper_formula(data, paper):
    federation, capture = paper
    expected = paper_formula(data, capture, FruSettings())
    ledger = federation.ledger
    assert sum(expected.values()) > 0
    for user in range(NUM_USERS):
        assert ledger.held(client(user), KIND) == expected.get(user, 0), user
    assert ledger.held(kind=KIND) == sum(expected.values())
    # the paper's candidates are far fewer than the rows local training touched
    touched = sum(len(r["items"]) for rec in capture.rounds.values()
                  for r in rec["users"].values())
    assert ledger.held(kind=KIND) < 0.5 * touched * (4 * DIM + ID_BYTES)


def test_compact_ids_in_every_fru_and_cufru_store(data):
    federation = phase.learn(data, CONFIG, record=True)
    fru, station = federation.histories["fru"], federation.histories["cufru"]
    assert id_dtype(NUM_ITEMS) == torch.int16 and id_dtype(40_000) == torch.int32
    assert id_dtype(32767) == torch.int16 and id_dtype(32768) == torch.int32
    stores = [*fru.clients_.values(), fru.server, station.aggregates, station.updates,
              station.server]
    for store in stores:
        keys = store.keys()  # a RowStore is no mapping
        assert keys and all(store.get(key)[0].dtype == torch.int16 for key in keys)
    assert row_bytes(3, DIM, NUM_ITEMS) == 3 * (4 * DIM + 2)
    assert row_bytes(3, DIM, 40_000) == 3 * (4 * DIM + 4)
    rounds = fru.server.keys()
    assert federation.ledger.held(SERVER, "fru-server-updates") == sum(
        len(fru.server.get(k)[0]) * (4 * DIM + 2) for k in rounds)


# ---------------------------------------------------------------- (c) the learning sampling
def test_learning_sampling_stores_the_old_rows_count(data, paper):
    _, capture = paper
    alpha = 0.3
    federation = phase.learn(data, CONFIG, record=True,
                             fru=FruSettings(alpha=alpha, sampling="learning"))
    stores = federation.histories["fru"].clients_
    for round_, record in capture.rounds.items():  # learning is the same with any recorder
        for user, rec in record["users"].items():
            items, rows = stores[user].get(round_)
            assert len(items) == len(rows) == ceil_frac(alpha, len(rec["items"]))
    assert federation.ledger.held(kind=KIND) == sum(
        ceil_frac(alpha, len(r["items"])) * (4 * DIM + ID_BYTES)
        for rec in capture.rounds.values() for r in rec["users"].values())


def test_selection_does_not_depend_on_how_users_are_chunked(data, paper, monkeypatch):
    from fedshare.federated import population

    monkeypatch.setattr(population, "TRAIN_CHUNK", 2)
    federation = phase.learn(data, CONFIG, record=True)
    assert federation.ledger.held(kind=KIND) == paper[0].ledger.held(kind=KIND)


# ---------------------------------------------------------------- (d) bad settings
@pytest.mark.parametrize("kwargs", [{"alpha": 0.0}, {"alpha": 1.5}, {"beta": -0.5},
                                    {"beta": 0.0}, {"pool": 0.0}, {"pool": 2.0},
                                    {"alpha": "0.5"}, {"beta": True},
                                    {"sampling": "uniform"}])
def test_bad_settings_are_a_fedshare_error(kwargs):
    with pytest.raises(FedShareError, match="FRU"):
        FruSettings(**kwargs)


def test_defaults_and_run_config():
    assert FruSettings().to_dict() == {"alpha": 0.5, "beta": 0.5, "pool": 0.1,
                                       "sampling": "paper"}
    assert fru_settings({}) is None and fru_settings({"fru-alpha": 0.0}) is None
    assert fru_settings({"fru-alpha": 0.3, "fru-beta": 1, "fru-pool": 0.2,
                         "fru-sampling": "learning"}) == FruSettings(0.3, 1, 0.2, "learning")
    with pytest.raises(FedShareError):
        fru_settings({"fru-alpha": 0.0, "fru-sampling": "hard"})  # checked even when off
    with pytest.raises(FedShareError):
        fru_settings({"fru-alpha": 0.5, "fru-pool": 1.5})


@pytest.mark.parametrize("setting", ["fru-beta=2", "fru-pool=0", "fru-sampling=hard"])
def test_bad_run_settings_fail_early(setting):
    from simulations.experiment import resolve

    with pytest.raises(FedShareError):
        resolve(None, [setting])
