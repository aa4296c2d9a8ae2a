"""Seeded random train / validation / test split of interactions (Sec. V-A: 8:1:1).

Choice: the split is drawn *per user* (each user's interactions are shuffled and cut 8:1:1),
the way RecBole's random split groups by user. The paper only says "randomly split the
interactions"; splitting per user keeps every user's training set non-empty, which a federated
client needs, and gives every user validation and test items to be ranked on. A user with
``n`` interactions gets ``round(n * valid)`` validation and ``round(n * test)`` test items
(halves round up) and the rest for training, so no user is left without training data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedshare.data.interactions import Interactions
from fedshare.errors import FedShareError

TRAIN, VALID, TEST = 0, 1, 2


@dataclass(frozen=True)
class Split:
    """Three disjoint parts of one dataset over the same id space."""

    train: Interactions
    valid: Interactions
    test: Interactions

    @property
    def num_users(self) -> int:
        return self.train.num_users

    @property
    def num_items(self) -> int:
        return self.train.num_items


def check_fractions(values: tuple[float, ...], what: str) -> None:
    """Fractions must each lie in [0, 1] and sum to 1."""
    if any(not 0.0 <= v <= 1.0 for v in values):
        raise FedShareError(f"{what} must each lie in [0, 1], got {list(values)}")
    if abs(sum(values) - 1.0) > 1e-6:
        raise FedShareError(f"{what} must sum to 1, got {list(values)} (sum {sum(values):g})")


def split_parts(data: Interactions, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
                seed: int = 0) -> np.ndarray:
    """Part label (TRAIN / VALID / TEST) of every row of ``data``."""
    check_fractions(fractions, "split fractions")
    users = data.users
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(len(users)), users))
    degree = data.user_degrees()
    start = np.concatenate([[0], np.cumsum(degree)[:-1]])
    sorted_users = users[order]
    rank = np.arange(len(users)) - start[sorted_users]
    n = degree[sorted_users]
    n_valid = np.floor(n * fractions[1] + 0.5).astype(np.int64)
    n_test = np.floor(n * fractions[2] + 0.5).astype(np.int64)
    overflow = np.maximum(n_valid + n_test - (n - 1), 0)  # keep >= 1 training item
    n_valid = n_valid - np.minimum(overflow, n_valid)
    n_test = np.minimum(n_test, n - 1 - n_valid).clip(min=0)
    part_sorted = np.where(rank < n_test, TEST, np.where(rank < n_test + n_valid, VALID, TRAIN))
    parts = np.empty(len(users), dtype=np.int8)
    parts[order] = part_sorted
    return parts


def split_by_parts(data: Interactions, parts: np.ndarray) -> Split:
    return Split(data.subset(parts == TRAIN), data.subset(parts == VALID),
                 data.subset(parts == TEST))


def random_split(data: Interactions, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
                 seed: int = 0) -> Split:
    """Seeded per-user random split; see the module docstring for the rounding rule."""
    return split_by_parts(data, split_parts(data, fractions, seed))
