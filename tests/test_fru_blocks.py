"""FRU building blocks: importance selection, the client store's bytes, the calibration step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedshare.models.local import LocalTrainConfig, UserBatch, train_local
from fedshare.storage_ledger import StorageLedger, client
from fedshare.unlearning.fru import (
    KIND,
    FruSettings,
    expected_bytes,
    select_important_rows,
    store_round,
    stored_rows,
)
from fedshare.unlearning.replay import calibrated_step


def test_selection_keeps_the_largest_rows_by_hand():
    items = torch.tensor([4, 7, 9, 2])
    deltas = torch.tensor([[3.0, 4.0], [0.0, 1.0], [6.0, 8.0], [1.0, 0.0]])  # norms 5, 1, 10, 1
    kept, rows = select_important_rows(items, deltas, 0.5)
    assert kept.tolist() == [4, 9]
    assert torch.equal(rows, deltas[[0, 2]])
    kept, _ = select_important_rows(items, deltas, 0.75)  # ceil(3): the tie 7/2 goes to id 2
    assert kept.tolist() == [4, 9, 2]
    with pytest.raises(ValueError):
        select_important_rows(items, deltas, 0.0)


def test_calibration_on_a_tiny_problem_computed_by_hand():
    old = torch.tensor([[3.0, 0.0], [0.0, 4.0]])  # ||old|| = 5
    new = torch.tensor([[0.0, 1.0], [0.0, 0.0]])  # direction (0, 1, 0, 0)
    assert torch.allclose(calibrated_step(old, new), torch.tensor([[0.0, 5.0], [0.0, 0.0]]))
    assert torch.equal(calibrated_step(old, torch.zeros(2, 2)), torch.zeros(2, 2))


def test_client_stores_match_the_analytic_formula():
    rng = np.random.default_rng(0)
    num_items, dim, alpha = 30, 8, 0.5
    users = [0, 1, 2]
    train = [rng.choice(num_items, n, replace=False) for n in (5, 3, 6)]
    batch = UserBatch.from_lists(users, train, train, num_items)
    table = torch.randn(num_items, dim)
    ledger = StorageLedger()
    stores: dict = {}
    touched: dict[int, list[int]] = {u: [] for u in users}
    for round_ in (1, 2):
        update = train_local(batch, table, torch.randn(3, dim), LocalTrainConfig(epochs=2),
                             seed=0, round_=round_)
        for b, user in enumerate(users):
            touched[user].append(int((update.row_user == b).sum()))
        rows = stored_rows(update, table, train, train, FruSettings(alpha, sampling="learning"),
                           0, round_)
        store_round(stores, rows, round_, ledger)
    for user in users:
        assert ledger.held(client(user), KIND) == expected_bytes(touched[user], alpha, dim,
                                                                 num_items)
        assert stores[user].nbytes == ledger.held(client(user), KIND)
        assert stores[user].get(1)[0].dtype == torch.int16  # 30 items: 2-byte ids
    assert ledger.client_held() == sum(expected_bytes(t, alpha, dim, num_items)
                                       for t in touched.values())
    stores[1].drop()
    assert ledger.held(client(1), KIND) == 0


def test_kept_rows_round_up_exactly():
    from fedshare.unlearning.fru import kept_rows

    assert kept_rows(0.55, 100) == 55  # float arithmetic gives 55.000000000000007 -> 56
    assert kept_rows(0.5, 7) == 4 and kept_rows(1.0, 3) == 3 and kept_rows(0.3, 0) == 0
