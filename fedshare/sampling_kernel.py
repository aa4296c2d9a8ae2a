"""Compiled (numba) form of :mod:`fedshare.sampling`'s counter stream and negative sampling.

Why compiled: the server draws a batch of negatives every refinement and unlearning step, and
numpy's vectorised rejection loop costs more than the step's own tensor work on ML-100K
(several passes over the batch per attempt, a binary search each). One loop per draw, stopping
at its first accepted attempt, gives the same items (a test compares them draw for draw).
"""

from __future__ import annotations

import numpy as np
from numba import njit

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


@njit(cache=True, inline="always")
def mix(z: np.uint64) -> np.uint64:
    """SplitMix64 finaliser (:func:`fedshare.sampling.splitmix64`)."""
    z = z + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


@njit(cache=True, inline="always")
def hash5(seed: np.uint64, round_: np.uint64, user: np.uint64, slot: np.uint64,
          last: np.uint64) -> np.uint64:
    """:func:`fedshare.sampling.counter_hash` of five keys."""
    state = mix(np.uint64(0) ^ seed)
    state = mix(state ^ round_)
    state = mix(state ^ user)
    state = mix(state ^ slot)
    return mix(state ^ last)


@njit(cache=True, nogil=True)
def draw_negatives(users: np.ndarray, slots: np.ndarray, known_keys: np.ndarray,
                   num_items: int, seed: int, round_: int, max_attempts: int,
                   out: np.ndarray) -> bool:
    """``out[k]``: the first attempt's item that ``users[k]`` does not know (``user *
    num_items + item`` not in the sorted ``known_keys``); False if ``max_attempts`` found none
    for some draw."""
    s, r, items = np.uint64(seed), np.uint64(round_), np.uint64(num_items)
    n_known = len(known_keys)
    for k in range(len(users)):
        found = False
        for attempt in range(max_attempts):
            cand = np.int64(hash5(s, r, np.uint64(users[k]), np.uint64(slots[k]),
                                  np.uint64(attempt)) % items)
            key = users[k] * num_items + cand
            at = np.searchsorted(known_keys, key)
            if at == n_known or known_keys[at] != key:
                out[k] = cand
                found = True
                break
        if not found:
            return False
    return True
