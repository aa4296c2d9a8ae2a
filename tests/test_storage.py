"""The storage ledger: bytes reported by stores equal what they hold and the analytic formula."""

from __future__ import annotations

import pytest
import torch
from synthetic import tiny_prepared

from fedshare.federated.config import FederatedConfig
from fedshare.storage_ledger import SERVER, SnapshotStore, StorageLedger, client, tensor_bytes
from fedshare.unlearning.config import UnlearningConfig
from fedshare.unlearning.phase import learn, unlearn


def test_tensor_bytes():
    assert tensor_bytes(torch.zeros(3, 4), torch.zeros(5, dtype=torch.float64)) == 48 + 40
    assert tensor_bytes() == 0


def test_ledger_tracks_current_and_peak_bytes():
    ledger = StorageLedger()
    ledger.set(SERVER, "snapshots", 100)
    ledger.set(client(3), "updates", 40)
    ledger.set(client(4), "updates", 60)
    ledger.set(SERVER, "snapshots", 30)
    assert ledger.held() == 130
    assert ledger.held(owner=SERVER) == 30 and ledger.peak(owner=SERVER) == 100
    assert ledger.held(kind="updates") == 100 and ledger.client_held() == 100
    frame = ledger.frame()
    assert frame.set_index(["owner", "kind"]).loc[(SERVER, "snapshots"), "peak_bytes"] == 100
    with pytest.raises(ValueError):
        ledger.set(SERVER, "snapshots", -1)


def test_snapshot_store_keeps_the_last_m_tables_and_reports_them():
    ledger = StorageLedger()
    store = SnapshotStore(3, ledger)
    tables = [torch.full((7, 4), float(k)) for k in range(5)]
    for k, table in enumerate(tables, 1):
        store.append(table)
        assert ledger.held(SERVER, "snapshots") == min(k, 3) * 7 * 4 * 4 == store.nbytes
    assert [int(t[0, 0]) for t in store] == [2, 3, 4]
    tables[4].fill_(-1)  # the store holds copies
    assert store[-1][0, 0] == 4
    store.clear()
    assert len(store) == 0 and ledger.held() == 0 and ledger.peak() == 3 * 7 * 4 * 4


def test_server_snapshots_match_the_formula_through_learning_and_unlearning():
    data = tiny_prepared()
    config = FederatedConfig(rounds=4, eval_every=4, fraction=0.5, server_steps=2, snapshots=3,
                             dim=8, server_batch_size=64)
    learned = learn(data, config)
    formula = config.snapshots * data.num_items * config.dim * 4  # M * I * d * float32
    assert learned.server.ledger.held(SERVER, "snapshots") == formula
    outcome = unlearn(learned, data, "fedshare", UnlearningConfig(rounds=2, steps=2),
                      config.rounds)
    assert outcome.kept_bytes == formula
    ledger = outcome.federation.server.ledger
    assert ledger.held(SERVER, "snapshots") == data.num_items * config.dim * 4  # one table
    assert ledger.peak(SERVER, "snapshots") == formula
    assert learned.server.ledger.held(SERVER, "snapshots") == formula  # the copy is separate
