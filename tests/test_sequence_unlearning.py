"""Sequence unlearning's pieces without a Flower run: the nodes' side (ForgetDevices), the
server's map of samples, the request checks and log, and the settings (issue 17)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from synthetic import toy_sessions
from torch.nn.utils import parameters_to_vector

from fedshare.errors import FedShareError
from fedshare.runconfig import sequence_unlearning
from fedshare.sequences.cau_devices import JointServer, joint_cau_by_devices, local_cau
from fedshare.sequences.cau_node import ForgetDevices
from fedshare.sequences.data import TRAIN
from fedshare.sequences.directory import SequenceDirectory
from fedshare.sequences.federated import make_backbone, prediction_points
from fedshare.sequences.request_log import RequestLog, RequestReport
from fedshare.sequences.requests import forget_set, sequence_requests
from fedshare.sequences.sample_index import SampleIndex
from fedshare.sequences.unlearning_methods import CAUSettings, method_config
from fedshare.unlearning.cau.unlearn import schedule

torch.set_num_threads(1)
NODES = (2 ** 63 + 5, 7)  # Flower node ids are uint64


@pytest.fixture(scope="module")
def setup():
    data = toy_sessions(30)
    torch.manual_seed(0)
    model = make_backbone("sasrec", data.num_items, data.max_len, dim=8, dropout=0.0)
    halves = np.array_split(np.arange(data.num_sessions), 2)
    nodes = {n: ForgetDevices(data, h, model, 0.4, 0) for n, h in zip(NODES, halves,
                                                                        strict=True)}
    return data, model, nodes


def _joint_by_nodes(nodes: dict[int, ForgetDevices], start: torch.Tensor, config):
    """The server loop of :class:`strategies.sequence_unlearning.Unlearning` without messages."""
    index = SampleIndex({n: d.requests for n, d in nodes.items()})
    refs = {n: d.reference(start) for n, d in nodes.items()}
    server = JointServer(start, config)

    def scores() -> np.ndarray:
        out = np.empty(len(index))
        for n, d in nodes.items():
            out[index.rows[n]] = d.scores(server.vector, refs[n], config)
        return out

    batches = []
    for step, batch in enumerate(schedule(scores, len(index), config)):
        replies = [nodes[n].gradient_sums(server.vector, refs[n], np.array(s), step, config)
                   for n, s in index.split(batch).items()]
        server.step([r[0] for r in replies], [r[1] for r in replies])
        batches.append(batch.tolist())
    return index, server.vector, batches


@pytest.mark.parametrize("method", ["cau-gradient-hard", "cau-embedding-soft", "wo-cu"])
def test_nodes_and_server_loop_equal_joint_cau_by_devices(setup, method):
    data, model, nodes = setup
    requests = sequence_requests(data, 0.4, 0)
    assert {s: p for d in nodes.values() for s, p in d.requests.items()} == requests
    forget, owners = forget_set(data, requests)
    start = parameters_to_vector(model.parameters()).detach().clone()
    config = method_config(method, CAUSettings(epochs=2, batch_size=3, lr=0.5,
                                               optimizer="sgd").base("sasrec", 1))
    index, vector, _ = _joint_by_nodes(nodes, start, config)
    assert index.owners == owners
    reference = joint_cau_by_devices(model, start, forget, owners, config)
    torch.testing.assert_close(vector, reference.vector, atol=1e-5, rtol=1e-4)
    assert not torch.equal(vector, start)


def test_nodes_local_cau_averages_to_local_cau(setup):
    data, model, nodes = setup
    requests = sequence_requests(data, 0.4, 0)
    forget, owners = forget_set(data, requests)
    start = parameters_to_vector(model.parameters()).detach().clone()
    config = method_config("cau-local", CAUSettings(epochs=2, batch_size=3).base("sasrec", 1))
    means = [d.local(start, config) for d in nodes.values()]
    total = sum(w * m.double() for m, w in means) / sum(w for _, w in means)
    torch.testing.assert_close(total.float(), local_cau(model, start, forget, owners,
                                                        config).vector, atol=1e-6, rtol=1e-5)


def test_sample_index_splits_batches_into_each_nodes_own_order():
    index = SampleIndex({NODES[0]: {4: [3], 9: [5, 6]}, NODES[1]: {2: [4], 7: [3]}})
    assert index.owners == [2, 4, 7, 9, 9]
    assert index.rows[NODES[0]].tolist() == [1, 3, 4] and index.rows[NODES[1]].tolist() == [0, 2]
    assert index.split(np.array([4, 0])) == {NODES[0]: [2], NODES[1]: [0]}
    assert index.devices(NODES[0], [2]) == {9}


def _directory(data) -> SequenceDirectory:
    windows = data.windows()
    return SequenceDirectory({s: NODES[s % 2] for s in range(data.num_sessions)},
                             {s: int(p) for s, p in enumerate(data.part)},
                             {s: prediction_points(w) for s, w in enumerate(windows)},
                             data.num_items, data.max_len)


def _report(node, requests, lengths) -> RequestReport:
    sessions = sorted(requests)
    return RequestReport(node, np.array(sessions, dtype=np.int64),
                         np.array([len(requests[s]) for s in sessions], dtype=np.int64),
                         np.array([t for s in sessions for t in requests[s]], dtype=np.int64),
                         np.array([lengths[s] for s in sessions], dtype=np.int64))


def test_bad_request_reports_are_refused():
    data = toy_sessions(30)
    directory = _directory(data)
    train = [s for s in range(data.num_sessions) if data.part[s] == TRAIN]
    mine = [s for s in train if directory.node_of[s] == NODES[0]]
    requests = {s: p for s, p in sequence_requests(data, 0.5, 0).items() if s in mine}
    lengths = {s: len(data.session(s)) for s in range(data.num_sessions)}
    s = min(requests)
    assert _report(NODES[0], requests, lengths).problem(directory, set()) is None
    other = next(t for t in train if directory.node_of[t] == NODES[1])
    for bad, reason in (
            (_report(NODES[0], {**requests, other: [2]}, lengths), "not a training device"),
            (_report(NODES[0], {**requests, s: [1]}, lengths), "outside"),
            (_report(NODES[0], {**requests, s: [lengths[s]]}, lengths), "outside"),
            (_report(NODES[0], requests, {**lengths, s: 2}), "does not fit its |D_u|")):
        assert reason in bad.problem(directory, set())
    assert "already requested" in _report(NODES[0], requests, lengths).problem(directory, {s})


def test_request_log_is_written_on_receipt_and_marked_served_after(tmp_path):
    log = RequestLog(tmp_path / "requests.json")
    log.receive(NODES[0], {4: [3], 2: [5]})
    saved = json.loads((tmp_path / "requests.json").read_text())
    assert [e["session"] for e in saved["requests"]] == [2, 4]
    assert (saved["received"], saved["served"]) == (2, 0)
    assert all(e["served_by"] is None and e["node"] == NODES[0] for e in saved["requests"])
    log.mark_served("cau-local")
    saved = json.loads((tmp_path / "requests.json").read_text())
    assert (saved["received"], saved["served"]) == (2, 2)
    assert {e["served_by"] for e in saved["requests"]} == {"cau-local"}


@pytest.mark.parametrize("setting, message", [
    ({"seq-unlearning": "nope"}, "unknown seq-unlearning"),
    ({"seq-cau-batch-size": 0}, "seq-cau-batch-size must be >= 1"),
    ({"seq-cau-optimizer": "rmsprop"}, "unknown seq-cau-optimizer"),
    ({"seq-request-fraction": 0.0}, "seq-request-fraction"),
    ({"seq-cau-lr": 0}, "seq-cau-lr must be > 0"),
])
def test_bad_unlearning_settings_are_one_error(setting, message):
    assert sequence_unlearning(setting) is None  # without unlearn=true nothing is read
    with pytest.raises(FedShareError, match=message):
        sequence_unlearning({"unlearn": True, **setting})


def test_default_epochs_are_the_papers():
    settings = sequence_unlearning({"unlearn": True})
    assert settings.cau_config("sasrec", 0).epochs == 200
    assert settings.cau_config("gru4rec", 0).epochs == 100
    assert settings.cau_config("sasrec", 0).batch_size == 16
