"""The sequence family's wire format, device directory and settings, without a Flower run."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array
from synthetic import tiny_sequences

from fedshare import protocol
from fedshare.errors import FedShareError
from fedshare.federated.population import NodeUpdate
from fedshare.runconfig import (
    APP_KEYS,
    model_family,
    node_sessions,
    sequence_config,
    sequence_data_key,
)
from fedshare.sequences.config import SequenceConfig
from fedshare.sequences.data import TEST, TRAIN, VALID
from fedshare.sequences.directory import DeviceReport, build_directory
from fedshare.sequences.evaluate import evaluate
from fedshare.sequences.federated import run_federated

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


pytestmark = pytest.mark.usefixtures("flower_task_identity")


def _report(node: int, sessions: list[int], parts: list[int], weights: list[int],
            catalogue: tuple[int, int] = (15, 8)) -> DeviceReport:
    return DeviceReport(node, np.array(sessions), np.array(parts), np.array(weights), *catalogue)


# ------------------------------------------------------------------------------ messages
def test_message_types_fit_flowers_routing_and_the_clientapp():
    from clients.app import app

    assert (protocol.SEQ_DEVICES, protocol.SEQ_TRAIN, protocol.SEQ_EVALUATE) == (
        "query.sequence_devices", "train.sequence", "evaluate.sequence")
    assert {protocol.SEQ_DEVICES, protocol.SEQ_TRAIN, protocol.SEQ_EVALUATE} <= set(
        app._registered_funcs)


def test_device_report_reads_back():
    request = protocol.sequence_devices_request(7)
    assert request.metadata.message_type == protocol.SEQ_DEVICES
    reply = protocol.sequence_devices_reply(request, np.array([3, 4, 5]),
                                            np.array([TRAIN, VALID, TEST], np.int8),
                                            np.array([6, 0, 2]), 15, 8)
    report = protocol.read_sequence_devices_reply(reply)
    assert report.node == 7 and (report.num_items, report.max_len) == (15, 8)
    assert report.sessions.tolist() == [3, 4, 5] and report.parts.tolist() == [0, 1, 2]
    assert report.weights.tolist() == [6, 0, 2] and report.problem() is None


def test_train_messages_share_one_model_and_read_back():
    vector = torch.linspace(-1, 1, 11)
    messages = protocol.sequence_train_requests(3, {1: [0, 2], 2: [5]}, vector)
    assert [m.metadata.message_type for m in messages] == [protocol.SEQ_TRAIN] * 2
    assert messages[0].content["arrays"] is messages[1].content["arrays"]  # built once a round
    request = protocol.read_sequence_train_request(messages[0])
    assert (request.round, request.sessions.tolist()) == (3, [0, 2])
    assert torch.equal(request.vector, vector)
    update = NodeUpdate(vector * 2, 9.0, torch.tensor([9.0]), 2)
    read = protocol.read_sequence_train_reply(
        protocol.sequence_train_reply(messages[0], update).content)
    assert torch.equal(read.table, update.table) and (read.weight, read.num_users) == (9.0, 2)
    assert torch.equal(read.row_weight, torch.tensor([9.0]))
    assert protocol.array_bytes(messages[0].content) == 11 * 4


@pytest.mark.parametrize("array", [np.zeros(4, np.float64), np.zeros((2, 2), np.float32)],
                         ids=["float64", "matrix"])
def test_a_model_that_is_not_a_flat_float32_vector_is_refused(array):
    update = NodeUpdate(torch.zeros(4), 1.0, torch.ones(1), 1)
    request = protocol.sequence_train_requests(1, {1: [0]}, torch.zeros(4))[0]
    reply = protocol.sequence_train_reply(request, update)
    reply.content["arrays"][protocol.MODEL] = Array(array)
    with pytest.raises(ValueError, match="flat float32"):
        protocol.read_sequence_train_reply(reply.content)


def test_evaluate_messages_read_back_and_replies_carry_sums_and_counts():
    vector = torch.arange(5, dtype=torch.float32)
    request = protocol.sequence_evaluate_requests([4, 9], vector, ("test",))[1]
    assert request.metadata.message_type == protocol.SEQ_EVALUATE
    read, parts = protocol.read_sequence_evaluate_request(request)
    assert torch.equal(read, vector) and parts == ("test",)
    reply = protocol.evaluate_reply(request, {"test": ({"recall@10": 3.0}, 4)})
    assert protocol.read_evaluate_reply(reply.content, ("test",)) == {
        "test": ({"recall@10": 3.0}, 4)}
    with pytest.raises(ValueError, match="unknown parts"):
        protocol.sequence_evaluate_requests([1], vector, ("train",))


# ----------------------------------------------------------------------------- directory
def test_directory_from_reports_samples_what_run_federated_samples():
    directory, refused = build_directory([
        _report(1, [0, 1, 2], [TRAIN, VALID, TRAIN], [4, 3, 0]),
        _report(2, [3, 4], [TRAIN, TEST], [5, 2])])
    assert refused == []
    assert directory.candidates().tolist() == [0, 2, 3]  # every training device, sorted
    assert directory.by_node([0, 3, 2]) == {1: [0, 2], 2: [3]}
    assert directory.expected([0, 2]) == (1, 4.0)  # a device with |D_u| = 0 trains nothing
    assert directory.counts() == {"train": 3, "valid": 1, "test": 1}


@pytest.mark.parametrize("bad, reason", [
    (_report(3, [1], [TRAIN], [2]), "another node"),
    (_report(3, [7], [TRAIN], [2], (16, 8)), "catalogue"),
    (_report(3, [7, 7], [TRAIN, TRAIN], [1, 1]), "repeated"),
    (_report(3, [7], [5], [1]), "unknown part"),
    (_report(3, [7, 8], [TRAIN], [1]), "one length"),
], ids=["taken", "catalogue", "repeated", "part", "ragged"])
def test_unsound_device_reports_are_refused(bad, reason):
    directory, refused = build_directory([_report(1, [0, 1], [TRAIN, VALID], [4, 3]), bad])
    assert [node for node, _ in refused] == [3] and reason in refused[0][1]
    assert sorted(directory.node_of) == [0, 1]


def test_no_sound_report_is_an_error():
    with pytest.raises(FedShareError, match="no node"):
        build_directory([_report(1, [0], [9], [1])])


# ------------------------------------------------------------------------------ settings
def test_sequence_defaults_match_pyproject():
    table = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    own = SequenceConfig().to_run_config()
    assert {k: table[k] for k in own} == own
    assert table["family"] == "lightgcn" and set(own) | {"family"} <= set(APP_KEYS)
    assert sequence_config(table) == SequenceConfig()


def test_the_schedule_is_shared_and_the_rest_is_the_familys_own():
    config = sequence_config({"rounds": 7, "fraction": 0.5, "eval-every": 2, "seed": 3,
                              "local-epochs": 9, "dim": 4, "seq-dim": 16, "seq-lr": 0.1})
    assert (config.rounds, config.fraction, config.eval_every, config.seed) == (7, 0.5, 2, 3)
    assert (config.local_epochs, config.dim, config.lr) == (1, 16, 0.1)  # LightGCN's ignored
    assert [r for r in range(1, 8) if config.is_eval_round(r)] == [2, 4, 6, 7]
    assert sequence_data_key({"seq-data": "x"}) == ("x",)
    assert sequence_data_key({"split-seed": 2, "seq-max-len": 20}) == ("ml-100k", "", 2, 20)


@pytest.mark.parametrize("setting, message", [
    ({"seq-backbone": "bert4rec"}, "unknown seq-backbone"),
    ({"seq-optimizer": "rmsprop"}, "unknown seq-optimizer"),
    ({"seq-server-optimizer": "yogi"}, "unknown seq-server-optimizer"),
    ({"seq-dim": 0}, "seq-dim must be >= 1"),
    ({"seq-lr": 0.0}, "seq-lr must be > 0"),
    ({"seq-server-eps": 0.0}, "seq-server-eps must be > 0"),
    ({"seq-server-beta2": 1.0}, "seq-server-beta2 must lie in"),
    ({"seq-local-epochs": 1.5}, "expects int"),
    ({"seq-dim": True}, "expects int"),
    ({"seq-backbone": 3}, "expects str"),
    ({"fraction": 0.0}, "fraction"),
], ids=["backbone", "optimizer", "server-optimizer", "dim", "lr", "eps", "beta2", "epochs",
        "bool", "str",
        "fraction"])
def test_bad_sequence_settings_are_one_error(setting, message):
    with pytest.raises(FedShareError, match=message):
        sequence_config(setting)


def test_family_and_node_assignment():
    assert model_family({}) == "lightgcn" and model_family({"family": "sequence"}) == "sequence"
    with pytest.raises(FedShareError, match="unknown family"):
        model_family({"family": "gnn"})
    assert node_sessions({"partition-id": 9, "num-partitions": 10}, 10).tolist() == [9]
    assert node_sessions({"user-id": 4}, 10).tolist() == [4]
    with pytest.raises(FedShareError, match="device file"):
        node_sessions({"device-file": "x.json"}, 10)


# ------------------------------------------------------------------------ in-process engine
def test_fedadam_reports_and_returns_the_best_validation_model():
    """The kept model is restored as it was: FedAdam takes no further server step on it."""
    torch.set_num_threads(1)
    data = tiny_sequences(12)
    result = run_federated(data, "gru4rec", rounds=3, fraction=0.5, local_epochs=2, lr=1.0,
                           seed=0, eval_every=1, dim=8, optimizer="sgd",
                           server_optimizer="adam", server_lr=0.05)
    valid = torch.from_numpy(data.windows(VALID))
    assert evaluate(result.model, valid) == pytest.approx(result.best_valid, abs=1e-9)


# ----------------------------------------------------------------------- the server's checks
@pytest.fixture
def strategy():
    from strategies.inbox import Inbox
    from strategies.sequence import SequenceStrategy

    directory, _ = build_directory([_report(1, [0, 1, 2], [TRAIN, TRAIN, VALID], [4, 3, 2]),
                                    _report(2, [3, 4], [TRAIN, TEST], [5, 2])])
    config = SequenceConfig(backbone="gru4rec", dim=4, rounds=1, server_optimizer="fedavg")
    return SequenceStrategy(config, directory, Inbox(), max_failed=0.5)


def _replies(strategy, changes: dict[int, dict]):
    """One train reply per asked node: the node's sound update, with ``changes`` by node."""
    requests = protocol.sequence_train_requests(1, strategy.sampled, strategy.server.table)
    replies = []
    for request in requests:
        node = request.metadata.dst_node_id
        users, weight = strategy.directory.expected(strategy.sampled[node])
        values = {"table": strategy.server.table + 1.0, "weight": weight,
                  "row_weight": torch.tensor([weight]), "num_users": users,
                  **changes.get(node, {})}
        replies.append(protocol.sequence_train_reply(request, NodeUpdate(**values)))
    return replies


@pytest.mark.parametrize("change, words", [
    (lambda start: {"weight": 99.0}, "weight"),
    (lambda start: {"num_users": 3}, "device count"),
    (lambda start: {"table": start[:-1]}, "wrong size"),
    (lambda start: {"table": torch.full_like(start, float("nan"))}, "non-finite"),
], ids=["weight", "count", "size", "nan"])
def test_forged_train_replies_are_rejected_and_a_round_with_too_many_changes_nothing(
        strategy, change, words):
    start = strategy.server.table.clone()
    strategy.sampled = {1: [0, 1], 2: [3]}
    updates = strategy.accepted_updates(1, _replies(strategy, {2: change(start)}))
    assert updates is not None and len(updates) == 1  # 1 of 2 failed: tolerated
    assert [r["node"] for r in strategy.inbox.rejected] == [2]
    assert words in strategy.inbox.rejected[0]["reason"]
    torch.testing.assert_close(strategy.learning(1, updates), start + 1.0)
    strategy.sampled = {1: [0], 2: [3]}
    moved = strategy.server.table.clone()
    failed = _replies(strategy, {1: change(moved), 2: change(moved)})
    assert strategy.accepted_updates(2, failed) is None  # 2 of 2 failed
    assert torch.equal(strategy.learning(2, None), moved)
