"""Per-user random split and personalised sharing / unsharing plans.

Expected sizes are recomputed here with exact integer arithmetic (``fractions.Fraction``), so a
float rounding slip in the library would show up as a mismatch.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from fedshare.data import Interactions, SharingConfig, make_plan, prepare, random_split
from fedshare.data import loaders as loaders_module
from fedshare.data.sharing import FULL, NONE, PARTIAL
from fedshare.data.split import TEST, TRAIN, VALID, split_parts
from fedshare.errors import FedShareError


def half_up(x: Fraction) -> int:
    """round() with halves rounded up, on an exact fraction."""
    return math.floor(x + Fraction(1, 2))


def frac(value: float) -> Fraction:
    return Fraction(str(value))


def make_data(degrees: list[int], num_items: int = 60, seed: int = 0) -> Interactions:
    """User ``u`` has ``degrees[u]`` distinct items; every row has a unique timestamp (its id)."""
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(len(degrees)), degrees)
    items = np.concatenate([rng.choice(num_items, n, replace=False) for n in degrees])
    order = rng.permutation(len(users))  # rows of one user need not be adjacent
    return Interactions.from_arrays(users[order], items[order], len(degrees), num_items,
                                    np.arange(len(users)))


def part_counts(data: Interactions, parts: np.ndarray) -> np.ndarray:
    """``counts[u] = (train, valid, test)`` sizes of user ``u``."""
    return np.stack([np.bincount(data.users[parts == k], minlength=data.num_users)
                     for k in (TRAIN, VALID, TEST)], axis=1)


# ----------------------------------------------------------------------------- split
@pytest.mark.parametrize(("n", "expected"), [
    (1, (1, 0, 0)), (2, (2, 0, 0)), (4, (4, 0, 0)), (5, (3, 1, 1)), (10, (8, 1, 1)),
    (14, (12, 1, 1)), (15, (11, 2, 2)), (20, (16, 2, 2)), (24, (20, 2, 2)), (25, (19, 3, 3)),
    (35, (27, 4, 4)), (45, (35, 5, 5)), (100, (80, 10, 10)),
])
def test_split_sizes_by_hand_default_fractions(n, expected):
    data = make_data([n], num_items=120)
    counts = part_counts(data, split_parts(data, seed=3))
    assert tuple(counts[0].tolist()) == expected


@pytest.mark.parametrize(("fractions", "n", "expected"), [
    ((0.7, 0.15, 0.15), 10, (6, 2, 2)),  # 1.5 -> 2
    ((0.7, 0.15, 0.15), 30, (20, 5, 5)),  # 4.5 -> 5
    ((0.7, 0.15, 0.15), 3, (3, 0, 0)),  # 0.45 -> 0
    ((0.6, 0.2, 0.2), 3, (1, 1, 1)),  # 0.6 -> 1
    ((0.6, 0.2, 0.2), 12, (8, 2, 2)),  # 2.4 -> 2
    ((0.5, 0.25, 0.25), 6, (2, 2, 2)),  # 1.5 -> 2
])
def test_split_sizes_by_hand_other_fractions(fractions, n, expected):
    data = make_data([n])
    counts = part_counts(data, split_parts(data, fractions, seed=1))
    assert tuple(counts[0].tolist()) == expected


def test_split_sizes_follow_the_rule_for_every_degree():
    degrees = [*range(1, 81), 97, 150, 333]
    data = make_data(degrees, num_items=400)
    for fractions in [(0.8, 0.1, 0.1), (0.7, 0.15, 0.15), (0.6, 0.25, 0.15)]:
        counts = part_counts(data, split_parts(data, fractions, seed=7))
        for u, n in enumerate(degrees):
            valid = half_up(n * frac(fractions[1]))
            test = half_up(n * frac(fractions[2]))
            if valid + test <= n - 1:  # no clipping needed at these fractions and degrees >= 2
                assert tuple(counts[u].tolist()) == (n - valid - test, valid, test), (n, fractions)
            else:
                assert counts[u, TRAIN] >= 1
                assert counts[u].sum() == n


def test_split_keeps_a_training_item_even_when_everything_is_held_out():
    degrees = [1, 2, 3, 4, 7]
    data = make_data(degrees)
    for fractions in [(0.0, 0.5, 0.5), (0.0, 0.0, 1.0), (0.0, 1.0, 0.0), (0.5, 0.25, 0.25)]:
        counts = part_counts(data, split_parts(data, fractions, seed=0))
        assert counts.sum(axis=1).tolist() == degrees
        assert counts[:, TRAIN].min() >= 1
        if fractions[0] == 0.0:
            assert counts[:, TRAIN].tolist() == [1, 1, 1, 1, 1]
    # n = 2 at 2:1:1 wants round(0.5) = 1 valid and 1 test: only one of them can be held out
    counts = part_counts(data, split_parts(data, (0.5, 0.25, 0.25), seed=0))
    assert counts[1, TRAIN] == 1
    assert counts[1, VALID] + counts[1, TEST] == 1


def test_random_split_parts_are_disjoint_and_cover_all_rows():
    data = make_data([1, 2, 5, 10, 15, 20, 33, 40])
    split = random_split(data, seed=11)
    stamps = [set(p.frame["timestamp"].tolist()) for p in (split.train, split.valid, split.test)]
    assert sum(len(s) for s in stamps) == len(data)
    assert stamps[0] | stamps[1] | stamps[2] == set(range(len(data)))
    assert not (stamps[0] & stamps[1] or stamps[0] & stamps[2] or stamps[1] & stamps[2])
    # each row keeps its user and item
    original = {(int(t), int(u), int(i)) for u, i, t in
                zip(data.users, data.items, data.frame["timestamp"], strict=True)}
    rows = set()
    for part in (split.train, split.valid, split.test):
        assert (part.num_users, part.num_items) == (data.num_users, data.num_items)
        rows |= {(int(t), int(u), int(i)) for u, i, t in
                 zip(part.users, part.items, part.frame["timestamp"], strict=True)}
    assert rows == original
    assert (split.num_users, split.num_items) == (8, 60)


def test_split_is_seeded():
    data = make_data([10, 20, 30, 40, 50])
    a = split_parts(data, seed=5)
    b = split_parts(data, seed=5)
    c = split_parts(data, seed=6)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    # a different seed changes which rows are held out, never how many
    assert np.array_equal(part_counts(data, a), part_counts(data, c))


@pytest.mark.parametrize(("fractions", "message"), [
    ((0.8, 0.1, 0.05), "sum to 1"),
    ((0.5, 0.5, 0.5), "sum to 1"),
    ((1.2, -0.1, -0.1), r"lie in \[0, 1\]"),
    ((0.9, 0.2, -0.1), r"lie in \[0, 1\]"),
])
def test_split_fraction_errors(fractions, message):
    data = make_data([10])
    with pytest.raises(FedShareError, match=f"split fractions must.*{message}"):
        random_split(data, fractions)


# ----------------------------------------------------------------------------- sharing config
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"group_fractions": (0.2, 0.2, 0.2)}, "group fractions must sum to 1"),
    ({"group_fractions": (0.5, 0.6, -0.1)}, r"group fractions must each lie in \[0, 1\]"),
    ({"group_fractions": (0.5, 0.5)}, "three values"),
    ({"partial_share_fraction": 1.5}, r"partial share fraction must lie in \[0, 1\]"),
    ({"partial_share_fraction": -0.1}, "partial share fraction"),
    ({"unshare_user_fraction": 1.01}, "unshare user fraction"),
    ({"unshare_item_fraction": 2.0}, "unshare item fraction"),
])
def test_sharing_config_errors(kwargs, message):
    with pytest.raises(FedShareError, match=message):
        SharingConfig(**kwargs)


# ----------------------------------------------------------------------------- group sizes
def largest_remainder(fractions: tuple[float, ...], total: int) -> list[int]:
    """Reference: exact quotas, floors, then +1 to the largest remainders (no ties used)."""
    exact = [frac(f) * total for f in fractions]
    counts = [math.floor(e) for e in exact]
    left = total - sum(counts)
    by_remainder = sorted(range(len(exact)), key=lambda k: exact[k] - counts[k], reverse=True)
    for k in by_remainder[:left]:
        counts[k] += 1
    return counts


@pytest.mark.parametrize(("num_users", "fractions", "expected"), [
    (943, (0.1, 0.2, 0.7), [94, 189, 660]),  # 94.3, 188.6, 660.1: the one spare goes to .6
    (10, (0.1, 0.2, 0.7), [1, 2, 7]),
    (11, (0.1, 0.2, 0.7), [1, 2, 8]),  # 1.1, 2.2, 7.7
    (7, (0.1, 0.2, 0.7), [1, 1, 5]),  # 0.7, 1.4, 4.9: two spares go to .9 and .7
    (6040, (0.1, 0.2, 0.7), [604, 1208, 4228]),
    (9, (0.3, 0.3, 0.4), [3, 3, 3]),  # 2.7, 2.7, 3.6
    (4, (0.0, 0.0, 1.0), [0, 0, 4]),
])
def test_group_sizes_largest_remainder(num_users, fractions, expected):
    assert largest_remainder(fractions, num_users) == expected
    data = make_data([3] * num_users, num_items=10)
    plan = make_plan(data, SharingConfig(group_fractions=fractions))
    assert plan.group_sizes() == dict(zip(("full", "partial", "none"), expected, strict=True))
    assert len(plan.group) == num_users


# ----------------------------------------------------------------------------- plan per row
# 84 users (8.4 / 16.8 / 58.8 -> groups of 8 / 17 / 59), some without any training row
DEGREES = [0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 13, 15, 17, 20, 23, 25, 30, 35, 41, 50] * 4


def expected_share(group: int, n: int, partial_fraction: float = 0.3) -> int:
    if group == FULL:
        return n
    if group == PARTIAL:
        if n == 0:
            return 0
        # clipped to [1, n - 1]; with n = 1 that range is empty and the one item is shared
        return min(max(half_up(n * frac(partial_fraction)), 1), max(n - 1, 1))
    return 0


@pytest.fixture(scope="module")
def train() -> Interactions:
    return make_data(DEGREES, num_items=60, seed=4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plan_shares_by_group(train, seed):
    plan = make_plan(train, SharingConfig(seed=seed))
    degree = train.user_degrees()
    shared_per_user = np.bincount(train.users[plan.shared], minlength=train.num_users)
    for u in range(train.num_users):
        n = int(degree[u])
        assert shared_per_user[u] == expected_share(int(plan.group[u]), n), (u, plan.group[u], n)
        if plan.group[u] == PARTIAL and n >= 2:
            assert 1 <= shared_per_user[u] <= n - 1  # a non-empty proper subset
    assert plan.shared.dtype == bool
    assert len(plan.shared) == len(plan.unlearn) == len(train)


def test_partial_share_by_hand(train):
    plan = make_plan(train, SharingConfig(group_fractions=(0.0, 1.0, 0.0)))
    degree = train.user_degrees()
    shared = np.bincount(train.users[plan.shared], minlength=train.num_users)
    by_hand = {2: 1, 3: 1, 4: 1, 5: 2, 6: 2, 7: 2, 9: 3, 10: 3, 11: 3, 13: 4, 15: 5, 17: 5,
               20: 6, 23: 7, 25: 8, 30: 9, 35: 11, 41: 12, 50: 15}  # round(0.3 n), halves up
    for u in range(train.num_users):
        if int(degree[u]) in by_hand:
            assert shared[u] == by_hand[int(degree[u])]


def test_partial_share_clipped_to_a_proper_subset():
    # 0.9 * n rounds to n for n <= 5: clipped to n - 1; 0.01 * n rounds to 0: raised to 1
    data = make_data([2, 3, 4, 5, 40])
    high = make_plan(data, SharingConfig(group_fractions=(0, 1, 0), partial_share_fraction=0.9))
    assert np.bincount(data.users[high.shared]).tolist() == [1, 2, 3, 4, 36]
    low = make_plan(data, SharingConfig(group_fractions=(0, 1, 0), partial_share_fraction=0.01))
    assert np.bincount(data.users[low.shared]).tolist() == [1, 1, 1, 1, 1]


def test_full_share_everything_none_share_nothing(train):
    full = make_plan(train, SharingConfig(group_fractions=(1, 0, 0)))
    assert full.shared.all()
    none = make_plan(train, SharingConfig(group_fractions=(0, 0, 1)))
    assert not none.shared.any()
    assert not none.unlearn.any()
    assert len(none.unsharing_users(train)) == 0


def test_local_and_shared_partition_train(train):
    plan = make_plan(train, SharingConfig(seed=9))
    local = plan.local(train)
    shared = plan.shared_data(train)
    assert len(local) + len(shared) == len(train)
    local_rows = set(local.frame["timestamp"].tolist())
    shared_rows = set(shared.frame["timestamp"].tolist())
    assert not local_rows & shared_rows
    assert local_rows | shared_rows == set(train.frame["timestamp"].tolist())
    assert shared_rows == set(train.frame["timestamp"][plan.shared].tolist())
    # rows keep their user and item
    for part in (local, shared):
        assert (part.num_users, part.num_items) == (train.num_users, train.num_items)
    lookup = dict(zip(train.frame["timestamp"], zip(train.users, train.items, strict=True),
                      strict=True))
    for part in (local, shared):
        for t, u, i in zip(part.frame["timestamp"], part.users, part.items, strict=True):
            assert lookup[t] == (u, i)
    remaining = plan.remaining_shared(train)
    unlearn = plan.to_unlearn(train)
    assert len(remaining) + len(unlearn) == len(shared)
    assert set(unlearn.frame["timestamp"]) <= shared_rows


# ----------------------------------------------------------------------------- unsharing plan
@pytest.mark.parametrize("gamma", [0.0, 0.1, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("seed", [0, 3])
def test_number_of_unsharing_users(train, gamma, seed):
    plan = make_plan(train, SharingConfig(unshare_user_fraction=gamma, seed=seed))
    assert not np.any(plan.unlearn & ~plan.shared)  # unlearn is a subset of shared
    shared_per_user = np.bincount(train.users[plan.shared], minlength=train.num_users)
    sharing_users = np.flatnonzero(shared_per_user > 0)
    leaving = plan.unsharing_users(train)
    assert len(leaving) == half_up(len(sharing_users) * frac(gamma))
    assert set(leaving.tolist()) <= set(sharing_users.tolist())
    # default unshare_item_fraction = 1: a leaving user takes back everything it shared
    unlearn_per_user = np.bincount(train.users[plan.unlearn], minlength=train.num_users)
    assert np.array_equal(unlearn_per_user[leaving], shared_per_user[leaving])
    others = np.setdiff1d(np.arange(train.num_users), leaving)
    assert not unlearn_per_user[others].any()


def test_unsharing_users_count_by_hand(train):
    plan = make_plan(train, SharingConfig())
    assert plan.group_sizes() == {"full": 8, "partial": 17, "none": 59}
    # users of the sharing groups with no training row share nothing and cannot unshare
    zero_degree_sharers = sum(1 for u in range(train.num_users)
                              if DEGREES[u] == 0 and plan.group[u] != NONE)
    shared_per_user = np.bincount(train.users[plan.shared], minlength=train.num_users)
    n_sharing = int((shared_per_user > 0).sum())
    assert n_sharing == 25 - zero_degree_sharers
    expected = (3 * n_sharing + 5) // 10  # round(0.3 * n_sharing), halves up
    assert len(plan.unsharing_users(train)) == expected


@pytest.mark.parametrize("fraction", [0.5, 0.25, 0.01])
def test_unshare_item_fraction(train, fraction):
    config = SharingConfig(unshare_user_fraction=1.0, unshare_item_fraction=fraction, seed=2)
    plan = make_plan(train, config)
    shared_per_user = np.bincount(train.users[plan.shared], minlength=train.num_users)
    unlearn_per_user = np.bincount(train.users[plan.unlearn], minlength=train.num_users)
    assert not np.any(plan.unlearn & ~plan.shared)
    for u in range(train.num_users):
        s = int(shared_per_user[u])
        expected = 0 if s == 0 else max(1, half_up(s * frac(fraction)))
        assert unlearn_per_user[u] == expected, (u, s)


def test_unshare_half_by_hand():
    # every user shares fully and unshares: |share| = n, unshares round(n / 2) (halves up), >= 1
    degrees = [1, 2, 3, 4, 5, 8, 9]
    data = make_data(degrees)
    plan = make_plan(data, SharingConfig(group_fractions=(1, 0, 0), unshare_user_fraction=1.0,
                                         unshare_item_fraction=0.5))
    assert np.bincount(data.users[plan.unlearn]).tolist() == [1, 1, 2, 2, 3, 4, 5]


def test_unshare_item_fraction_zero_unshares_nothing(train):
    plan = make_plan(train, SharingConfig(unshare_user_fraction=1.0, unshare_item_fraction=0.0))
    assert plan.shared.any()
    assert not plan.unlearn.any()


def test_plan_is_seeded(train):
    a = make_plan(train, SharingConfig(seed=21))
    b = make_plan(train, SharingConfig(seed=21))
    c = make_plan(train, SharingConfig(seed=22))
    for x, y in [(a.group, b.group), (a.shared, b.shared), (a.unlearn, b.unlearn)]:
        assert np.array_equal(x, y)
    assert not (np.array_equal(a.group, c.group) and np.array_equal(a.shared, c.shared))
    assert a.group_sizes() == c.group_sizes()
    assert make_plan(train).config == SharingConfig()


# ----------------------------------------------------------------------------- real ML-100K
@pytest.fixture(scope="module")
def ml100k(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDSHARE_DATA", str(tmp_path_factory.mktemp("cache")))

        def no_network(*args, **kwargs):
            raise AssertionError("a test tried to download")

        mp.setattr(loaders_module, "fetch", no_network)
        yield prepare("ml-100k")


def test_ml100k_split_sizes(ml100k):
    split = ml100k.split
    assert len(split.train) + len(split.valid) + len(split.test) == 100000
    degree = (split.train.user_degrees() + split.valid.user_degrees()
              + split.test.user_degrees())
    # round(n / 10), halves up, per user, for both validation and test
    held_out = [(int(n) + 5) // 10 for n in degree]
    assert split.valid.user_degrees().tolist() == held_out
    assert split.test.user_degrees().tolist() == held_out
    assert len(split.valid) == len(split.test) == sum(held_out)
    assert len(split.train) == 100000 - 2 * sum(held_out)
    assert (ml100k.num_users, ml100k.num_items) == (943, 1682)
    assert ml100k.split_fractions == (0.8, 0.1, 0.1)


def test_ml100k_default_plan(ml100k):
    plan, train = ml100k.plan, ml100k.split.train
    assert largest_remainder((0.1, 0.2, 0.7), 943) == [94, 189, 660]
    assert plan.group_sizes() == {"full": 94, "partial": 189, "none": 660}
    degree = train.user_degrees()
    shared_per_user = np.bincount(train.users[plan.shared], minlength=943)
    for u in range(943):
        assert shared_per_user[u] == expected_share(int(plan.group[u]), int(degree[u]))
    sharers = set(np.flatnonzero(plan.group != NONE).tolist())
    assert set(np.unique(train.users[plan.shared]).tolist()) == sharers
    # gamma = 0.3 of the 283 sharing users: round(84.9) = 85, each unsharing everything
    leaving = plan.unsharing_users(train)
    assert len(leaving) == 85
    assert set(leaving.tolist()) <= sharers
    unlearn_per_user = np.bincount(train.users[plan.unlearn], minlength=943)
    assert np.array_equal(unlearn_per_user[leaving], shared_per_user[leaving])
    assert unlearn_per_user.sum() == shared_per_user[leaving].sum()
