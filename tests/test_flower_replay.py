"""FRU, CUFRU and Retrain through the real Flower app (``unlearning=fru|cufru|retrain``) give
the in-process engine's table, pay their replay in real messages, and leave nothing of the
forgotten data in the server's store; both engines count the same devices online."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from synthetic import tiny_prepared

from fedshare.federated.traffic import table_bytes, update_bytes
from fedshare.runconfig import federated_config
from fedshare.unlearning.config import UnlearningConfig
from fedshare.unlearning.phase import learn, unlearn
from fedshare.unlearning.replay import ReplayConfig
from simulations.cli import main
from simulations.experiment import resolve, run_experiment

SETTINGS = ["rounds=3", "eval-every=3", "fraction=0.5", "dim=8", "server-steps=2",
            "local-epochs=2", "seed=0", "snapshots=2", "unlearn=true", "replay-interval=2",
            "defence=none"]  # FRU and CUFRU need each node's update


@pytest.fixture(scope="module", params=["fru", "cufru", "retrain"])
def replayed(request, tmp_path_factory):
    data = tiny_prepared()
    root = tmp_path_factory.mktemp(f"flower-{request.param}")
    folder = data.save(root / "tiny")
    experiment = resolve(None, [*SETTINGS, f"prepared={folder}", "num-supernodes=2",
                                f"unlearning={request.param}"], name=request.param)
    out, summary = run_experiment(experiment, root / "runs", "flower")
    torch.set_num_threads(1)
    config = federated_config(experiment.run)
    learned = learn(data, config, record=True)
    outcome = unlearn(learned, data, request.param, UnlearningConfig(), config.rounds,
                      ReplayConfig(interval=2))
    return request.param, data, out, summary, outcome, config


def test_flower_replay_equals_the_inprocess_replay(replayed):
    _, _, out, _, outcome, _ = replayed
    assert np.allclose(np.load(out / "item_table.npy"),
                       outcome.federation.server.table.numpy(), atol=1e-5)


def test_summary_names_the_method_and_its_cost(replayed):
    method, data, _, summary, outcome, config = replayed
    assert summary["unlearning_method"] == method
    assert summary["forgotten_interactions"] == int(data.plan.unlearn.sum())
    assert summary["unlearning_kept_bytes"] == outcome.kept_bytes
    assert (outcome.kept_bytes > 0) == (method != "retrain")
    # the same users had to answer in both engines
    assert summary["devices_online"] == outcome.traffic.to_dict()["devices_online"] > 0
    assert summary["client_messages"] > 0 and summary["bytes_down"] > 0
    if method == "cufru":  # one calibration round (round 2 of 3): the table goes down once
        # per node; in process once per device
        table = table_bytes(data.num_items, config.dim)
        assert summary["bytes_down"] == summary["client_messages"] * table
        assert outcome.traffic.bytes_down == outcome.traffic.messages * table
        assert outcome.traffic.bytes_up == outcome.traffic.messages * update_bytes(
            data.num_items, config.dim)


def test_the_erasure_audit_finds_nothing_left(replayed, capsys):
    _, _, out, _, _, _ = replayed
    assert main(["audit", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("0 found in ")


def test_retrain_restarts_every_device(replayed):
    method, data, _, summary, outcome, config = replayed
    if method != "retrain":
        pytest.skip("Retrain only")
    assert summary["devices_online"] == data.num_users == len(outcome.traffic.devices)
    # two nodes: one restart and one train message per round each, at most
    assert summary["client_messages"] <= 2 * (1 + config.rounds)
