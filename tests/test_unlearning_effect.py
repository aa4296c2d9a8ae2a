"""Forgetting metrics (fedshare.unlearning.effect) against brute-force loops on explicit scores.

Every scorer here is a fixed score matrix: ``lambda users: torch.tensor(scores)[users]``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedshare.data.interactions import Interactions
from fedshare.unlearning.effect import (
    agreement,
    auc,
    canary_exposure,
    forgotten_recall,
    membership_auc,
    pair_scores,
)

NUM_USERS, NUM_ITEMS = 6, 30


def scorer_of(scores: np.ndarray):
    table = torch.tensor(scores, dtype=torch.float32)
    return lambda users: table[users]


def interactions(pairs: list[tuple[int, int]], num_users: int = NUM_USERS,
                 num_items: int = NUM_ITEMS) -> Interactions:
    users = np.array([u for u, _ in pairs], dtype=np.int64)
    items = np.array([i for _, i in pairs], dtype=np.int64)
    return Interactions.from_arrays(users, items, num_users, num_items)


def items_of(data: Interactions, user: int) -> set[int]:
    return set(data.items[data.users == user].tolist())


def brute_auc(positive, negative) -> float:
    total = 0.0
    for p in positive:
        for n in negative:
            total += 1.0 if p > n else 0.5 if p == n else 0.0
    return total / (len(positive) * len(negative))


def random_setting(seed: int):
    """Scores without ties, a remaining train set and forgotten pairs outside it."""
    rng = np.random.default_rng(seed)
    scores = rng.random((NUM_USERS, NUM_ITEMS)).astype(np.float32)
    assert len(np.unique(scores)) == scores.size
    remaining, forgotten = [], []
    for user in range(NUM_USERS):
        items = rng.choice(NUM_ITEMS, size=9, replace=False)
        remaining += [(user, int(i)) for i in items[:5]]
        if user in (0, 1, 3, 4):
            forgotten += [(user, int(i)) for i in items[5:5 + int(rng.integers(1, 5))]]
    order = rng.permutation(len(forgotten))
    forgotten = [forgotten[k] for k in order]  # rows in no particular order
    return scores, interactions(remaining), interactions(forgotten)


# ---------------------------------------------------------------- auc
@pytest.mark.parametrize("seed", range(6))
def test_auc_equals_pairwise_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    positive = rng.integers(0, 5, int(rng.integers(1, 15))).astype(float)
    negative = rng.integers(0, 5, int(rng.integers(1, 15))).astype(float)
    assert auc(positive, negative) == pytest.approx(brute_auc(positive, negative), abs=1e-12)


def test_auc_edge_cases():
    assert math.isnan(auc(np.zeros(0), np.ones(3)))
    assert math.isnan(auc(np.ones(3), np.zeros(0)))
    assert math.isnan(auc(np.zeros(0), np.zeros(0)))
    assert auc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert auc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 0.0
    assert auc(np.full(4, 0.7), np.full(3, 0.7)) == 0.5
    assert auc(np.array([1.0]), np.array([0.0, 1.0, 2.0])) == pytest.approx(0.5)


# ---------------------------------------------------------------- pair_scores
def test_pair_scores_picks_each_pairs_score():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(NUM_USERS, NUM_ITEMS)).astype(np.float32)
    pairs = [(4, 3), (0, 29), (4, 3), (2, 0), (0, 7), (5, 11), (2, 28)]
    got = pair_scores(scorer_of(scores), interactions(pairs))
    assert got.shape == (len(pairs),)
    np.testing.assert_array_equal(got, np.array([scores[u, i] for u, i in pairs]))
    assert len(pair_scores(scorer_of(scores), interactions([]))) == 0


# ---------------------------------------------------------------- forgotten recall
def brute_forgotten_recall(scores, forgotten, remaining, k):
    hr, recall = [], []
    for user in np.unique(forgotten.users):
        held = items_of(forgotten, int(user))
        candidates = [i for i in range(NUM_ITEMS) if i not in items_of(remaining, int(user))]
        top = sorted(candidates, key=lambda i: -scores[user, i])[:k]
        hits = len(held & set(top))
        hr.append(float(hits > 0))
        recall.append(hits / len(held))
    return np.mean(hr), np.mean(recall)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("k", [1, 3, 10])
def test_forgotten_recall_brute_force(seed, k):
    scores, remaining, forgotten = random_setting(seed)
    got = forgotten_recall(scorer_of(scores), forgotten, remaining, k)
    assert set(got) == {f"forgotten_hr@{k}", f"forgotten_recall@{k}"}
    hr, recall = brute_forgotten_recall(scores, forgotten, remaining, k)
    assert got[f"forgotten_hr@{k}"] == pytest.approx(hr, abs=1e-6)
    assert got[f"forgotten_recall@{k}"] == pytest.approx(recall, abs=1e-6)


def test_forgotten_recall_excludes_remaining_train_items():
    """Forgotten items ranked just below the user's remaining items are still hits at K = 1."""
    scores = np.zeros((NUM_USERS, NUM_ITEMS), dtype=np.float32)
    remaining = interactions([(0, 1), (0, 2), (1, 5)])
    forgotten = interactions([(0, 3), (1, 6)])
    scores[0, [1, 2]] = 10.0
    scores[0, 3] = 5.0
    scores[1, 5] = 10.0
    scores[1, 6] = -5.0  # at the bottom for user 1
    got = forgotten_recall(scorer_of(scores), forgotten, remaining, 1)
    assert got == {"forgotten_hr@1": 0.5, "forgotten_recall@1": 0.5}


# ---------------------------------------------------------------- membership inference
@pytest.mark.parametrize("seed", range(4))
def test_membership_auc_brute_force(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 4, (NUM_USERS, NUM_ITEMS)).astype(np.float32)  # ties on purpose
    _, _, forgotten = random_setting(seed)
    test = interactions([(int(u), int(i)) for u in range(NUM_USERS)
                         for i in rng.choice(NUM_ITEMS, 3, replace=False)])
    users = set(forgotten.users.tolist())
    assert set(test.users.tolist()) - users  # some test users did not unshare
    positive = [scores[u, i] for u, i in zip(forgotten.users, forgotten.items, strict=True)]
    negative = [scores[u, i] for u, i in zip(test.users, test.items, strict=True)
                if u in users]
    got = membership_auc(scorer_of(scores), forgotten, test)
    assert got == pytest.approx(brute_auc(positive, negative), abs=1e-12)


def test_membership_auc_separates_memorised_interactions():
    scores = np.zeros((NUM_USERS, NUM_ITEMS), dtype=np.float32)
    forgotten = interactions([(0, 1), (2, 3)])
    test = interactions([(0, 5), (2, 6), (4, 1)])
    scores[0, 1] = scores[2, 3] = 1.0
    scores[4, 1] = 5.0  # user 4 did not unshare: must not count
    assert membership_auc(scorer_of(scores), forgotten, test) == 1.0
    assert membership_auc(scorer_of(-scores), forgotten, test) == 0.0


# ---------------------------------------------------------------- agreement with Retrain
def ranks(values: np.ndarray) -> np.ndarray:
    out = np.empty(len(values))
    out[np.argsort(values)] = np.arange(len(values))
    return out


def brute_agreement(a, b, users, remaining, k):
    jaccard, spearman = [], []
    for user in users:
        candidates = np.array([i for i in range(NUM_ITEMS)
                               if i not in items_of(remaining, int(user))])
        top_a = set(candidates[np.argsort(-a[user, candidates])[:k]].tolist())
        top_b = set(candidates[np.argsort(-b[user, candidates])[:k]].tolist())
        jaccard.append(len(top_a & top_b) / len(top_a | top_b))
        ra, rb = ranks(a[user, candidates]), ranks(b[user, candidates])
        ra, rb = ra - ra.mean(), rb - rb.mean()
        spearman.append((ra * rb).sum() / np.sqrt((ra ** 2).sum() * (rb ** 2).sum()))
    return np.mean(jaccard), np.mean(spearman)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("k", [3, 10])
def test_agreement_brute_force(seed, k):
    a, remaining, _ = random_setting(seed)
    rng = np.random.default_rng(seed + 100)
    b = (0.6 * a + 0.4 * rng.random(a.shape)).astype(np.float32)  # correlated, not equal
    users = np.array([4, 0, 3, 1])
    got = agreement(scorer_of(a), scorer_of(b), users, remaining, k)
    assert set(got) == {f"top{k}_jaccard", "spearman"}
    jaccard, spearman = brute_agreement(a, b, users, remaining, k)
    assert got[f"top{k}_jaccard"] == pytest.approx(jaccard, abs=1e-6)
    assert got["spearman"] == pytest.approx(spearman, abs=1e-5)
    assert 0.0 < got["spearman"] < 1.0


def test_agreement_identical_and_reversed_scorers():
    a, remaining, _ = random_setting(7)
    users = np.arange(NUM_USERS)
    same = agreement(scorer_of(a), scorer_of(a.copy()), users, remaining, 5)
    assert same["top5_jaccard"] == 1.0
    assert same["spearman"] == pytest.approx(1.0, abs=1e-6)
    reverse = agreement(scorer_of(a), scorer_of(-a), users, remaining, 5)
    assert reverse["top5_jaccard"] == 0.0
    assert reverse["spearman"] == pytest.approx(-1.0, abs=1e-6)


def test_agreement_ignores_remaining_train_items():
    """Scorers that disagree only on the remaining train items agree perfectly."""
    a, remaining, _ = random_setting(2)
    b = a.copy()
    b[remaining.users, remaining.items] = -b[remaining.users, remaining.items] + 50.0
    got = agreement(scorer_of(a), scorer_of(b), np.arange(NUM_USERS), remaining, 5)
    assert got["top5_jaccard"] == 1.0
    assert got["spearman"] == pytest.approx(1.0, abs=1e-6)


# ---------------------------------------------------------------- canaries
def brute_exposure(scores, canaries, remaining):
    percentiles = []
    for user, canary in zip(canaries.users, canaries.items, strict=True):
        candidates = [i for i in range(scores.shape[1])
                      if i not in items_of(remaining, int(user))]
        others = [i for i in candidates if i != canary]
        below = sum(scores[user, i] < scores[user, canary] for i in others)
        percentiles.append(below / (len(candidates) - 1))
    return float(np.mean(percentiles))


def canary_setting():
    """12 items; user 0 has canaries 3 (top) and 7 (bottom), user 2 canary 5 (3 of 9 below)."""
    num_users, num_items = 4, 12
    rng = np.random.default_rng(0)
    scores = rng.random((num_users, num_items)).astype(np.float32)
    remaining = interactions([(0, 0), (0, 1), (0, 2), (1, 4), (2, 10), (2, 11), (3, 0)],
                             num_users, num_items)
    canaries = interactions([(0, 3), (0, 7), (2, 5)], num_users, num_items)
    scores[0, [0, 2]] = 100.0  # remaining items above the top canary: excluded
    scores[0, 1] = -100.0
    scores[0, 3] = 50.0
    scores[0, 7] = -50.0
    scores[2, 5] = 0.5
    scores[2, [0, 1, 2]] = [0.1, 0.2, 0.3]
    scores[2, [3, 4, 6, 7, 8, 9]] = [0.6, 0.7, 0.8, 0.9, 0.95, 0.99]
    scores[2, [10, 11]] = -1.0
    return scores, canaries, remaining


def test_canary_exposure_by_hand():
    scores, canaries, remaining = canary_setting()
    known = remaining.concat(canaries)
    got = canary_exposure(scorer_of(scores), canaries, remaining, known)
    assert set(got) == {"canary_exposure", "canary_auc"}
    assert got["canary_exposure"] == pytest.approx((1.0 + 0.0 + 3 / 9) / 3, abs=1e-6)
    assert got["canary_exposure"] == pytest.approx(brute_exposure(scores, canaries, remaining),
                                                   abs=1e-6)
    assert 0.0 <= got["canary_auc"] <= 1.0
    top = canary_exposure(scorer_of(scores), canaries.subset(np.array([True, False, False])),
                          remaining, known)
    bottom = canary_exposure(scorer_of(scores), canaries.subset(np.array([False, True, False])),
                             remaining, known)
    assert top["canary_exposure"] == 1.0
    assert bottom["canary_exposure"] == 0.0


@pytest.mark.parametrize("seed", range(4))
def test_canary_exposure_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    num_items = 15
    scores = rng.integers(0, 6, (NUM_USERS, num_items)).astype(np.float32)
    remaining, canaries = [], []
    for user in range(NUM_USERS):
        items = rng.choice(num_items, 6, replace=False)
        remaining += [(user, int(i)) for i in items[:4]]
        if user % 2 == 0:
            canaries += [(user, int(i)) for i in items[4:4 + int(rng.integers(1, 3))]]
    remaining = interactions(remaining, NUM_USERS, num_items)
    canaries = interactions(canaries, NUM_USERS, num_items)
    got = canary_exposure(scorer_of(scores), canaries, remaining, remaining.concat(canaries),
                          seed=seed, negatives_per_user=20)
    assert got["canary_exposure"] == pytest.approx(brute_exposure(scores, canaries, remaining),
                                                   abs=1e-6)
    assert 0.0 <= got["canary_auc"] <= 1.0


def test_canary_auc_against_never_seen_items():
    """Known items (scored above the canaries) and the user's own canaries are never drawn as
    random unseen items, so canaries above every unseen item give AUC 1, below give 0."""
    scores, canaries, remaining = canary_setting()
    test = interactions([(0, 8), (2, 9)], 4, 12)
    known = remaining.concat(canaries).concat(test)
    unseen = np.random.default_rng(1).random(scores.shape).astype(np.float32)
    high = unseen.copy()
    high[known.users, known.items] = 100.0
    high[canaries.users, canaries.items] = 10.0
    got = canary_exposure(scorer_of(high), canaries, remaining, known)
    assert got["canary_auc"] == 1.0
    low = unseen.copy()
    low[known.users, known.items] = 100.0
    low[canaries.users, canaries.items] = -10.0
    got = canary_exposure(scorer_of(low), canaries, remaining, known)
    assert got["canary_auc"] == 0.0
    assert got["canary_exposure"] < 0.5


def test_canary_exposure_is_deterministic_per_seed():
    scores, canaries, remaining = canary_setting()
    known = remaining.concat(canaries)
    a = canary_exposure(scorer_of(scores), canaries, remaining, known, seed=3)
    b = canary_exposure(scorer_of(scores), canaries, remaining, known, seed=3)
    assert a == b
