"""Federated sequence training in process, and unlearning requests on sessions (issue 17)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from synthetic import MAX_LEN, NUM_ITEMS, toy_sessions

from fedshare.errors import FedShareError
from fedshare.federated.aggregation import aggregate
from fedshare.sequences.data import TRAIN, SequenceData
from fedshare.sequences.federated import (
    LocalConfig,
    SequenceCohort,
    SequenceServer,
    device_seed,
    make_backbone,
    run_federated,
    split_cohorts,
    train_device,
)
from fedshare.sequences.requests import (
    forget_set,
    position_range,
    remaining_data,
    sequence_requests,
)
from fedshare.sequences.train import next_item_loss

torch.set_num_threads(1)

_data = toy_sessions


def _model(backbone: str):
    torch.manual_seed(0)
    return make_backbone(backbone, NUM_ITEMS, MAX_LEN, dim=8)


@pytest.mark.parametrize("backbone", ["sasrec", "gru4rec"])
def test_cohorts_of_any_size_give_the_same_fedavg_model(backbone):
    data = _data()
    model = _model(backbone)
    start = SequenceServer(model).table
    local = LocalConfig(epochs=2, lr=1e-2)
    train = np.flatnonzero(data.part == TRAIN)
    sampled = train[::2]
    results = []
    for nodes in (1, 3, data.num_sessions):
        cohorts = [SequenceCohort(data, part, model, local, seed=5)
                   for part in split_cohorts(np.arange(data.num_sessions), nodes)]
        updates = [c.train(start, sampled, round_=4) for c in cohorts]
        assert sum(u.num_users for u in updates) == len(sampled)
        results.append(aggregate(start, updates))
    assert not torch.allclose(results[0], start)
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=0, atol=1e-6)


def test_weighted_aggregation_of_two_devices_by_hand():
    # sessions of 3 and 12 items: windows of 3 and max_len + 1 = 9 items -> |D_u| = 2 and 8
    items = np.array([1, 2, 3, *range(1, 13)], dtype=np.int64)
    data = SequenceData("toy", np.array([0, 3, 15]), items, np.array([TRAIN, TRAIN], np.int8),
                        np.arange(2), np.arange(NUM_ITEMS), MAX_LEN, 0, (1.0, 0.0, 0.0), 1)
    model = _model("sasrec")
    server = SequenceServer(model)
    start = server.table.clone()
    local = LocalConfig(epochs=1, lr=1e-2)
    cohort = SequenceCohort(data, [0, 1], model, local, seed=3)
    assert cohort.weights.tolist() == [2, 8]
    reply = cohort.train(start, np.array([0, 1]), round_=1)
    assert reply.weight == 10 and reply.num_users == 2
    v = [train_device(_model("sasrec"), start, cohort.windows[k], local,
                      device_seed(3, 1, k)) for k in (0, 1)]
    expected = (2 * v[0] + 8 * v[1]) / 10
    torch.testing.assert_close(reply.table, expected, rtol=0, atol=1e-6)
    table = server.finish_round(server.aggregate([reply]), 1)
    torch.testing.assert_close(table, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(v[0], v[1])
    # a node with no sampled device replies the start vector with weight 0
    empty = cohort.train(start, np.array([], dtype=np.int64), round_=2)
    assert empty.weight == 0 and torch.equal(empty.table, start)


def test_three_federated_rounds_lower_the_training_loss():
    data = _data()
    model = _model("gru4rec")
    windows = torch.from_numpy(data.windows(TRAIN))
    model.eval()
    with torch.no_grad():
        before = float(next_item_loss(model, windows))
    result = run_federated(data, model, rounds=3, fraction=0.5, local_epochs=2, lr=1e-2,
                           seed=0, eval_every=10, nodes=3)
    result.model.eval()
    with torch.no_grad():
        after = float(next_item_loss(result.model, windows))
    assert after < before
    assert result.best_round == 3 and len(result.log) == 3
    assert result.log["num-users"].tolist() == [12, 12, 12]  # ceil(0.5 * 24)
    assert set(result.test) == {"recall@10", "ndcg@10", "recall@20", "ndcg@20"}


def test_requests_are_seeded_ten_percent_one_valid_position_each():
    data = _data(num_sessions=50)
    train = np.flatnonzero(data.part == TRAIN)
    requests = sequence_requests(data, 0.1, seed=1)
    assert requests == sequence_requests(data, 0.1, seed=1)
    assert requests != sequence_requests(data, 0.1, seed=2)
    assert len(requests) == round(0.1 * len(train)) == 4
    for s, positions in requests.items():
        assert s in train and len(positions) == 1
        n, t = len(data.session(s)), positions[0]
        assert 2 <= max(math.ceil(n / 2), n - MAX_LEN + 1) <= t <= n - 1
        assert position_range(n, MAX_LEN) == (max(2, math.ceil(n / 2), n - MAX_LEN + 1), n - 1)
    rest = remaining_data(data, requests)
    for s in range(data.num_sessions):
        session = data.session(s).tolist()
        if s in requests:
            t = requests[s][0]
            assert rest.session(s).tolist() == session[:t - 1] + session[t:]
        else:
            assert rest.session(s).tolist() == session
    samples, owners = forget_set(data, requests)
    assert owners == sorted(requests)
    for k, s in enumerate(owners):
        t = requests[s][0]
        assert int(samples.forget[k]) == data.session(s)[t - 1]


def test_fedadam_first_step_is_adams_by_hand():
    """FedAdam's first server step: Adam on the pseudo-gradient ``global - avg`` moves each
    coordinate by lr * delta / (|delta| + eps) (bias-corrected first step)."""
    model = torch.nn.Linear(3, 2)
    server = SequenceServer(model, "adam", server_lr=0.1)
    start = server.table.clone()
    delta = torch.linspace(-2.0, 2.0, len(start))
    new = server.finish_round(start + delta, 1)
    assert torch.allclose(new, start + 0.1 * delta / (delta.abs() + 1e-3), atol=1e-6)
    assert torch.equal(torch.nn.utils.parameters_to_vector(model.parameters()), new)
    plain = SequenceServer(torch.nn.Linear(3, 2))  # FedAvg: the average itself
    before = plain.table.clone()
    assert torch.equal(plain.finish_round(before + delta, 1), before + delta)


def test_an_unknown_server_optimizer_is_refused():
    with pytest.raises(FedShareError, match="server optimizer"):
        SequenceServer(torch.nn.Linear(3, 2), "sgd-momentum")


def test_fedsgd_with_fedadam_betas_and_eps_is_centralised_adam_on_the_sampled_batch():
    """One local SGD step of lr 1, |D_u|-weighted, is the minibatch gradient of the sampled
    windows; with betas (0.9, 0.999) and eps 1e-8 the server's Adam is then torch's Adam on that
    minibatch (no dropout; float64 so that eps 1e-8 is far above rounding)."""
    data = _data()
    torch.manual_seed(0)
    model = make_backbone("sasrec", NUM_ITEMS, MAX_LEN, dim=8, dropout=0.0).double()
    reference = copy.deepcopy(model)
    server = SequenceServer(model, "adam", server_lr=0.01, server_betas=(0.9, 0.999),
                            server_eps=1e-8)
    cohort = SequenceCohort(data, np.arange(data.num_sessions), model,
                            LocalConfig(epochs=1, lr=1.0, optimizer="sgd"), seed=0)
    adam = torch.optim.Adam(reference.parameters(), lr=0.01)
    start = server.table.clone()
    train = np.flatnonzero(data.part == TRAIN)
    for round_, sampled in enumerate((train[::2], train[1::2], train[::3]), start=1):
        reply = cohort.train(server.table, sampled, round_)
        server.finish_round(server.aggregate([reply]), round_)
        batch = torch.from_numpy(data.windows()[np.sort(sampled)])
        adam.zero_grad()
        next_item_loss(reference, batch).backward()
        adam.step()
    expected = torch.nn.utils.parameters_to_vector(reference.parameters()).detach()
    assert (server.table - start).abs().max() > 1e-2  # three real steps
    torch.testing.assert_close(server.table, expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("backbone", ["sasrec", "gru4rec"])
def test_batched_devices_give_the_per_device_fedavg_update(backbone):
    """seq-batched: one SGD step on the batch of a node's sampled windows is the |D_u|-weighted
    mean of the devices' one-step vectors (no dropout, float64: equal to rounding)."""
    data = _data()
    torch.manual_seed(1)
    model = make_backbone(backbone, NUM_ITEMS, MAX_LEN, dim=8, dropout=0.0).double()
    start = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    train = np.flatnonzero(data.part == TRAIN)
    replies = [SequenceCohort(data, np.arange(data.num_sessions), model,
                              LocalConfig(epochs=1, lr=1.0, optimizer="sgd", batched=b),
                              seed=0).train(start, train[::2], 1) for b in (False, True)]
    assert replies[0].weight == replies[1].weight and replies[1].num_users == len(train[::2])
    assert (replies[0].table - start).abs().max() > 1e-3
    torch.testing.assert_close(replies[1].table, replies[0].table, rtol=0, atol=1e-10)


def test_batched_devices_need_one_sgd_step():
    from fedshare.sequences.config import SequenceConfig

    with pytest.raises(FedShareError, match="seq-batched"):
        SequenceConfig(batched=True, optimizer="adam")
    with pytest.raises(FedShareError, match="seq-batched"):
        SequenceConfig(batched=True, local_epochs=2)
    assert SequenceConfig.from_run_config({"seq-batched": True}).batched
