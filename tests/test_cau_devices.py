"""CAU across devices and the unlearning methods of the CAU table (issue 17)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from synthetic import MAX_LEN, NUM_ITEMS, toy_sessions
from torch.nn.utils import parameters_to_vector

from fedshare.sequences.cau_devices import (
    cau_view,
    device_forget_sets,
    device_gradient_sums,
    joint_cau,
    joint_cau_by_devices,
    joint_traffic,
    local_cau,
    server_batch_gradients,
)
from fedshare.sequences.config import SequenceConfig
from fedshare.sequences.data import TRAIN
from fedshare.sequences.federated import load_vector, make_backbone, run_federated, train_with
from fedshare.sequences.requests import forget_set, remaining_data, sequence_requests
from fedshare.sequences.unlearning_methods import (
    CAU_VARIANTS,
    METHODS,
    CAUSettings,
    UnlearningCase,
    method_config,
    original_model,
    run_case,
    run_method,
)
from fedshare.unlearning.cau.difficulty import last_layer_gradient_difficulty
from fedshare.unlearning.cau.losses import reference_log_probs
from fedshare.unlearning.cau.metrics import u_score
from fedshare.unlearning.cau.unlearn import CAUConfig, CAUResult, cau_unlearn, task_gradients

torch.set_num_threads(1)


def _backbone(name: str = "sasrec", dropout: float = 0.0):
    torch.manual_seed(0)
    return make_backbone(name, NUM_ITEMS, MAX_LEN, dim=8, dropout=dropout)


def _forget(num_sessions: int = 40, fraction: float = 0.3):
    data = toy_sessions(num_sessions)
    requests = sequence_requests(data, fraction, seed=1)
    forget, owners = forget_set(data, requests)
    return data, requests, forget, owners


@pytest.mark.parametrize("backbone", ["sasrec", "gru4rec"])
def test_devices_gradient_sums_add_up_to_the_batch_gradients(backbone):
    """The joint form's claim: what the devices upload, summed by the server and divided by
    the batch size, is the batch-mean (g_u, g_n, g_KL) of the centralised algorithm."""
    model = _backbone(backbone)
    view = cau_view(model)
    _, _, forget, owners = _forget()
    params = [p for p in model.parameters() if p.requires_grad]
    # a reference that differs from the model, so that g_KL is not zero
    ref = torch.log_softmax(torch.randn(len(forget), NUM_ITEMS), dim=1)
    batch = np.arange(0, len(forget), 2)  # a batch spanning several devices
    model.eval()
    central, _ = task_gradients(view, forget.subset(batch.tolist()), ref[batch], params)
    sums, counts = [], []
    for device in device_forget_sets(forget, owners):
        mine = np.intersect1d(device.rows, batch)
        if len(mine):
            sums.append(device_gradient_sums(view, forget.subset(mine.tolist()), ref[mine],
                                             params))
            counts.append(len(mine))
    assert len(sums) > 1
    torch.testing.assert_close(server_batch_gradients(sums, counts), central, atol=1e-6,
                               rtol=1e-5)


def test_each_device_scores_its_own_samples_as_the_union_does():
    """Difficulty is a per-sample quantity: a device needs only its samples to report it."""
    model = _backbone()
    view = cau_view(model)
    _, _, forget, owners = _forget()
    ref = reference_log_probs(view, forget.prefixes)
    union = last_layer_gradient_difficulty(view, forget, ref)
    for device in device_forget_sets(forget, owners):
        mine = last_layer_gradient_difficulty(view, device.samples, ref[device.rows])
        torch.testing.assert_close(mine, union[device.rows], atol=1e-6, rtol=1e-5)


def test_devices_partition_the_union_in_its_order():
    _, requests, forget, owners = _forget()
    devices = device_forget_sets(forget, owners)
    assert [d.session for d in devices] == sorted(requests)
    rows = np.concatenate([d.rows for d in devices])
    assert sorted(rows.tolist()) == list(range(len(forget)))
    for d in devices:
        assert torch.equal(d.samples.forget, forget.forget[d.rows])


def test_joint_traffic_counted_by_hand():
    """Three devices owning samples {0}, {1, 2}, {3}; two hard epochs of batches [0, 1] and
    [2, 3]: every epoch each device scores (3 messages), and every step each device with a
    sample in the batch is asked once."""
    _, _, forget, _ = _forget()
    forget = forget.subset([0, 1, 2, 3])
    owners = [10, 11, 11, 12]
    devices = device_forget_sets(forget, owners)
    batches = [np.array([0, 1]), np.array([2, 3])] * 2
    result = CAUResult(batches=batches)
    p = 100
    traffic = joint_traffic(result, devices, p, CAUConfig(epochs=2, schedule="hard"))
    model = 4 * p
    scoring = 2 * 3  # two epochs x three devices
    steps = 2 * 4  # per epoch: batch [0, 1] -> devices 10 and 11; [2, 3] -> devices 11 and 12
    assert traffic.messages == scoring + steps
    assert traffic.bytes_down == scoring * model + steps * model + 8 * 4 * 2
    assert traffic.bytes_up == 2 * 4 * 4 + steps * (3 * model + 4)
    assert traffic.to_dict()["devices_online"] == 3
    random = joint_traffic(result, devices, p, CAUConfig(epochs=2, schedule="random"))
    assert random.messages == steps  # no curriculum, no scoring


def test_joint_cau_is_centralised_cau_on_the_union():
    model = _backbone()
    _, _, forget, owners = _forget()
    start = parameters_to_vector(model.parameters()).detach().clone()
    config = CAUConfig(epochs=2, batch_size=4, seed=3)
    done = joint_cau(model, start, forget, owners, config)
    assert torch.equal(parameters_to_vector(model.parameters()).detach(), start)  # untouched
    central = _backbone()
    cau_unlearn(cau_view(central), forget, config)
    torch.testing.assert_close(done.vector, parameters_to_vector(central.parameters()).detach())
    assert not torch.equal(done.vector, start)


def test_local_cau_averages_each_devices_own_run_weighted_by_its_samples():
    model = _backbone()
    _, _, forget, _ = _forget()
    forget = forget.subset([0, 1, 2])
    owners = [5, 5, 9]  # device 5 holds two samples, device 9 one
    start = parameters_to_vector(model.parameters()).detach().clone()
    config = CAUConfig(epochs=3, batch_size=2, seed=1)
    done = local_cau(model, start, forget, owners, config)
    alone = []
    for session, rows in ((5, [0, 1]), (9, [2])):
        m = _backbone()
        load_vector(m, start)
        cau_unlearn(cau_view(m), forget.subset(rows),
                    dataclasses.replace(config, seed=config.seed * 1_000_003 + session))
        alone.append(parameters_to_vector(m.parameters()).detach())
    torch.testing.assert_close(done.vector, (2 * alone[0] + alone[1]) / 3, atol=1e-6, rtol=1e-5)
    assert done.traffic.messages == 2 and done.traffic.to_dict()["devices_online"] == 2


def test_method_configs_are_the_named_ablations_and_variants():
    base = CAUSettings().base("sasrec", 0)
    assert base.epochs == 200 and base.batch_size == 16
    assert CAUSettings().base("gru4rec", 0).epochs == 100
    assert method_config("ga", base).weights == "ga"
    assert method_config("wo-ps", base).weights == "equal"
    assert method_config("wo-cu", base).schedule == "random"
    seen = {(method_config(m, base).difficulty, method_config(m, base).schedule)
            for m in CAU_VARIANTS}
    assert seen == {(d, s) for d in ("gradient", "embedding") for s in ("hard", "soft")}
    with pytest.raises(ValueError):
        method_config("retrain", base)


def test_federated_traffic_counts_one_message_per_trained_device():
    data = toy_sessions()
    result = run_federated(data, _backbone(), rounds=3, fraction=0.5, seed=0, eval_every=3,
                           dim=8)
    p = sum(q.numel() for q in result.model.parameters())
    trained = int(result.log["num-users"].sum())
    assert result.traffic.messages == trained
    assert result.traffic.bytes_down == trained * 4 * p
    assert result.traffic.bytes_up == trained * (4 * p + 4)
    assert set(result.traffic.devices) <= set(np.flatnonzero(data.part == TRAIN).tolist())


@pytest.fixture(scope="module")
def case() -> UnlearningCase:
    data = toy_sessions(60)
    fed = SequenceConfig(rounds=4, fraction=0.5, eval_every=2, dim=8, local_epochs=1, lr=0.5,
                         server_lr=0.05)
    return UnlearningCase(data, sequence_requests(data, 0.2, 0), original_model(data, fed, 0),
                          fed, CAUSettings(epochs=2, batch_size=4, continued_rounds=2), 0)


def test_every_method_runs_and_reports_consistent_metrics(case):
    rows = run_case(case)
    assert [r["method"] for r in rows] == list(METHODS)
    for row in rows:
        for name in ("recall@10", "ndcg@10", "hit_u@1", "hit_u@5", "hit_u_full@1"):
            assert 0.0 <= row[name] <= 1.0
        assert row["hit_u@1"] <= row["hit_u@5"]
        assert row["u_score"] == pytest.approx(u_score(row["recall@10"], row["hit_u@1"]))
    by = {r["method"]: r for r in rows}
    assert by["original"]["seconds"] == 0 and by["original"]["client_messages"] == 0
    assert by["cau-local"]["client_messages"] == len(case.requests)
    assert all(by[m]["seconds"] > 0 for m in METHODS if m != "original")


def test_retrain_is_federated_training_from_scratch_on_the_remaining_sessions(case):
    outcome = run_method(case, "retrain")
    again = train_with(case.fed, remaining_data(case.data, case.requests), seed=case.seed)
    torch.testing.assert_close(outcome.vector, parameters_to_vector(again.model.parameters()))
    # the Original's training saw the forgotten items, Retrain's did not
    assert not torch.equal(outcome.vector, case.start)


@pytest.mark.parametrize("difficulty,sched", [("gradient", "hard"), ("embedding", "soft"),
                                              ("gradient", "random")])
def test_joint_cau_message_by_message_equals_the_vectorised_run(difficulty, sched):
    """Devices that see only their own samples, a server that schedules from their scores and
    steps from their gradient sums: the same model as centralised CAU on the union (dropout 0,
    so one batch forward and the devices' forwards compute the same thing). SGD: with Adam, a
    coordinate whose gradient is 0 in one run and float rounding (~1e-9) in the other moves by
    0 in one and by ~lr in the other (Adam's step is about lr * sign(g)), which is numerics."""
    model = _backbone()
    _, _, forget, owners = _forget()
    start = parameters_to_vector(model.parameters()).detach().clone()
    config = CAUConfig(epochs=2, batch_size=4, seed=2, difficulty=difficulty, schedule=sched,
                       optimizer="sgd", lr=0.5)
    vectorised = joint_cau(model, start, forget, owners, config)
    by_devices = joint_cau_by_devices(model, start, forget, owners, config)
    assert [b.tolist() for b in by_devices.result.batches] == \
        [b.tolist() for b in vectorised.result.batches]
    np.testing.assert_allclose(np.array(by_devices.result.weights),
                               np.array(vectorised.result.weights), atol=1e-5)
    torch.testing.assert_close(by_devices.vector, vectorised.vector, atol=1e-5, rtol=1e-4)
    assert by_devices.traffic.to_dict() == vectorised.traffic.to_dict()
