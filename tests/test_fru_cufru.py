"""FRU and CUFRU end to end on a tiny learned federation (``shared/specs/baselines.md``).

What each check compares against is computed here, independently of the stores:

- bytes: the run's ledger against the analytic formulas, with per-round, per-user touched rows
  and the rows the server's refinement changed counted by a recorder of this file;
- exact equivalences: replays that must rebuild a learning run (no leaving user and no
  calibration for CUFRU; every row stored, one round or fully calibrated rounds for FRU) and the
  corrected CUFRU step against a brute-force Eq. 16 aggregate of the remaining participants;
- the replay schedule (which rounds train clients, for how many epochs, numbered how);
- failure paths, and isolation of the learned federation from every replay.
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from fractions import Fraction

import numpy as np
import pytest
import synthetic
import torch

from fedshare.data.interactions import Interactions
from fedshare.data.prepared import PreparedData
from fedshare.errors import FedShareError
from fedshare.federated.aggregation import aggregate
from fedshare.federated.config import FederatedConfig
from fedshare.federated.inprocess import InProcessFederation, run_inprocess
from fedshare.federated.population import (
    ClientPopulation,
    NodeUpdate,
    initial_user_embeddings,
)
from fedshare.federated.recording import RoundRecorder
from fedshare.federated.server import Server
from fedshare.storage_ledger import SERVER, client
from fedshare.unlearning import cufru, fru, phase
from fedshare.unlearning.config import UnlearningConfig
from fedshare.unlearning.cufru import TransferStation, cufru_unlearn
from fedshare.unlearning.fru import FruHistory, FruSettings, fru_unlearn
from fedshare.unlearning.replay import ReplayConfig

NUM_USERS, NUM_ITEMS, DIM = 12, 40, 8
CONFIG = FederatedConfig(rounds=3, eval_every=3, fraction=0.5, server_steps=3, snapshots=2,
                         server_batch_size=64, dim=DIM, seed=0)
NO_REFINE = replace(CONFIG, server_steps=0)  # Server.refines is False: no Eq. 18
UNLEARNING = UnlearningConfig(rounds=2, steps=2)
ALPHA = 0.3  # FRU's stored fraction in the main run: ceil() matters


def learning(alpha: float) -> FruSettings:
    """FRU storing the top-alpha of every touched row (the learning phase's own sampling):
    what the checks of this file compare against (the paper's sampling: test_fru_settings.py)."""
    return FruSettings(alpha=alpha, sampling="learning")

ROUNDS = range(1, CONFIG.rounds + 1)
OFFSET = 7  # replayed rounds are numbered OFFSET + t

# Bytes per stored row, by hand: float32 values, int16 item id (40 items), float32 weight;
# participants: int64 user id and float32 weight.
ROW = 4 * DIM + 2
AGG_ROW = 4 * DIM + 4 + 2
PARTICIPANT = 8 + 4
CHECKPOINT = (NUM_ITEMS + NUM_USERS) * DIM * 4


def ceil_frac(alpha: float, n: int) -> int:
    """ceil(alpha * n) in exact arithmetic."""
    return math.ceil(Fraction(str(alpha)) * n)


def pairs(data: Interactions) -> set[tuple[int, int]]:
    return set(zip(data.users.tolist(), data.items.tolist(), strict=True))


class Capture(RoundRecorder):
    """Everything a round of learning did, per user: start table, touched rows, uploaded table,
    weight and private embedding after training; the aggregate and the refined table."""

    name = "capture"

    def begin(self, ledger, table, user, sharers) -> None:
        self.initial = table.clone()
        self.rounds: dict[int, dict] = {}

    def clients(self, round_, update, weights, start) -> None:
        record = {"start": start.clone(), "users": update.users.tolist(),
                  "weights": weights.tolist(), "items": {}, "tables": {}, "embeddings": {}}
        for b, user in enumerate(update.users.tolist()):
            mine = update.row_user == b
            record["items"][user] = update.row_item[mine].clone()
            record["tables"][user] = update.item_table(b, start)
            record["embeddings"][user] = update.user_embeddings[b].clone()
        assert round_ not in self.rounds  # one cohort per round in process
        self.rounds[round_] = record

    def refined(self, round_, aggregated, refined) -> None:
        self.rounds[round_]["aggregated"] = aggregated.clone()
        self.rounds[round_]["refined"] = refined.clone()

    def touched(self, round_: int) -> dict[int, int]:
        return {u: len(items) for u, items in self.rounds[round_]["items"].items()}

    def touched_by_anyone(self, round_: int) -> int:
        return len(set(torch.cat(list(self.rounds[round_]["items"].values())).tolist()))

    def changed(self, round_: int) -> int:
        rec = self.rounds[round_]
        return sum(1 for i in range(NUM_ITEMS)
                   if not torch.equal(rec["refined"][i], rec["aggregated"][i]))


def record(data: PreparedData, config: FederatedConfig, alpha: float = ALPHA
           ) -> tuple[InProcessFederation, Capture]:
    capture = Capture()
    result = run_inprocess(data, config, recorders=(FruHistory(learning(alpha)), TransferStation(),
                                                      capture))
    assert result.federation is not None
    assert len(capture.rounds) == config.rounds
    return result.federation, capture


def user_node(rec: dict, user: int, weight: float) -> NodeUpdate:
    """One participant's upload as a node reply of one user (what aggregate() averages)."""
    row_weight = torch.zeros(NUM_ITEMS)
    row_weight[rec["items"][user]] = weight
    return NodeUpdate(rec["tables"][user], weight, row_weight, 1)


def brute_step(rec: dict, skip: set[int], mode: str, server_lr: float) -> torch.Tensor:
    """Eq. 16 (the run's mode, times server_lr) over the round's participants not in ``skip``."""
    nodes = [user_node(rec, u, w) for u, w in zip(rec["users"], rec["weights"], strict=True)
             if u not in skip]
    return aggregate(rec["start"], nodes, mode, server_lr) - rec["start"]


def brute_fru_step(rec: dict, alpha: float, mode: str, server_lr: float) -> torch.Tensor:
    """FRU's stored aggregate, by loops: every participant keeps its ceil(alpha * n) largest
    update rows (ties to the smaller item id); rows are averaged over who stored them
    (``touched``) or over the round's whole weight (``eq16``)."""
    start = rec["start"]
    numerator, row_weight = torch.zeros(NUM_ITEMS, DIM), [0.0] * NUM_ITEMS
    for user, weight in zip(rec["users"], rec["weights"], strict=True):
        items = rec["items"][user].tolist()
        deltas = {i: rec["tables"][user][i] - start[i] for i in items}
        ranked = sorted(items, key=lambda i: (-float(deltas[i].norm()), i))
        for i in ranked[:ceil_frac(alpha, len(items))]:
            numerator[i] += weight * deltas[i]
            row_weight[i] += weight
    step = torch.zeros(NUM_ITEMS, DIM)
    for i in range(NUM_ITEMS):
        if mode == "touched" and row_weight[i] > 0:
            step[i] = numerator[i] / row_weight[i]
        elif mode == "eq16":
            step[i] = numerator[i] / sum(rec["weights"])
    return server_lr * step


def history_records(federation: InProcessFederation) -> dict:
    """Copies of every record of both histories, by store."""
    h, s = federation.histories["fru"], federation.histories["cufru"]
    stores = {"fru-server": h.server, "fru-rounds": h.rounds, "fru-checkpoint": h.checkpoint,
              "cufru-aggregates": s.aggregates, "cufru-updates": s.updates,
              "cufru-server": s.server, "cufru-rounds": s.rounds,
              "cufru-checkpoint": s.checkpoint,
              **{f"fru-client-{u}": store for u, store in h.clients_.items()}}
    copies = {}
    for name, store in stores.items():
        keys = store.keys()  # a RowStore is no mapping
        copies[name] = {key: tuple(t.clone() for t in store.get(key)) for key in keys}
    return copies


def state(federation: InProcessFederation) -> dict:
    server = federation.server
    return {"table": server.table.clone(), "item": server.item.detach().clone(),
            "user": server.user.detach().clone(),
            "snapshots": [s.clone() for s in server.snapshots],
            "embeddings": federation.population.embeddings.clone(),
            "shared": pairs(server.shared), "ledger": federation.ledger.frame(),
            "histories": dict(federation.histories), "records": history_records(federation)}


def close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> bool:
    return torch.allclose(a, b, rtol=0.0, atol=atol)


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def data() -> PreparedData:
    torch.set_num_threads(1)
    prepared = synthetic.tiny_prepared(NUM_USERS, NUM_ITEMS, 0, unshare_user_fraction=0.5)
    assert prepared.plan.unlearn.sum() >= 4
    return prepared


@pytest.fixture(scope="module")
def sharers(data) -> set[int]:
    train = data.split.train
    return set(np.unique(train.users[data.plan.shared]).tolist())


@pytest.fixture(scope="module")
def leaving(data) -> set[int]:
    train = data.split.train
    return set(np.unique(train.users[data.plan.unlearn]).tolist())


@pytest.fixture(scope="module")
def forgotten_pairs(data) -> set[tuple[int, int]]:
    train = data.split.train
    return pairs(train.subset(data.plan.unlearn))


@pytest.fixture(scope="module")
def recorded(data, leaving):
    """The main learned federation (refinement on), its capture and its state right after."""
    torch.set_num_threads(1)
    federation, capture = record(data, CONFIG)
    assert federation.server.refines
    assert all(capture.changed(t) > 0 for t in ROUNDS)  # the server stores are not empty
    trained = set().union(*(capture.rounds[t]["users"] for t in ROUNDS))
    assert leaving & trained  # some leaving user trained: CUFRU subtracts something
    return federation, capture, state(federation)


@pytest.fixture(scope="module")
def outcomes(data, recorded):
    federation, _, _ = recorded
    return {m: phase.unlearn(federation, data, m, UNLEARNING, CONFIG.rounds,
                             replay=ReplayConfig(interval=2))
            for m in ("fru", "cufru", "fedshare")}


def fru_client_formula(capture: Capture, alpha: float = ALPHA) -> dict[int, int]:
    bytes_: dict[int, int] = {}
    for t in ROUNDS:
        for user, n in capture.touched(t).items():
            bytes_[user] = bytes_.get(user, 0) + ceil_frac(alpha, n) * ROW
    return bytes_


def fru_server_formula(capture: Capture, alpha: float = ALPHA) -> dict[str, int]:
    return {"fru-server-updates": sum(ceil_frac(alpha, capture.changed(t)) * ROW
                                      for t in ROUNDS),
            "fru-rounds": sum(len(capture.rounds[t]["users"]) * PARTICIPANT for t in ROUNDS),
            "fru-checkpoint": CHECKPOINT}


def cufru_formula(capture: Capture, sharers: set[int]) -> dict[str, int]:
    return {"cufru-aggregates": sum(capture.touched_by_anyone(t) * AGG_ROW + 4 for t in ROUNDS),
            "cufru-client-updates": sum(n * ROW for t in ROUNDS
                                        for u, n in capture.touched(t).items() if u in sharers),
            "cufru-server-updates": sum(capture.changed(t) * ROW for t in ROUNDS),
            "cufru-rounds": sum(len(capture.rounds[t]["users"]) * PARTICIPANT for t in ROUNDS),
            "cufru-checkpoint": CHECKPOINT}


# ---------------------------------------------------------------- 1. ledger vs formulas
def test_fru_client_stores_match_the_formula(recorded):
    federation, capture, _ = recorded
    ledger = federation.ledger
    expected = fru_client_formula(capture)
    owners = {o for o in ledger.frame()["owner"] if o.startswith("client:")}
    assert owners == {client(u) for u in expected}
    for user in range(NUM_USERS):
        assert ledger.held(client(user), fru.KIND) == expected.get(user, 0), user
        assert ledger.held(client(user)) == expected.get(user, 0)  # nothing else on clients
    assert ledger.held(kind=fru.KIND) == ledger.client_held() == sum(expected.values())
    assert ledger.held(SERVER, fru.KIND) == 0
    # ceil, not round: at least one participant stored more than alpha of its rows
    assert any(ceil_frac(ALPHA, n) != round(ALPHA * n)
               for t in ROUNDS for n in capture.touched(t).values())


def test_fru_server_stores_match_the_formula(recorded):
    federation, capture, _ = recorded
    ledger = federation.ledger
    for kind, nbytes in fru_server_formula(capture).items():
        assert ledger.held(SERVER, kind) == nbytes, kind
        assert ledger.held(kind=kind) == nbytes, kind  # held by the server only
        assert ledger.peak(kind=kind) == nbytes  # nothing stored was ever dropped


def test_cufru_stores_match_the_formula(recorded, sharers):
    federation, capture, _ = recorded
    ledger = federation.ledger
    expected = cufru_formula(capture, sharers)
    assert expected["cufru-client-updates"] > 0  # some sharer trained
    for kind, nbytes in expected.items():
        assert ledger.held(SERVER, kind) == nbytes, kind
        assert ledger.held(kind=kind) == nbytes, kind
    station = federation.histories["cufru"]
    assert set(station.updates.keys()) == {(t, u) for t in ROUNDS
                                           for u in capture.rounds[t]["users"] if u in sharers}


def test_snapshots_entry_is_m_tables(recorded, outcomes):
    federation, _, _ = recorded
    assert federation.ledger.held(SERVER, "snapshots") == CONFIG.snapshots * NUM_ITEMS * DIM * 4
    assert outcomes["fedshare"].kept_bytes == CONFIG.snapshots * NUM_ITEMS * DIM * 4
    assert outcomes["fedshare"].client_bytes == 0


def test_outcomes_report_the_formula_bytes(recorded, outcomes, sharers):
    _, capture, _ = recorded
    on_clients = sum(fru_client_formula(capture).values())
    fru_server = sum(fru_server_formula(capture).values())
    assert outcomes["fru"].kept_bytes == on_clients + fru_server
    assert outcomes["fru"].client_bytes == on_clients
    assert outcomes["fru"].server_bytes == fru_server
    cufru_total = sum(cufru_formula(capture, sharers).values())
    assert outcomes["cufru"].kept_bytes == cufru_total
    assert outcomes["cufru"].client_bytes == 0
    assert outcomes["cufru"].server_bytes == cufru_total


def test_recording_neither_changes_learning_nor_depends_on_the_extra_recorder(data, recorded):
    federation, _, _ = recorded
    again = phase.learn(data, CONFIG, record=True, fru=learning(ALPHA))
    assert again.ledger.frame().equals(federation.ledger.frame())
    assert torch.equal(again.server.table, federation.server.table)
    plain = phase.learn(data, CONFIG)
    assert torch.equal(plain.server.table, federation.server.table)
    assert torch.equal(plain.population.embeddings, federation.population.embeddings)
    assert plain.ledger.held(kind="fru-updates") == 0 and plain.histories == {}


# ---------------------------------------------------------------- 2. exact equivalences
MODES = [("touched", 1.0), ("eq16", 1.0), ("touched", 0.5)]


@pytest.mark.parametrize(("aggregation", "server_lr"), MODES)
def test_cufru_without_leaving_users_or_calibration_rebuilds_learning(data, monkeypatch,
                                                                     aggregation, server_lr):
    config = replace(NO_REFINE, aggregation=aggregation, server_lr=server_lr)
    federation, capture = record(data, config)
    assert not federation.server.refines
    assert not close(capture.initial, federation.server.table, 1e-3)  # learning moved it
    tables = []
    original = cufru.server_step

    def spy(server, table, stored, round_, steps):
        tables.append((round_, table.clone()))
        return original(server, table, stored, round_, steps)

    def no_training(*args, **kwargs):
        raise AssertionError("no calibration round: no client may train")

    monkeypatch.setattr(cufru, "server_step", spy)
    monkeypatch.setattr(ClientPopulation, "train", no_training)
    replay = copy.deepcopy(federation)
    cufru_unlearn(replay, federation.histories["cufru"], set(),
                  ReplayConfig(interval=config.rounds + 1), OFFSET)
    assert [r for r, _ in tables] == [OFFSET + t for t in ROUNDS]
    for (_, table), t in zip(tables, ROUNDS, strict=True):
        assert close(table, capture.rounds[t]["refined"]), t
    assert close(replay.server.table, federation.server.table)
    assert torch.equal(replay.server.item.detach(), replay.server.table)


@pytest.mark.parametrize(("aggregation", "server_lr"), MODES)
def test_cufru_corrected_step_is_eq16_over_the_remaining_participants(data, leaving,
                                                                     aggregation, server_lr):
    config = replace(CONFIG, aggregation=aggregation, server_lr=server_lr)
    federation, capture = record(data, config)
    station = federation.histories["cufru"]
    rounds_with_leavers = 0
    for t in ROUNDS:
        rec = capture.rounds[t]
        # the capture is the real round: every participant gives the learned aggregate
        assert close(rec["start"] + brute_step(rec, set(), aggregation, server_lr),
                     rec["aggregated"])
        full = station.corrected_client_step(t, set(), NUM_ITEMS, aggregation, server_lr)
        assert close(full, rec["aggregated"] - rec["start"])
        got = station.corrected_client_step(t, leaving, NUM_ITEMS, aggregation, server_lr)
        assert close(got, brute_step(rec, leaving, aggregation, server_lr)), t
        if leaving & set(rec["users"]):
            rounds_with_leavers += 1
            assert not close(got, full, 1e-4)
        else:
            assert close(got, full)
    assert rounds_with_leavers >= 1


def _spy_on_replay(module, monkeypatch) -> tuple[list, list]:
    """Record the table before each server step and each fresh client step of a replay."""
    tables, fresh = [], []
    server_original, fresh_original = module.server_step, module.fresh_client_step

    def spy(server, table, stored, round_, steps):
        tables.append(table.clone())
        return server_original(server, table, stored, round_, steps)

    def fresh_spy(*args):
        fresh.append(fresh_original(*args))
        return fresh[-1]

    monkeypatch.setattr(module, "server_step", spy)
    monkeypatch.setattr(module, "fresh_client_step", fresh_spy)
    return tables, fresh


@pytest.mark.parametrize("interval", [2, CONFIG.rounds + 1])
def test_cufru_replay_applies_corrected_steps_and_calibrates_every_interval(
        data, leaving, monkeypatch, interval):
    """Without refinement the replay is the sum of the corrected steps; a calibration round
    keeps the corrected step's length (and takes the fresh clients' direction)."""
    federation, capture = record(data, NO_REFINE)
    tables, fresh = _spy_on_replay(cufru, monkeypatch)
    outcome = phase.unlearn(federation, data, "cufru", UNLEARNING, OFFSET,
                            replay=ReplayConfig(interval=interval))
    previous = capture.initial
    for t, table in zip(ROUNDS, tables, strict=True):
        expected = brute_step(capture.rounds[t], leaving, "touched", 1.0)
        step = table - previous
        if t % interval == 0:
            new = fresh.pop(0)
            assert math.isclose(float(step.norm()), float(expected.norm()), rel_tol=1e-5)
            assert close(step / step.norm(), new / new.norm())
            assert not close(step, expected, 1e-4)
        else:
            assert close(step, expected), t
        previous = table
    assert fresh == []
    assert torch.equal(outcome.federation.server.table, tables[-1])
    if interval > CONFIG.rounds:
        total = sum(brute_step(capture.rounds[t], leaving, "touched", 1.0) for t in ROUNDS)
        assert close(outcome.federation.server.table, capture.initial + total)


def test_fru_with_every_row_reproduces_a_one_round_run(data):
    config = replace(NO_REFINE, rounds=1, eval_every=1)
    federation = phase.learn(data, config, record=True, fru=learning(1.0))
    initial = federation.histories["fru"].checkpoint.get(0)[0]
    assert not close(initial, federation.server.table, 1e-3)
    replay = copy.deepcopy(federation)
    fru_unlearn(replay, federation.histories["fru"], ReplayConfig(), 1)
    assert close(replay.server.table, federation.server.table)
    # the same through the phase: round 1 is the stored aggregate, and nothing refines
    outcome = phase.unlearn(federation, data, "fru", UNLEARNING, 1, replay=ReplayConfig())
    assert close(outcome.federation.server.table, federation.server.table)


def test_fru_with_full_calibration_rebuilds_a_two_round_run(data):
    """alpha = 1, lambda = 1, rounds numbered as in learning and clients back at their state
    after round 1: round 2's fresh update is learning's, the stored one has its length."""
    config = replace(NO_REFINE, rounds=2, eval_every=2)
    federation, capture = record(data, config, alpha=1.0)
    replay = copy.deepcopy(federation)
    embeddings = initial_user_embeddings(np.arange(NUM_USERS), NUM_USERS, DIM, config.seed)
    for user, embedding in capture.rounds[1]["embeddings"].items():
        embeddings[user] = embedding
    replay.population.embeddings = embeddings
    fru_unlearn(replay, federation.histories["fru"], ReplayConfig(epoch_fraction=1.0), 0)
    assert close(replay.server.table, federation.server.table)
    assert close(replay.population.embeddings, federation.population.embeddings)


@pytest.mark.parametrize("alpha", [ALPHA, 1.0])
def test_fru_replay_applies_stored_steps_and_calibrates_later_rounds(data, monkeypatch, alpha):
    federation, capture = record(data, NO_REFINE, alpha=alpha)
    tables, fresh = _spy_on_replay(fru, monkeypatch)
    phase.unlearn(federation, data, "fru", UNLEARNING, OFFSET, replay=ReplayConfig())
    assert len(fresh) == CONFIG.rounds - 1
    previous = capture.initial
    for t, table in zip(ROUNDS, tables, strict=True):
        stored = brute_fru_step(capture.rounds[t], alpha, "touched", 1.0)
        step = table - previous
        if t == 1:
            assert close(step, stored)
        else:
            new = fresh[t - 2]
            assert math.isclose(float(step.norm()), float(stored.norm()), rel_tol=1e-5)
            assert close(step / step.norm(), new / new.norm())
        previous = table


# ---------------------------------------------------------------- 3. replay schedule
def spy_training(monkeypatch) -> tuple[list, list]:
    trained, refined = [], []
    train, refine = ClientPopulation.train, Server.refine

    def train_spy(self, users, table, config, seed, round_, *args, **kwargs):
        trained.append((round_, config.epochs, tuple(np.asarray(users).tolist())))
        return train(self, users, table, config, seed, round_, *args, **kwargs)

    def refine_spy(self, aggregated, round_, steps=None):
        refined.append((round_, steps))
        return refine(self, aggregated, round_, steps)

    monkeypatch.setattr(ClientPopulation, "train", train_spy)
    monkeypatch.setattr(Server, "refine", refine_spy)
    return trained, refined


# CONFIG: 5 local epochs, 3 server steps; ceil(lambda * 5) and ceil(lambda * 3) by hand.
SCHEDULES = [(0.1, 1, 1), (0.5, 3, 2), (1.0, 5, 3)]


@pytest.mark.parametrize(("epoch_fraction", "epochs", "steps"), SCHEDULES)
def test_fru_trains_clients_in_every_round_but_the_first(data, recorded, monkeypatch,
                                                         epoch_fraction, epochs, steps):
    federation, capture, _ = recorded
    assert (CONFIG.local_epochs, CONFIG.server_steps) == (5, 3)
    trained, refined = spy_training(monkeypatch)
    phase.unlearn(federation, data, "fru", UNLEARNING, OFFSET,
                  replay=ReplayConfig(epoch_fraction=epoch_fraction))
    assert trained == [(OFFSET + t, epochs, tuple(capture.rounds[t]["users"]))
                       for t in ROUNDS if t > 1]
    assert refined == [(OFFSET + t, steps) for t in ROUNDS]


@pytest.mark.parametrize("interval", [1, 2, 3, 4])
@pytest.mark.parametrize(("epoch_fraction", "epochs", "steps"), SCHEDULES[:2])
def test_cufru_trains_clients_only_in_calibration_rounds(data, recorded, monkeypatch, interval,
                                                         epoch_fraction, epochs, steps):
    federation, capture, _ = recorded
    trained, refined = spy_training(monkeypatch)
    phase.unlearn(federation, data, "cufru", UNLEARNING, OFFSET,
                  replay=ReplayConfig(epoch_fraction=epoch_fraction, interval=interval))
    assert trained == [(OFFSET + t, epochs, tuple(capture.rounds[t]["users"]))
                       for t in ROUNDS if t % interval == 0]
    assert refined == [(OFFSET + t, steps) for t in ROUNDS]


# ---------------------------------------------------------------- 4. failure paths
@pytest.mark.parametrize("method", ["fru", "cufru"])
def test_replay_needs_recorded_histories(data, method):
    plain = phase.learn(data, CONFIG)
    with pytest.raises(FedShareError, match="record=True"):
        phase.unlearn(plain, data, method, UNLEARNING, CONFIG.rounds)


@pytest.mark.parametrize("method", ["fru", "cufru"])
def test_replay_rejects_fedshare_fedavg(data, method):
    fedavg = phase.learn(data, replace(CONFIG, variant="fedshare-fedavg"), record=True)
    assert method in fedavg.histories
    with pytest.raises(FedShareError, match="fedshare-fedavg"):
        phase.unlearn(fedavg, data, method, UNLEARNING, CONFIG.rounds)


def test_unknown_method_is_rejected(data, recorded):
    federation, _, _ = recorded
    with pytest.raises(FedShareError, match="unknown unlearning method"):
        phase.unlearn(federation, data, "federaser", UNLEARNING, CONFIG.rounds)


@pytest.mark.parametrize("kwargs", [{"epoch_fraction": 0.0}, {"epoch_fraction": 1.01},
                                    {"interval": 0}, {"interval": -3}])
def test_replay_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        ReplayConfig(**kwargs)


def test_replay_config_edges():
    config = ReplayConfig(epoch_fraction=1.0, interval=1)
    assert config.to_dict() == {"epoch_fraction": 1.0, "interval": 1}
    assert ReplayConfig().to_dict() == {"epoch_fraction": 0.1, "interval": 10}
    assert ReplayConfig(epoch_fraction=0.01).server_steps(0) == 1
    assert ReplayConfig(epoch_fraction=0.01).local(CONFIG.local).epochs == 1


# ---------------------------------------------------------------- 5. isolation
@pytest.mark.parametrize("method", ["fru", "cufru"])
def test_outcome_server_holds_no_forgotten_pair(data, outcomes, forgotten_pairs, method):
    outcome = outcomes[method]
    server = outcome.federation.server
    assert not pairs(server.shared) & forgotten_pairs
    assert pairs(server.shared) == pairs(data.plan.remaining_shared(data.split.train))
    assert server.graph.num_edges == len(pairs(server.shared))
    assert len(outcome.store.forgotten()) == 0
    assert len(server.snapshots) == 1 and torch.equal(server.snapshots[0], server.table)


def test_learned_federation_is_untouched(data, recorded, outcomes):
    federation, _, before = recorded
    for method in ("fru", "cufru"):  # once more, after everything else of the module
        phase.unlearn(federation, data, method, UNLEARNING, CONFIG.rounds)
        assert outcomes[method].federation is not federation
        assert outcomes[method].federation.ledger is not federation.ledger
    after = state(federation)
    for key in ("table", "item", "user", "embeddings"):
        assert torch.equal(after[key], before[key]), key
    assert len(after["snapshots"]) == len(before["snapshots"]) == CONFIG.snapshots
    for a, b in zip(after["snapshots"], before["snapshots"], strict=True):
        assert torch.equal(a, b)
    assert after["shared"] == before["shared"]
    assert after["ledger"].equals(before["ledger"])
    assert after["histories"].keys() == before["histories"].keys()
    for name, history in before["histories"].items():
        assert after["histories"][name] is history
    assert after["records"].keys() == before["records"].keys()
    for name, records in before["records"].items():
        assert after["records"][name].keys() == records.keys(), name
        for key, tensors in records.items():
            now = after["records"][name][key]
            assert len(now) == len(tensors)
            assert all(torch.equal(a, b) for a, b in zip(now, tensors, strict=True)), (name, key)


def test_cufru_station_does_not_depend_on_how_users_are_chunked(data, monkeypatch):
    """Cohorts train and report in chunks of users; the station keeps one row per item and
    round whatever the chunking, so its bytes and its replay do not change."""
    from fedshare.federated import population

    stations = []
    for chunk in (512, 2):
        monkeypatch.setattr(population, "TRAIN_CHUNK", chunk)
        federation = phase.learn(data, CONFIG, record=True)
        stations.append(federation.histories["cufru"])
    big, small = stations
    assert big.aggregates.nbytes == small.aggregates.nbytes
    for round_ in sorted(big.aggregates.keys()):
        a, b = big.aggregates.get(round_), small.aggregates.get(round_)
        assert torch.equal(a[0], b[0])
        for x, y in zip(a[1:], b[1:], strict=True):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=0)
