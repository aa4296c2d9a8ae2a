"""Tiny synthetic federated datasets shared by the federated and Flower tests."""

from __future__ import annotations

import numpy as np

from fedshare.data.interactions import Interactions
from fedshare.data.prepared import PreparedData
from fedshare.data.sharing import SharingConfig, make_plan
from fedshare.data.split import random_split
from fedshare.sequences.data import SequenceData, split_sessions


def tiny_prepared(num_users: int = 10, num_items: int = 40, seed: int = 0,
                  unshare_user_fraction: float = 0.3) -> PreparedData:
    """8-15 distinct items per user, rows shuffled (users interleave, as in real logs)."""
    rng = np.random.default_rng(seed)
    degrees = rng.integers(8, 16, num_users)
    users = np.repeat(np.arange(num_users), degrees)
    items = np.concatenate([rng.choice(num_items, d, replace=False) for d in degrees])
    order = rng.permutation(len(users))
    data = Interactions.from_arrays(users[order], items[order], num_users, num_items,
                                    np.arange(len(users)))
    split = random_split(data, (0.8, 0.1, 0.1), seed=0)
    sharing = SharingConfig(group_fractions=(0.25, 0.25, 0.5),
                            unshare_user_fraction=unshare_user_fraction, seed=0)
    plan = make_plan(split.train, sharing)
    return PreparedData("synthetic", split, plan, 0, (0.8, 0.1, 0.1))


NUM_ITEMS, MAX_LEN = 15, 8  # toy_sessions' catalogue and window


def toy_sessions(num_sessions: int = 30, seed: int = 0, num_items: int = NUM_ITEMS,
                 max_len: int = MAX_LEN,
                 fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> SequenceData:
    """Sessions of 3..16 distinct items following a noisy cycle (so there is something to learn)."""
    rng = np.random.default_rng(seed)
    sessions = []
    for _ in range(num_sessions):
        n, start = int(rng.integers(3, 17)), int(rng.integers(num_items))
        sessions.append([(start + k) % num_items + 1 for k in range(min(n, num_items))])
    indptr = np.concatenate([[0], np.cumsum([len(s) for s in sessions])]).astype(np.int64)
    return SequenceData("toy", indptr, np.concatenate(sessions).astype(np.int64),
                        split_sessions(num_sessions, fractions, seed), np.arange(num_sessions),
                        np.arange(num_items), max_len, seed, fractions, 1)


def tiny_sequences(num_sessions: int = 10, num_items: int = 15, max_len: int = 8,
                   seed: int = 0) -> SequenceData:
    """:func:`toy_sessions` split 6:2:2 so that validation and test have two devices each."""
    return toy_sessions(num_sessions, seed, num_items, max_len, (0.6, 0.2, 0.2))
