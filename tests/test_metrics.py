"""Top-K metrics against a brute-force numpy reference and hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedshare.data.interactions import Interactions
from fedshare.metrics import embedding_scorer, evaluate_topk, topk_metrics, topk_sums

KS = (1, 3, 5, 10, 20)


def _reference(scores: np.ndarray, heldout: list[set[int]], exclude: list[set[int]],
               ks: tuple[int, ...]) -> tuple[dict[str, float], int]:
    """Per-user loops: mask, argsort descending, then HR / Recall / NDCG; return sums and count."""
    sums = {f"{m}@{k}": 0.0 for k in ks for m in ("hr", "recall", "ndcg")}
    n_users = 0
    for u, relevant in enumerate(heldout):
        if not relevant:
            continue
        n_users += 1
        candidates = [i for i in range(scores.shape[1]) if i not in exclude[u]]
        ranking = sorted(candidates, key=lambda i: -scores[u, i])
        for k in ks:
            top = ranking[:k]
            hit_ranks = [r for r, i in enumerate(top) if i in relevant]
            dcg = sum(1.0 / math.log2(r + 2) for r in hit_ranks)
            idcg = sum(1.0 / math.log2(r + 2) for r in range(min(k, len(relevant))))
            sums[f"hr@{k}"] += float(len(hit_ranks) > 0)
            sums[f"recall@{k}"] += len(hit_ranks) / len(relevant)
            sums[f"ndcg@{k}"] += dcg / idcg
    return sums, n_users


def _random_case(seed: int, num_users: int = 50, num_items: int = 40):
    """Random scores, disjoint train / held-out items; some users have no held-out item."""
    rng = np.random.default_rng(seed)
    scores = rng.standard_normal((num_users, num_items)).astype(np.float32)
    train_u, train_i, held_u, held_i = [], [], [], []
    heldout: list[set[int]] = []
    train: list[set[int]] = []
    for u in range(num_users):
        perm = rng.permutation(num_items)
        n_train = int(rng.integers(0, 15))
        n_held = 0 if u % 7 == 3 else int(rng.integers(1, 12))
        tr, he = perm[:n_train], perm[n_train:n_train + n_held]
        train.append(set(tr.tolist()))
        heldout.append(set(he.tolist()))
        train_u += [u] * len(tr)
        train_i += tr.tolist()
        held_u += [u] * len(he)
        held_i += he.tolist()
    train_x = Interactions.from_arrays(np.array(train_u), np.array(train_i), num_users, num_items)
    held_x = Interactions.from_arrays(np.array(held_u), np.array(held_i), num_users, num_items)
    return scores, train, heldout, train_x, held_x


def _table_scorer(scores: np.ndarray):
    table = torch.from_numpy(scores)
    return lambda users: table[users]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_evaluate_topk_matches_brute_force(seed):
    scores, train, heldout, train_x, held_x = _random_case(seed)
    assert any(not h for h in heldout)  # users without held-out items are part of the case
    expected_sums, expected_n = _reference(scores, heldout, train, KS)

    sums, n = topk_sums(_table_scorer(scores), held_x, [train_x], ks=KS)
    assert n == expected_n == sum(1 for h in heldout if h)
    assert set(sums) == set(expected_sums)
    for name, value in expected_sums.items():
        assert sums[name] == pytest.approx(value, abs=1e-4), name

    means = evaluate_topk(_table_scorer(scores), held_x, [train_x], ks=KS)
    for name, value in expected_sums.items():
        assert means[name] == pytest.approx(value / expected_n, abs=1e-5), name
        assert 0.0 <= means[name] <= 1.0


def test_chunk_size_does_not_change_results():
    scores, _, _, train_x, held_x = _random_case(5)
    big = evaluate_topk(_table_scorer(scores), held_x, [train_x], ks=KS, chunk_size=1024)
    small = evaluate_topk(_table_scorer(scores), held_x, [train_x], ks=KS, chunk_size=7)
    one = evaluate_topk(_table_scorer(scores), held_x, [train_x], ks=KS, chunk_size=1)
    for name in big:
        assert small[name] == pytest.approx(big[name], abs=1e-6)
        assert one[name] == pytest.approx(big[name], abs=1e-6)


def test_several_exclusion_sets_are_all_masked():
    """Test scoring masks training and validation items together."""
    scores, train, heldout, train_x, held_x = _random_case(7)
    rng = np.random.default_rng(99)
    valid: list[set[int]] = []
    vu, vi = [], []
    for u in range(scores.shape[0]):
        free = [i for i in range(scores.shape[1]) if i not in train[u] and i not in heldout[u]]
        pick = rng.choice(free, size=min(3, len(free)), replace=False).tolist()
        valid.append(set(pick))
        vu += [u] * len(pick)
        vi += pick
    valid_x = Interactions.from_arrays(np.array(vu), np.array(vi), *scores.shape)
    exclude = [t | v for t, v in zip(train, valid, strict=True)]
    expected_sums, n = _reference(scores, heldout, exclude, KS)
    got = evaluate_topk(_table_scorer(scores), held_x, [train_x, valid_x], ks=KS, chunk_size=9)
    for name, value in expected_sums.items():
        assert got[name] == pytest.approx(value / n, abs=1e-5), name


def test_users_argument_restricts_evaluation():
    scores, train, heldout, train_x, held_x = _random_case(3)
    chosen = np.array([0, 3, 10, 11, 24, 31, 49])  # 3, 10, 24, 31 have no held-out item
    only = [h if u in set(chosen.tolist()) else set() for u, h in enumerate(heldout)]
    expected_sums, expected_n = _reference(scores, only, train, KS)
    sums, n = topk_sums(_table_scorer(scores), held_x, [train_x], ks=KS, users=chosen,
                        chunk_size=2)
    assert n == expected_n == sum(1 for u in chosen if heldout[u])
    for name, value in expected_sums.items():
        assert sums[name] == pytest.approx(value, abs=1e-5), name


def test_tiny_case_by_hand():
    # 1 user, 5 items. Item 1 is a training item (highest score); items 0 and 3 are held out.
    # Ranking of the remaining items: 3 (0.8), 4 (0.5), 2 (0.3), 0 (0.1).
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.5]])
    train = Interactions.from_arrays(np.array([0]), np.array([1]), 1, 5)
    held = Interactions.from_arrays(np.array([0, 0]), np.array([3, 0]), 1, 5)
    got = evaluate_topk(lambda users: scores[users], held, [train], ks=(1, 2, 4))

    assert got["hr@2"] == pytest.approx(1.0)
    assert got["recall@2"] == pytest.approx(0.5)
    # one hit at rank 0; ideal: two hits at ranks 0 and 1
    assert got["ndcg@2"] == pytest.approx(1.0 / (1.0 + 1.0 / math.log2(3)), abs=1e-6)

    assert got["hr@1"] == pytest.approx(1.0)
    assert got["recall@1"] == pytest.approx(0.5)
    assert got["ndcg@1"] == pytest.approx(1.0)

    # K = 4: both held-out items, at ranks 0 and 3; ideal min(4, 2) = 2 hits
    assert got["hr@4"] == pytest.approx(1.0)
    assert got["recall@4"] == pytest.approx(1.0)
    expected = (1.0 + 1.0 / math.log2(5)) / (1.0 + 1.0 / math.log2(3))
    assert got["ndcg@4"] == pytest.approx(expected, abs=1e-6)


def test_training_items_never_count_even_when_top_scored():
    # Items 0 and 1 are training items with the top scores; item 4 (held out) scores lowest.
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    train = Interactions.from_arrays(np.array([0, 0]), np.array([0, 1]), 1, 5)
    held = Interactions.from_arrays(np.array([0]), np.array([4]), 1, 5)
    got = evaluate_topk(lambda users: scores[users], held, [train], ks=(2, 3))
    # top 2 of the candidates {2, 3, 4} is [2, 3]: no hit
    assert got["hr@2"] == 0.0
    assert got["recall@2"] == 0.0
    assert got["ndcg@2"] == 0.0
    # top 3 is [2, 3, 4]: the held-out item at rank 2
    assert got["hr@3"] == pytest.approx(1.0)
    assert got["recall@3"] == pytest.approx(1.0)
    assert got["ndcg@3"] == pytest.approx(1.0 / math.log2(4), abs=1e-6)


def test_users_without_heldout_items_are_not_counted():
    # user 0: held-out item ranked first; user 1: no held-out item; user 2: held-out item missed.
    scores = torch.tensor([[3.0, 2.0, 1.0, 0.0],
                           [3.0, 2.0, 1.0, 0.0],
                           [3.0, 2.0, 1.0, 0.0]])
    held = Interactions.from_arrays(np.array([0, 2]), np.array([0, 3]), 3, 4)
    train = Interactions.from_arrays(np.array([1]), np.array([0]), 3, 4)
    sums, n = topk_sums(lambda users: scores[users], held, [train], ks=(1,))
    assert n == 2
    assert sums == pytest.approx({"hr@1": 1.0, "recall@1": 1.0, "ndcg@1": 1.0})
    means = evaluate_topk(lambda users: scores[users], held, [train], ks=(1,))
    assert means == pytest.approx({"hr@1": 0.5, "recall@1": 0.5, "ndcg@1": 0.5})


def test_no_heldout_users_at_all_gives_zeros():
    held = Interactions.from_arrays(np.zeros(0), np.zeros(0), 3, 4)
    train = Interactions.from_arrays(np.array([0]), np.array([0]), 3, 4)
    sums, n = topk_sums(lambda users: torch.zeros(len(users), 4), held, [train], ks=(2,))
    assert n == 0
    assert sums == {"hr@2": 0.0, "recall@2": 0.0, "ndcg@2": 0.0}
    assert evaluate_topk(lambda users: torch.zeros(len(users), 4), held, [train], ks=(2,)) == {
        "hr@2": 0.0, "recall@2": 0.0, "ndcg@2": 0.0}


def test_topk_metrics_per_user_values():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6],
                           [0.1, 0.2, 0.3, 0.4]])
    relevant = torch.tensor([[False, True, False, True],
                             [True, False, False, False]])
    exclude = torch.tensor([[True, False, False, False],
                            [False, False, False, True]])
    out = topk_metrics(scores, relevant, exclude, k=2)
    # user 0: candidates 1, 2, 3 -> top2 [1, 2], one hit at rank 0 of two relevant items
    # user 1: candidates 0, 1, 2 -> top2 [2, 1], no hit
    assert out["hr"].tolist() == [1.0, 0.0]
    assert out["recall"].tolist() == pytest.approx([0.5, 0.0])
    assert out["ndcg"].tolist() == pytest.approx([1.0 / (1.0 + 1.0 / math.log2(3)), 0.0])


def test_embedding_scorer_dot_and_cosine():
    gen = torch.Generator().manual_seed(0)
    users = torch.randn(6, 4, generator=gen)
    items = torch.randn(9, 4, generator=gen)
    ids = torch.tensor([5, 0, 2])
    u, v = users.numpy().astype(np.float64), items.numpy().astype(np.float64)

    dot = embedding_scorer(users, items)(ids).numpy()
    np.testing.assert_allclose(dot, u[[5, 0, 2]] @ v.T, rtol=1e-5, atol=1e-5)

    cos = embedding_scorer(users, items, cosine=True)(ids).numpy()
    expected = np.array([[u[a] @ v[i] / (np.linalg.norm(u[a]) * np.linalg.norm(v[i]))
                          for i in range(9)] for a in (5, 0, 2)])
    np.testing.assert_allclose(cos, expected, rtol=1e-5, atol=1e-6)
    assert np.all(np.abs(cos) <= 1.0 + 1e-6)
