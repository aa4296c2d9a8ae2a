"""Negative sampling that gives every user the same draws alone or in a batch.

Draws come from a counter-based generator (SplitMix64 of ``seed, round, user, counter``), so a
user's negatives are a pure function of who they are and when they train: a cohort of users and
one user alone sample identically. The draws run compiled
(:mod:`fedshare.sampling_kernel`); :func:`counter_hash` is the stream's numpy definition.
"""

from __future__ import annotations

import numpy as np

from fedshare.errors import FedShareError

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The SplitMix64 finaliser: a bijective 64-bit mix (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = np.asarray(x, dtype=np.uint64) + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def counter_hash(*keys: np.ndarray | int) -> np.ndarray:
    """Hash a tuple of integer keys (broadcast) to uniform 64-bit values."""
    state = np.zeros((), dtype=np.uint64)
    for key in keys:
        state = splitmix64(state ^ np.asarray(key).astype(np.uint64))
    return state


def counter_uniform(*keys: np.ndarray | int) -> np.ndarray:
    """Uniform floats in [0, 1) from :func:`counter_hash` (53 random bits)."""
    return (counter_hash(*keys) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def sample_negatives(users: np.ndarray, slots: np.ndarray, known_keys: np.ndarray,
                     num_items: int, seed: int, round_: int = 0,
                     max_attempts: int = 1000) -> np.ndarray:
    """One item per ``(user, slot)`` that the user never interacted with.

    Args:
        users: global user id of each draw.
        slots: per-user counter of each draw (distinct draws of one user need distinct slots).
        known_keys: sorted ``user * num_items + item`` of every known interaction (rejected).
        num_items: size of the item space.
        seed, round_: stream keys.
    """
    from fedshare.sampling_kernel import draw_negatives  # numba: imported on first use

    users = np.ascontiguousarray(users, dtype=np.int64)
    slots = np.ascontiguousarray(np.broadcast_to(slots, users.shape), dtype=np.int64)
    items = np.empty(len(users), dtype=np.int64)
    if not draw_negatives(users, slots, np.ascontiguousarray(known_keys, dtype=np.int64),
                          int(num_items), int(seed), int(round_), int(max_attempts), items):
        raise FedShareError("cannot sample negatives: some user interacted with (almost) "
                            "every item")
    return items
