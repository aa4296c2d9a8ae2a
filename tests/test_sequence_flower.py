"""The sequence family through the real Flower app, on a tiny synthetic SequenceData.

Two Flower simulations shared by every test of this module:

- ``cohorts``: 2 SuperNodes, each serving a contiguous range of devices (sessions);
- ``per-device``: one SuperNode per device (``num-partitions`` = the number of sessions);

plus the in-process engine (:func:`fedshare.sequences.federated.run_federated`) with the same
settings. All three must give the same best-validation model and test metrics: a device trains
the same whoever serves it, and FedAvg over node means is FedAvg over devices. FedAdam (the
default server optimizer) is on, so the kept model is restored without a further server step.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest
from synthetic import tiny_sequences
from test_flower_app import _stop_orphans, _superlinks

from fedshare.federated.rounds import sample_users
from fedshare.sequences.data import SequenceData
from fedshare.sequences.federated import prediction_points
from simulations.experiment import resolve, run_experiment

SESSIONS, ROUNDS, FRACTION, SEED = 10, 2, 0.5, 0


@pytest.fixture(scope="module")
def data() -> SequenceData:
    return tiny_sequences(SESSIONS)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data):
    """Both Flower runs and the in-process run; no SuperLink of ours outlives them."""
    before = _superlinks()
    root = tmp_path_factory.mktemp("sequence-flower")
    folder = data.save(root / "toy")
    settings = ["family=sequence", f"seq-data={folder}", "seq-dim=8", f"rounds={ROUNDS}",
                "eval-every=1", f"fraction={FRACTION}", f"seed={SEED}"]
    try:
        yield {name: run_experiment(resolve(None, [*settings, f"num-supernodes={nodes}"],
                                            name=name), root / "runs", engine)
               for name, nodes, engine in (("cohorts", 2, "flower"),
                                           ("per-device", SESSIONS, "flower"),
                                           ("inprocess", 2, "inprocess"))}
    finally:
        deadline = time.monotonic() + 20
        while set(_superlinks()) - set(before) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = {pid: cmd for pid, cmd in _superlinks().items() if pid not in before}
        _stop_orphans(set(left))
        assert not left, f"flower-superlink processes left running: {left}"


def _same_run(runs, a: str, b: str) -> None:
    (out_a, summary_a), (out_b, summary_b) = runs[a], runs[b]
    np.testing.assert_allclose(np.load(out_a / "model.npy"), np.load(out_b / "model.npy"),
                               atol=1e-5, rtol=0)
    assert summary_a["best_round"] == summary_b["best_round"]
    for part in ("valid", "test"):
        assert set(summary_a[part]) == {"recall@10", "ndcg@10", "recall@20", "ndcg@20"}
        assert summary_a[part] == pytest.approx(summary_b[part], abs=1e-5), part
    frames = [pd.read_csv(out / "metrics.csv") for out in (out_a, out_b)]
    assert list(frames[0].columns) == list(frames[1].columns)
    for column in ("round", "num-users", "num-examples", "valid_recall@10", "valid_ndcg@10"):
        np.testing.assert_allclose(frames[0][column], frames[1][column], atol=1e-5)


def test_flower_cohorts_equal_the_inprocess_engine(runs):
    _same_run(runs, "cohorts", "inprocess")


def test_one_node_per_device_equals_cohorts(runs):
    _same_run(runs, "per-device", "cohorts")


def test_sequence_run_folder_and_traffic(runs, data):
    train = np.flatnonzero(data.part == 0)
    weights = {int(s): prediction_points(w) for s, w in zip(
        range(SESSIONS), data.windows(), strict=True)}
    for name, nodes in (("cohorts", 2), ("per-device", SESSIONS)):
        out, summary = runs[name]
        assert {"config.toml", "config.json", "metrics.csv", "model.npy", "summary.json",
                "flower.log"} <= {p.name for p in out.iterdir()}
        assert summary["family"] == "sequence" and summary["engine"] == "flower"
        assert summary["nodes"] == nodes and summary["rejected_replies"] == []
        assert summary["devices"] == {"train": 6, "valid": 2, "test": 2}
        model = np.load(out / "model.npy")
        assert model.dtype == np.float32 and model.shape == (summary["model_size"],)
        metrics = pd.read_csv(out / "metrics.csv")
        assert metrics["round"].tolist() == list(range(1, ROUNDS + 1))
        sampled = [sample_users(train, FRACTION, SEED, r) for r in range(1, ROUNDS + 1)]
        assert metrics["num-users"].tolist() == [len(s) for s in sampled]
        assert metrics["num-examples"].tolist() == [sum(weights[int(s)] for s in ss)
                                                    for ss in sampled]
        # the model goes down once per message and comes back once per train reply
        traffic, size = summary["traffic"], model.nbytes
        assert traffic["train"]["bytes_down"] == traffic["train"]["client_messages"] * size
        assert traffic["train"]["bytes_up"] == traffic["train"]["bytes_down"]
        assert traffic["train"]["devices_online"] == len(np.unique(np.concatenate(sampled)))
        assert traffic["evaluate"]["bytes_up"] == 0  # metric sums only
        per_round = [len(s) for s in sampled] if nodes == SESSIONS else [2] * ROUNDS
        assert traffic["train"]["client_messages"] <= sum(per_round)
    per_device = runs["per-device"][1]["traffic"]["train"]["client_messages"]
    assert per_device == sum(len(sample_users(train, FRACTION, SEED, r))
                             for r in range(1, ROUNDS + 1))
