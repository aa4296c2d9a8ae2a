"""CDCGNNFed (``variant = "cdcgnnfed"``): graph mending worked by hand, the mended graph's
PyG propagation, an in-process run, re-mending after unsharing, the Flower app against the
in-process engine, and bad ``mend-*`` settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from synthetic import tiny_prepared
from torch_geometric.nn.models import LightGCN as PygLightGCN

import simulations.experiment as experiment_module
from fedshare.data.interactions import Interactions
from fedshare.errors import FedShareError
from fedshare.federated.config import FederatedConfig
from fedshare.federated.graph_mending import (
    LightGCNLinkPredictor,
    MendSettings,
    impaired,
    mend,
)
from fedshare.federated.inprocess import run_inprocess
from fedshare.federated.server import Server
from simulations.cli import main
from simulations.experiment import resolve, run_experiment

# ------------------------------------------------------------------ worked by hand
# D_s: 4 users x 5 items, 10 edges; every user and item has an edge, so the mending's compact
# ids are these ids.
EDGES = {0: [0, 1, 2], 1: [1, 2, 3], 2: [0, 3], 3: [2, 4]}
# The fixed scorer: P(edge) whatever the graph. Dropped (seed 0): (0, 1) at 0.99, (2, 3) at 0.1.
P = np.array([[0.90, 0.99, 0.70, 0.95, 0.20],
              [0.85, 0.90, 0.90, 0.90, 0.60],
              [0.90, 0.30, 0.85, 0.10, 0.10],
              [0.40, 0.65, 0.90, 0.50, 0.90]])


def _hand_graph() -> Interactions:
    users = [u for u, items in EDGES.items() for _ in items]
    items = [i for row in EDGES.values() for i in row]
    return Interactions.from_arrays(np.array(users), np.array(items), 4, 5)


def _pairs(data: Interactions) -> set[tuple[int, int]]:
    return set(zip(data.users.tolist(), data.items.tolist(), strict=True))


class FixedScorer:
    """A link predictor whose scores are :data:`P` (or a constant); records what it saw."""

    def __init__(self, scores: np.ndarray = P) -> None:
        self.scores = scores
        self.fitted: set[tuple[int, int]] | None = None

    def fit(self, kept: Interactions) -> None:
        self.fitted = _pairs(kept)

    def probabilities(self, graph: Interactions, users: np.ndarray) -> np.ndarray:
        return self.scores[users]


def test_mending_worked_by_hand():
    shared = _hand_graph()
    scorer = FixedScorer()
    result = mend(shared, MendSettings(drop=0.2, threshold=0.7, ratio=0.2, seed=0), scorer)
    # step 1: round(0.2 * 10) = 2 edges, the two smallest seeded hashes (pinned)
    assert _pairs(result.dropped) == {(0, 1), (2, 3)}
    assert scorer.fitted == _pairs(shared) - {(0, 1), (2, 3)}  # trained on the kept 8 only
    stats = result.stats
    assert (stats.shared, stats.dropped) == (10, 2)
    # step 3, the impaired graph: >= 0.7 and not kept: (0,1) .99, (0,3) .95, (1,0) .85,
    # (2,2) .85; cap floor(0.2 * 8) = 1 keeps (0,1), a dropped edge: recovered
    assert (stats.recovered, stats.impaired_added) == (1, 1)
    assert (stats.recall, stats.precision) == (0.5, 1.0)
    # (0,1) at .99 beats user 0's non-edges (.95, .2); (2,3) at .1 beats none of user 2's
    # (.3, .85, .1: a tie is no win)
    assert stats.pair_accuracy == 0.5
    # step 4, the full graph: 20 - 10 candidates; >= 0.7: (0,3) .95, (1,0) .85, (2,2) .85;
    # cap floor(0.2 * 10) = 2: the tie at .85 goes to the smaller key, (1,0) = 5 < (2,2) = 12
    assert (stats.candidates, stats.above_threshold, stats.cap, stats.added) == (10, 3, 2, 2)
    assert _pairs(result.added) == {(0, 3), (1, 0)}
    assert _pairs(result.edges) == _pairs(shared) | {(0, 3), (1, 0)}
    assert len(result.edges) == 12  # no duplicates
    np.testing.assert_array_equal(result.edges.users[:10], shared.users)  # D_s first


def test_no_added_edge_duplicates_an_existing_one():
    shared = _hand_graph()
    everything = mend(shared, MendSettings(drop=0.2, threshold=0.5, ratio=10.0),
                      FixedScorer(np.full((4, 5), 0.99)))
    assert _pairs(everything.added) == {(u, i) for u in range(4) for i in range(5)} - \
        _pairs(shared)
    assert len(everything.edges) == len(_pairs(everything.edges)) == 20
    nothing = mend(shared, MendSettings(drop=0.2, threshold=0.5, ratio=0.0),
                   FixedScorer(np.full((4, 5), 0.99)))
    assert len(nothing.added) == 0 and _pairs(nothing.edges) == _pairs(shared)


def test_impairing_is_seeded_and_order_free():
    shared = _hand_graph()
    mask = impaired(shared, 0.2, 0)
    order = np.random.default_rng(1).permutation(len(shared))
    shuffled = Interactions.from_arrays(shared.users[order], shared.items[order], 4, 5)
    assert _pairs(shared.subset(mask)) == _pairs(shuffled.subset(impaired(shuffled, 0.2, 0)))
    assert _pairs(shared.subset(impaired(shared, 0.2, 1))) != _pairs(shared.subset(mask))
    assert impaired(shared, 0.0, 0).sum() == 0
    assert impaired(shared, 0.99, 0).sum() == 9  # one edge is always kept


# ------------------------------------------------------------------ the default predictor
def _two_communities() -> Interactions:
    """Users 0-9 each with 8 of items 0-14, users 10-19 with 8 of items 15-29: a structure
    a link predictor can learn."""
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(20), 8)
    items = np.concatenate([rng.choice(15, 8, replace=False) + (15 if u >= 10 else 0)
                            for u in range(20)])
    return Interactions.from_arrays(users, items, 20, 30)


def test_lightgcn_predictor_is_deterministic_and_learns():
    shared = _two_communities()
    settings = MendSettings(drop=0.2, threshold=0.7, ratio=0.1, epochs=100, dim=8, seed=3)
    a, b = mend(shared, settings), mend(shared, settings)
    assert _pairs(a.edges) == _pairs(b.edges)
    assert {k: v for k, v in a.stats.to_dict().items() if k != "seconds"} == \
        {k: v for k, v in b.stats.to_dict().items() if k != "seconds"}
    assert a.stats.dropped == 32 and a.stats.pair_accuracy > 0.75  # held out, above chance
    assert a.stats.recovered > 0
    assert 0 < a.stats.added == a.stats.cap == 16  # floor(0.1 * 160)
    assert not _pairs(a.added) & _pairs(shared)
    # every added edge joins a user to an item of its own community
    np.testing.assert_array_equal(a.added.users >= 10, a.added.items >= 15)


# ------------------------------------------------------------------ the server's graph
def _config(**kw) -> FederatedConfig:
    base = {"variant": "cdcgnnfed", "rounds": 2, "fraction": 0.5, "dim": 8,
            "server_steps": 2, "local_epochs": 1, "eval_every": 1,
            "mend_threshold": 0.5, "mend_ratio": 0.5, "mend_epochs": 5}
    return FederatedConfig(**{**base, **kw})


def test_mended_graph_propagates_as_pygs_lightgcn():
    data = tiny_prepared()
    shared = data.plan.shared_data(data.split.train)
    server = Server(shared, _config())
    mending = server.mending
    assert mending is not None and mending.stats.added > 0
    assert server.graph is not None and server.graph.num_edges == len(shared) + len(
        mending.added)
    # PyG's own LightGCN (gcn_norm inside LGConv, alpha = 1/(L+1)) on the mended edges
    pyg = PygLightGCN(shared.num_users + shared.num_items, 8, num_layers=3)
    with torch.no_grad():
        pyg.embedding.weight.copy_(torch.cat([server.user, server.item]))
        expected = pyg.get_embedding(mending.edges.bipartite_edge_index())
        users_g, items_g = server.graph.propagate(server.user, server.item, 3)
    torch.testing.assert_close(torch.cat([users_g, items_g]), expected, atol=1e-6, rtol=1e-5)
    # BPR's positives and the edges its negatives avoid are the mended graph's; D_s stays
    keys = mending.edges.users * shared.num_items + mending.edges.items
    np.testing.assert_array_equal(server._known, np.unique(keys))
    assert len(server.shared) == len(shared)
    torch.testing.assert_close(server.graph_items, torch.from_numpy(
        np.flatnonzero(shared.item_degrees() > 0)))  # the same items: InfoNCE's rows


def test_other_variants_do_not_mend():
    data = tiny_prepared()
    shared = data.plan.shared_data(data.split.train)
    server = Server(shared, _config(variant="fedshare"))
    assert server.mending is None and server.mending_stats() is None
    assert server.graph is not None and server.graph.num_edges == len(shared)


def test_unsharing_re_mends_from_the_remaining_data():
    data = tiny_prepared()
    shared = data.plan.shared_data(data.split.train)
    server = Server(shared, _config())
    leaver = int(np.unique(shared.users)[0])
    remaining = shared.subset(shared.users != leaver)
    server.set_shared(remaining)
    fresh = Server(remaining, _config())
    assert server.mending is not None and fresh.mending is not None
    assert _pairs(server.mending.edges) == _pairs(fresh.mending.edges)
    assert leaver not in set(server.mending.edges.users.tolist())  # no mended edge of theirs
    assert server.mending_stats()["shared"] == len(remaining)


def test_inprocess_run_trains_and_scores():
    data = tiny_prepared()
    result = run_inprocess(data, _config())
    server = result.federation.server
    assert server.mending is not None and server.mending.stats.added > 0
    assert [row["round"] for row in result.history] == [1, 2]
    for part in (result.valid, result.test):
        assert set(part) == {"hr@20", "recall@20", "ndcg@20"}
        assert all(0.0 <= v <= 1.0 for v in part.values())
    assert torch.isfinite(result.table).all()
    plain = run_inprocess(data, _config(variant="fedshare"))
    assert not torch.equal(result.table, plain.table)  # the mended graph changed the model
    # with nothing added, CDCGNNFed is FedShare: the mending is the only difference
    unmended = run_inprocess(data, _config(mend_ratio=0.0))
    assert unmended.federation.server.mending.stats.added == 0
    torch.testing.assert_close(unmended.table, plain.table, atol=0, rtol=0)
    assert unmended.test == plain.test


# ------------------------------------------------------------------ bad settings
@pytest.mark.parametrize(("setting", "fragment"), [
    ({"mend_drop": 1.0}, "mend-drop"), ({"mend_drop": -0.1}, "mend-drop"),
    ({"mend_threshold": 0.0}, "mend-threshold"), ({"mend_threshold": 1.0}, "mend-threshold"),
    ({"mend_ratio": -1.0}, "mend-ratio"), ({"mend_ratio": float("inf")}, "mend-ratio"),
    ({"mend_epochs": 0}, "mend-epochs"), ({"mend_drop": float("nan")}, "mend-drop"),
])
def test_bad_mend_settings_are_one_line_errors(setting, fragment):
    with pytest.raises(FedShareError, match=fragment) as caught:
        FederatedConfig(**setting)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("pair", ["mend-drop=2", "mend-threshold=1.5", "mend-epochs=2.5",
                                  "mend-ratio=lots"])
def test_cli_rejects_bad_mend_settings_in_one_line(capsys, tmp_path, monkeypatch, pair):
    def refuse(*args, **kwargs):
        raise AssertionError("a run started despite invalid input")

    monkeypatch.setattr(experiment_module, "run_flower", refuse)
    monkeypatch.setattr(experiment_module, "_run_inprocess", refuse)
    code = main(["run", "--set", "variant=cdcgnnfed", "--set", pair, "--engine", "inprocess",
                 "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("fedshare: error:")
    assert pair.split("=")[0] in err[0]


def test_predictor_needs_fitting():
    with pytest.raises(AssertionError, match="fit first"):
        LightGCNLinkPredictor(MendSettings()).probabilities(_hand_graph(), np.arange(2))


# ------------------------------------------------------------------ Flower = in process
def test_flower_run_equals_the_inprocess_engine(tmp_path):
    """One Flower simulation (2 SuperNodes, plain replies) against the in-process engine."""
    from test_flower_app import _superlinks, assert_superlinks_gone

    before = _superlinks()
    folder = tiny_prepared().save(tmp_path / "tiny")
    settings = [f"prepared={folder}", "variant=cdcgnnfed", "rounds=2", "eval-every=2",
                "fraction=0.5", "dim=8", "server-steps=2", "local-epochs=2", "seed=0",
                "mend-threshold=0.5", "mend-ratio=0.5", "mend-epochs=5", "defence=none",
                "num-supernodes=2"]
    try:
        flower_out, flower = run_experiment(resolve(None, settings, name="flower"),
                                            tmp_path / "runs", "flower")
        local_out, local = run_experiment(resolve(None, settings, name="local"),
                                          tmp_path / "runs", "inprocess")
    finally:
        assert_superlinks_gone(before)
    assert flower["variant"] == local["variant"] == "cdcgnnfed"
    np.testing.assert_allclose(np.load(flower_out / "item_table.npy"),
                               np.load(local_out / "item_table.npy"), atol=1e-5, rtol=0)
    for part in ("valid", "test"):
        for key, value in local[part].items():
            assert flower[part][key] == pytest.approx(value, abs=1e-5), (part, key)
    same = {k: v for k, v in local["mending"].items() if k != "seconds"}
    assert {k: v for k, v in flower["mending"].items() if k != "seconds"} == same
    assert same["added"] > 0
