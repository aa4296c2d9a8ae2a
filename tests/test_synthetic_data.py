"""The ML-1M-shaped synthetic generator: exact sizes, valid rows, heavy tails, determinism."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest

from fedshare.data.split import TRAIN, split_parts
from fedshare.data.synthetic import synthetic_interactions, synthetic_prepared

SMALL = {"num_users": 300, "num_items": 1000, "num_interactions": 15_000}


@pytest.fixture(scope="module")
def small():
    return synthetic_interactions(**SMALL, seed=3)


def test_same_seed_same_data_other_seed_other_data(small):
    again = synthetic_interactions(**SMALL, seed=3)
    other = synthetic_interactions(**SMALL, seed=4)
    pd.testing.assert_frame_equal(small.interactions.frame, again.interactions.frame)
    assert not small.interactions.frame.equals(other.interactions.frame)


def test_exact_sizes_contiguous_ids_and_no_duplicates(small):
    data = small.interactions
    assert (data.num_users, data.num_items, len(data)) == (300, 1000, 15_000)
    assert (len(small.user_ids), len(small.item_ids)) == (300, 1000)
    assert (data.user_degrees() > 0).all() and (data.item_degrees() > 0).all()  # all rated
    keys = data.users * data.num_items + data.items
    assert len(np.unique(keys)) == len(keys)


def test_timestamps_increase_and_rows_are_ordered_like_real_data(small):
    frame = small.interactions.frame
    assert frame["timestamp"].is_unique
    assert frame["user"].is_monotonic_increasing
    assert frame.groupby("user")["timestamp"].apply(lambda s: s.is_monotonic_increasing).all()


def test_user_degrees_are_bounded_and_skewed(small):
    degree = small.interactions.user_degrees()
    assert degree.min() >= 20 and degree.max() <= 1000
    assert degree.mean() > 1.2 * np.median(degree)


def test_item_degrees_are_heavy_tailed(small):
    degree = small.interactions.item_degrees()
    assert degree.max() > 3 * degree.mean()
    assert degree.mean() > np.median(degree)


def test_degree_cap_and_bounds_are_enforced():
    data = synthetic_interactions(50, 60, 2_000, seed=1, min_user_degree=5, max_user_degree=70)
    degree = data.interactions.user_degrees()
    assert degree.min() >= 5 and degree.max() <= 60 and degree.sum() == 2_000
    with pytest.raises(ValueError):
        synthetic_interactions(10, 30, 100)  # 10 users x >= 20 items > 100 interactions
    with pytest.raises(ValueError):
        synthetic_interactions(10, 30, 400)  # more than 10 users x 30 distinct items


def test_full_size_matches_ml1m_shape_quickly():
    start = time.perf_counter()
    data = synthetic_interactions().interactions
    seconds = time.perf_counter() - start
    assert (data.num_users, data.num_items, len(data)) == (6040, 3706, 1_000_209)
    users, items = data.user_degrees(), data.item_degrees()
    assert users.min() == 20 and users.max() <= 2314
    assert 150 < users.mean() < 180 and 85 < np.median(users) < 110
    assert 2_500 < items.max() < 4_500 and 90 < np.median(items) < 160
    assert seconds < 15  # a few seconds on 2 cores; generous against a loaded machine


def test_prepared_splits_and_plans_like_prepare():
    prepared = synthetic_prepared(**SMALL, seed=3)
    data = synthetic_interactions(**SMALL, seed=3).interactions
    parts = split_parts(data, (0.8, 0.1, 0.1), 0)
    split = prepared.split
    assert prepared.dataset == "synthetic-ml-1m"
    assert len(split.train) == (parts == TRAIN).sum()
    assert len(split.train) + len(split.valid) + len(split.test) == len(data)
    assert (split.train.user_degrees() > 0).all()
    plan = prepared.plan
    assert len(plan.shared) == len(split.train) and len(plan.group) == 300
    assert plan.group_sizes() == {"full": 30, "partial": 60, "none": 210}
    assert not np.any(plan.unlearn & ~plan.shared)
