"""Sequence data, backbones, training and next-item metrics on tiny hand-made examples."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from fedshare.data.interactions import Interactions
from fedshare.errors import FedShareError
from fedshare.sequences.data import (
    TEST,
    TRAIN,
    VALID,
    SequenceData,
    build_sequences,
    core_filter,
    pad_sessions,
    split_sessions,
)
from fedshare.sequences.evaluate import evaluate, ranks
from fedshare.sequences.models import GRU4Rec, SASRec, SequenceModel
from fedshare.sequences.train import next_item_loss, train_central, train_epoch


def _interactions(rows: list[tuple[int, int, int]], num_users: int, num_items: int
                  ) -> Interactions:
    frame = pd.DataFrame(rows, columns=["user", "item", "timestamp"]).astype("int64")
    return Interactions(frame, num_users, num_items)


# ----------------------------------------------------------------------------- data
def test_core_filter_iterates_until_every_user_and_item_has_enough():
    # u0, u1: {A, B}; u2: {A, C}. With k = 2, pass 1 drops C (1 row); then u2 holds one row and
    # goes in pass 2. A single pass would have kept u2's A.
    frame = pd.DataFrame({"user": [0, 0, 1, 1, 2, 2], "item": [0, 1, 0, 1, 0, 2],
                          "timestamp": [0] * 6})
    kept = core_filter(frame, 2)
    assert sorted(zip(kept["user"], kept["item"], strict=True)) == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_sessions_sorted_by_time_ties_in_input_order_and_items_remapped_from_one():
    rows = [(0, 7, 5), (0, 3, 1), (0, 5, 5), (1, 5, 2), (1, 7, 1), (1, 3, 3)]
    data = build_sequences(_interactions(rows, 2, 9), "toy", min_count=1, max_len=2)
    assert data.num_items == 3 and list(data.item_ids) == [3, 5, 7]  # 3 -> 1, 5 -> 2, 7 -> 3
    assert [list(s) for s in data.sessions()] == [[1, 3, 2], [3, 2, 1]]
    assert list(data.users) == [0, 1]
    assert data.windows().tolist() == [[1, 3, 2], [3, 2, 1]]  # max_len + 1 = 3 items


def test_five_core_on_build():
    rows = [(u, i, i) for u in range(5) for i in range(5)] + [(5, 0, 0), (0, 8, 9)]
    data = build_sequences(_interactions(rows, 6, 9), "toy")
    assert data.num_sessions == 5 and data.num_items == 5
    assert all(len(s) == 5 for s in data.sessions())


def test_split_is_by_session_seeded_and_8_1_1():
    part = split_sessions(10, (0.8, 0.1, 0.1), seed=3)
    assert [(part == p).sum() for p in (TRAIN, VALID, TEST)] == [8, 1, 1]
    assert np.array_equal(part, split_sessions(10, (0.8, 0.1, 0.1), seed=3))
    assert any(not np.array_equal(part, split_sessions(10, (0.8, 0.1, 0.1), seed=s))
               for s in range(4, 10))
    with pytest.raises(FedShareError, match="fractions"):
        split_sessions(10, (0.8, 0.1, 0.2), seed=0)


def test_padding_and_truncation_keep_the_last_items():
    assert pad_sessions([np.array([1, 2, 3]), np.array([4]), np.array([], np.int64)], 2
                        ).tolist() == [[2, 3], [0, 4], [0, 0]]


def test_bad_input_is_one_line_error():
    rows = [(0, 0, 0), (0, 1, 1)]
    with pytest.raises(FedShareError, match="no interactions are left"):
        build_sequences(_interactions(rows, 1, 2), "toy")
    with pytest.raises(FedShareError, match="max_len"):
        build_sequences(_interactions(rows, 1, 2), "toy", min_count=1, max_len=0)


def _toy_data(num_sessions: int = 40, num_items: int = 12, length: int = 8,
              max_len: int = 6) -> SequenceData:
    """Sessions that walk the items cyclically from a random start: a learnable pattern."""
    rng = np.random.default_rng(0)
    rows = []
    for u in range(num_sessions):
        start = int(rng.integers(num_items))
        rows += [(u, (start + t) % num_items, t) for t in range(length)]
    return build_sequences(_interactions(rows, num_sessions, num_items), "toy", min_count=1,
                           max_len=max_len)


def test_save_load_round_trip_and_fingerprint(tmp_path):
    data = _toy_data()
    folder = data.save(tmp_path / "seq")
    loaded = SequenceData.load(folder)
    assert loaded.fingerprint() == data.fingerprint()
    assert np.array_equal(loaded.windows(TEST), data.windows(TEST))
    assert (loaded.max_len, loaded.split_fractions) == (data.max_len, data.split_fractions)
    other = build_sequences(_interactions([(u, i, i) for u in range(3) for i in range(3)], 3, 3),
                            "toy", min_count=1)
    assert other.fingerprint() != data.fingerprint()
    with pytest.raises(FedShareError, match="already exists"):
        data.save(folder)
    with pytest.raises(FedShareError, match="not a sequence-data folder"):
        SequenceData.load(tmp_path / "missing")
    np.savez_compressed(folder / "sessions.npz", indptr=data.indptr, items=data.items[::-1],
                        part=data.part, users=data.users, item_ids=data.item_ids)
    with pytest.raises(FedShareError, match="fingerprint"):
        SequenceData.load(folder)


# ----------------------------------------------------------------------------- backbones
BACKBONES = [lambda n: SASRec(n, max_len=6, dim=8, heads=2),
             lambda n: GRU4Rec(n, dim=8)]


@pytest.mark.parametrize("make", BACKBONES, ids=["sasrec", "gru4rec"])
def test_backbone_shape_causality_and_padding(make):
    torch.manual_seed(0)
    model = make(9).eval()
    seq = torch.tensor([[0, 0, 3, 5, 7, 2], [1, 2, 3, 4, 5, 6]])
    hidden = model(seq)
    assert hidden.shape == (2, 6, 8)
    assert torch.all(hidden[0, :2] == 0)  # pad positions carry nothing
    later = seq.clone()
    later[:, 4:] = torch.tensor([[9, 1], [9, 8]])
    assert torch.allclose(model(later)[:, :4], hidden[:, :4], atol=1e-6)  # causal
    assert not torch.allclose(model(later)[:, 4:], hidden[:, 4:])
    shifted = torch.tensor([[0, 0, 0, 0, 3, 5]])  # the prefix [3, 5] alone, more padding
    assert torch.allclose(model(shifted)[0, 4:], hidden[0, 2:4], atol=1e-5)
    logits = model.scores(hidden)
    assert logits.shape == (2, 6, 10) and torch.all(logits[..., 0] == float("-inf"))
    assert torch.isfinite(logits[..., 1:]).all()
    names = dict(model.named_parameters())
    assert all(name in names for name in model.last_layer)
    assert model.item_embeddings.shape == (10, 8)
    assert model.output_weight().shape == (10, 8)


# ----------------------------------------------------------------------------- metrics
class _FixedScores(SequenceModel):
    """Scores that depend only on the last item: ``scores(h)[i] = table[last item][i]``."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table
        self.num_items, self.last_layer = table.shape[0] - 1, ()

    def output_weight(self) -> torch.Tensor:
        return torch.eye(self.table.shape[0])

    def forward(self, sequences: torch.Tensor) -> torch.Tensor:
        return self.table[sequences]


def test_metrics_by_hand_on_three_items():
    table = torch.tensor([[0.0, 0, 0, 0], [0, 3, 1, 2], [0, 1, 2, 3], [0, 0, 0, 0]])
    model = _FixedScores(table)
    windows = torch.tensor([[0, 1, 2, 3]])  # predict 2 after [1] (rank 2), 3 after [1, 2] (rank 0)
    assert ranks(model, windows).tolist() == [2, 0]
    scores = evaluate(model, windows, ks=(1, 2, 3))
    assert scores["recall@1"] == scores["recall@2"] == 0.5 and scores["recall@3"] == 1.0
    assert scores["ndcg@1"] == 0.5
    assert scores["ndcg@3"] == pytest.approx((1 / math.log2(4) + 1) / 2)


# ----------------------------------------------------------------------------- training
@pytest.mark.parametrize("make", BACKBONES, ids=["sasrec", "gru4rec"])
def test_training_lowers_the_loss_and_is_seeded(make):
    data = _toy_data()
    windows = torch.from_numpy(data.windows(TRAIN))

    def run() -> tuple[float, float]:
        torch.manual_seed(0)
        model = make(data.num_items)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            before = float(next_item_loss(model.eval(), windows))
        for _ in range(12):
            train_epoch(model, windows, optimizer, batch_size=16, generator=generator)
        with torch.no_grad():
            return before, float(next_item_loss(model.eval(), windows))

    before, after = run()
    assert after < 0.75 * before
    assert run() == (before, after)


def test_central_trainer_early_stops_and_keeps_the_best():
    data = _toy_data()
    torch.manual_seed(0)
    model = GRU4Rec(data.num_items, dim=8)
    result = train_central(model, data, epochs=30, lr=1e-2, batch_size=8, patience=3)
    assert len(result.losses) <= 30 and result.losses[-1] < result.losses[0]
    best = result.valid[result.best_epoch]["recall@10"]
    assert best == max(v["recall@10"] for v in result.valid)
    assert evaluate(model, torch.from_numpy(data.windows(VALID)))["recall@10"] == best
