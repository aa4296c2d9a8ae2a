"""The sequence family through the real Flower app, on a tiny synthetic SequenceData.

Two Flower simulations shared by every test of this module, each learning then unlearning:

- ``cohorts``: 2 SuperNodes, each serving a contiguous range of devices (sessions); backbone
  dropout 0, then joint CAU (``cau-gradient-hard``) with SGD;
- ``per-device``: one SuperNode per device (``num-partitions`` = the number of sessions);
  the default dropout, then ``cau-local`` with the default Adam;

plus the in-process engine (:func:`fedshare.sequences.federated.run_federated`) with each
run's settings. The learning phases must give the same best-validation model and test metrics:
a device trains the same whoever serves it, and FedAvg over node means is FedAvg over devices.
FedAdam (the default server optimizer) is on, so the kept model is restored without a further
server step. The unlearning phases must give the in-process forms' models
(:func:`joint_cau_by_devices`, :func:`local_cau`) from the learned model, and the Hit_u the
devices report must be :func:`score`'s.

Why dropout 0 and SGD for the joint run: each device's dropout stream is drawn in its node's
process in Flower but from one stream in process, so only a dropout-free forward is the same
computation in both; and with Adam a coordinate whose gradient is exactly 0 in one run and
~1e-9 of float rounding (the nodes' sums are added in another order) in the other moves by 0
in one and by about lr in the other (Adam's step is ~lr * sign(g)): numerics, not logic. The
local form seeds each device's own CAU run, so it is compared with dropout and Adam on.

Why FedAdam's eps is 1e-3 here (the default is 1e-8): the runs group the devices into nodes
differently (Flower's contiguous partitions, the in-process round-robin cohorts, one device per
node), so their node means round differently in float32, and with eps 1e-8 a coordinate whose
averaged step is near 0 takes a step of up to about lr whose sign follows that rounding. eps
1e-3 keeps such coordinates still, so the comparison tests the sampling and the averaging.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from synthetic import tiny_sequences
from test_flower_app import _superlinks, assert_superlinks_gone

from fedshare.federated.rounds import sample_users
from fedshare.runconfig import sequence_unlearning
from fedshare.sequences.cau_devices import joint_cau_by_devices, local_cau
from fedshare.sequences.config import SequenceConfig
from fedshare.sequences.data import SequenceData
from fedshare.sequences.federated import FederatedResult, make_backbone, prediction_points
from fedshare.sequences.requests import forget_set, sequence_requests
from fedshare.sequences.unlearning_methods import (
    CAUSettings,
    UnlearningCase,
    score,
)
from simulations.experiment import resolve, run_experiment

SESSIONS, ROUNDS, FRACTION, SEED, DIM = 10, 2, 0.5, 0, 8
UNLEARN = ["unlearn=true", "seq-request-fraction=0.5", "seq-cau-epochs=2",
           "seq-cau-batch-size=2"]
RUNS = {  # name: nodes, engine, settings of its own
    "cohorts": (2, "flower", ["seq-dropout=0", *UNLEARN, "seq-unlearning=cau-gradient-hard",
                              "seq-cau-optimizer=sgd", "seq-cau-lr=0.5"]),
    "per-device": (SESSIONS, "flower", [*UNLEARN, "seq-unlearning=cau-local"]),
    "inprocess": (2, "inprocess", ["seq-dropout=0"]),
    "inprocess-dropout": (2, "inprocess", []),
}


@pytest.fixture(scope="module")
def data() -> SequenceData:
    return tiny_sequences(SESSIONS)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data):
    """Both Flower runs and the in-process run; no SuperLink of ours outlives them."""
    before = _superlinks()
    root = tmp_path_factory.mktemp("sequence-flower")
    folder = data.save(root / "toy")
    settings = ["family=sequence", f"seq-data={folder}", f"seq-dim={DIM}", f"rounds={ROUNDS}",
                "eval-every=1", f"fraction={FRACTION}", f"seed={SEED}", "seq-server-eps=0.001"]
    try:
        yield {name: run_experiment(resolve(None, [*settings, *own, f"num-supernodes={nodes}"],
                                            name=name), root / "runs", engine)
               for name, (nodes, engine, own) in RUNS.items()}
    finally:
        assert_superlinks_gone(before)


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


def test_one_node_per_device_equals_the_inprocess_engine_with_dropout(runs):
    _same_run(runs, "per-device", "inprocess-dropout")


def test_sequence_run_folder_and_traffic(runs, data):
    train = np.flatnonzero(data.part == 0)
    weights = {int(s): prediction_points(w) for s, w in zip(
        range(SESSIONS), data.windows(), strict=True)}
    for name, nodes in (("cohorts", 2), ("per-device", SESSIONS)):
        out, summary = runs[name]
        assert {"config.toml", "config.json", "metrics.csv", "model.npy", "summary.json",
                "flower.log", "requests.json", "unlearned_model.npy"} <= {
                    p.name for p in out.iterdir()}
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


# ------------------------------------------------------------------------------ unlearning
def _settings(name: str):
    return sequence_unlearning(resolve(None, ["family=sequence", *RUNS[name][2]]).run)


def _learned_and_unlearned(runs, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    out = runs[name][0]
    return (torch.from_numpy(np.load(out / "model.npy")),
            torch.from_numpy(np.load(out / "unlearned_model.npy")))


def test_flower_joint_cau_equals_joint_cau_by_devices(runs, data):
    """The cohorts run's unlearned model is the in-process message-by-message joint CAU from
    its learned model (dropout 0, SGD: see the module docstring)."""
    learned, unlearned = _learned_and_unlearned(runs, "cohorts")
    forget, owners = forget_set(data, sequence_requests(data, 0.5, SEED))
    config = _settings("cohorts").cau_config("sasrec", SEED)
    assert (config.optimizer, config.epochs, config.batch_size) == ("sgd", 2, 2)
    backbone = make_backbone("sasrec", data.num_items, data.max_len, DIM, dropout=0.0)
    reference = joint_cau_by_devices(backbone, learned, forget, owners, config)
    torch.testing.assert_close(unlearned, reference.vector, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(unlearned, learned)
    phase = runs["cohorts"][1]["unlearning"]
    assert phase["steps"] == len(reference.result.batches)


def test_flower_cau_local_equals_local_cau(runs, data):
    learned, unlearned = _learned_and_unlearned(runs, "per-device")
    forget, owners = forget_set(data, sequence_requests(data, 0.5, SEED))
    config = _settings("per-device").cau_config("sasrec", SEED)
    backbone = make_backbone("sasrec", data.num_items, data.max_len, DIM)  # dropout 0.2
    reference = local_cau(backbone, learned, forget, owners, config)
    torch.testing.assert_close(unlearned, reference.vector, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(unlearned, learned)


def test_requests_are_logged_once_and_served(runs, data):
    requests = sequence_requests(data, 0.5, SEED)
    for name, method in (("cohorts", "cau-gradient-hard"), ("per-device", "cau-local")):
        out, summary = runs[name]
        log = json.loads((out / "requests.json").read_text())
        assert {e["session"]: e["positions"] for e in log["requests"]} == requests
        assert len(log["requests"]) == len(requests)
        assert all(e["served_by"] == method and e["served_at"] for e in log["requests"])
        phase = summary["unlearning"]
        assert phase["requests"] == {"received": len(requests), "served": len(requests)}
        assert phase["forget_samples"] == len(requests) and phase["seconds"] > 0
        traffic = phase["traffic"]
        assert traffic["unlearning"]["devices_online"] == len(requests)
        assert traffic["unlearning"]["client_messages"] > 0
        assert traffic["unlearning"]["bytes_up"] > 0 and traffic["unlearning"]["bytes_down"] > 0
    # cau-local: one message per node with requesting devices (one device per node here)
    assert runs["per-device"][1]["unlearning"]["traffic"]["unlearning"][
        "client_messages"] == len(requests)


def test_hit_u_from_the_devices_equals_score(runs, data):
    """Both phases: the original's scores are the learning phase's test plus the devices'
    Hit_u; the unlearned model's are those :func:`score` gives in process."""
    requests = sequence_requests(data, 0.5, SEED)
    for name in ("cohorts", "per-device"):
        learned, unlearned = _learned_and_unlearned(runs, name)
        dropout = 0.0 if name == "cohorts" else 0.2
        model = make_backbone("sasrec", data.num_items, data.max_len, DIM, dropout)
        case = UnlearningCase(data, requests, FederatedResult(model, pd.DataFrame()),
                              SequenceConfig(dim=DIM), CAUSettings(), SEED)
        phase = runs[name][1]["unlearning"]
        assert phase["original"]["recall@10"] == pytest.approx(runs[name][1]["test"]["recall@10"])
        for key, vector in (("original", learned), ("unlearned", unlearned)):
            expected = score(case, vector)
            assert set(phase[key]) == set(expected)
            assert phase[key] == pytest.approx(expected, abs=1e-6), (name, key)
