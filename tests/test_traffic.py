"""What each unlearning method costs on the wire, counted in process, against answers computed
from the sampling schedule and the recorded histories (that the sizes equal the protocol's
encodings is checked in ``test_protocol_and_round.py``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from synthetic import tiny_prepared

from fedshare.federated.config import FederatedConfig
from fedshare.federated.rounds import sample_users
from fedshare.federated.traffic import (
    Traffic,
    stored_rows_bytes,
    table_bytes,
    update_bytes,
)
from fedshare.unlearning.config import UnlearningConfig
from fedshare.unlearning.phase import learn, unlearn
from fedshare.unlearning.replay import ReplayConfig

NI, D = 40, 8
CONFIG = FederatedConfig(rounds=4, fraction=0.5, dim=D, server_steps=2, seed=0, snapshots=2,
                         eval_every=4)
UNLEARNING = UnlearningConfig(rounds=3, steps=2)
REPLAY = ReplayConfig(interval=2)


def test_traffic_counts_devices_once():
    traffic = Traffic()
    traffic.per_device([1, 2], 10, 3)
    traffic.add([2, 5], 0, 7, messages=0)
    assert traffic.to_dict() == {"client_messages": 2, "bytes_down": 20, "bytes_up": 13,
                                 "devices_online": 3}


@pytest.fixture(scope="module")
def learned():
    torch.set_num_threads(1)
    data = tiny_prepared(num_items=NI)
    return data, learn(data, CONFIG, record=True)


def outcome(learned, method):
    data, federation = learned
    return unlearn(federation, data, method, UNLEARNING, CONFIG.rounds, REPLAY)


def sampled(candidates, rounds):
    return [sample_users(candidates, CONFIG.fraction, CONFIG.seed, r).tolist() for r in rounds]


@pytest.mark.parametrize("method", ["no-unlearning", "wo-remaining-fl"])
def test_methods_without_clients_send_nothing(learned, method):
    assert outcome(learned, method).traffic.to_dict() == {
        "client_messages": 0, "bytes_down": 0, "bytes_up": 0, "devices_online": 0}


def expect(traffic, rounds_users, down, up, extra_up=0):
    messages = sum(len(users) for users in rounds_users)
    assert traffic.messages == messages
    assert traffic.devices == {u for users in rounds_users for u in users}
    assert traffic.bytes_down == messages * down
    assert traffic.bytes_up == messages * up + extra_up


def test_fedshare_asks_the_users_of_its_remaining_data_rounds(learned):
    _, federation = learned
    rounds = range(CONFIG.rounds + 1, CONFIG.rounds + UNLEARNING.rounds + 1)
    expect(outcome(learned, "fedshare").traffic, sampled(federation.candidates, rounds),
           table_bytes(NI, D), update_bytes(NI, D))


def test_retrain_restarts_every_device_then_learns_again(learned):
    data, _ = learned
    result = outcome(learned, "retrain")
    rounds = sampled(result.federation.candidates, range(1, CONFIG.rounds + 1))
    trained = sum(map(len, rounds))
    traffic = result.traffic  # one restart notice per device (no arrays), then the rounds
    assert traffic.messages == data.num_users + trained
    assert traffic.devices == set(range(data.num_users))
    assert traffic.bytes_down == trained * table_bytes(NI, D)
    assert traffic.bytes_up == trained * update_bytes(NI, D)


def test_fru_asks_every_participant_of_every_round_for_its_stored_rows(learned):
    _, federation = learned
    history = federation.histories["fru"]
    rounds = history.replayed_rounds()
    participants = [history.rounds.get(r)[0].tolist() for r in rounds]
    stored = sum(stored_rows_bytes(len(history.clients_[u].get(r)[0])
                                   if u in history.clients_ and history.clients_[u].get(r)
                                   is not None else 0, D)
                 for r, users in zip(rounds, participants, strict=True) for u in users)
    traffic = outcome(learned, "fru").traffic
    # round 1 sends no table and trains nothing: only the stored rows come back
    first = len(participants[0])
    assert traffic.messages == sum(map(len, participants))
    assert traffic.devices == {u for users in participants for u in users}
    assert traffic.bytes_down == (traffic.messages - first) * table_bytes(NI, D)
    assert traffic.bytes_up == (traffic.messages - first) * update_bytes(NI, D) + stored


def test_cufru_asks_only_the_participants_of_its_calibration_rounds(learned):
    _, federation = learned
    station = federation.histories["cufru"]
    calibrated = [station.rounds.get(r)[0].tolist() for r in station.replayed_rounds()
                  if r % REPLAY.interval == 0 and station.rounds.get(r) is not None]
    assert calibrated  # the fixture has a calibration round
    expect(outcome(learned, "cufru").traffic, calibrated, table_bytes(NI, D),
           update_bytes(NI, D))
    assert np.isfinite(outcome(learned, "cufru").federation.server.table.numpy()).all()
