"""Unlearning requests on sequences (spec "Samples"): which training sessions forget which item.

Default: 10% of the training sessions (``round(fraction * S_train)``, Python's round), one
position each, drawn by a seeded generator. Positions are 1-based as in
:mod:`fedshare.unlearning.cau.samples`: t forgets v_t, with prefix v_1..v_{t-1} and retain target
v_{t+1}, so 2 <= t <= n - 1 (never position 1, which has no prefix, nor n, which has no retain
target). The spec draws t from the second half, t in [ceil(n/2), n-1]. Choice: t is further kept
inside the window the model trains on (the last ``max_len + 1`` items, whose targets are positions
n - max_len + 1..n), t >= n - max_len + 1: an item before the window was never a training target,
so "forgetting" it would be a no-op that Retrain and Original agree on. A session with no such
position (n < 3) is never drawn.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from fedshare.sequences.data import TRAIN, SequenceData
from fedshare.unlearning.cau.model import ForgetSet
from fedshare.unlearning.cau.samples import build_forget_set, remaining_session


def position_range(n: int, max_len: int) -> tuple[int, int]:
    """Allowed forgotten positions (1-based, inclusive) of a session of ``n`` items; empty
    when the first exceeds the second."""
    return max(2, math.ceil(n / 2), n - max_len + 1), n - 1


def sequence_requests(data: SequenceData, fraction: float = 0.1, seed: int = 0
                      ) -> dict[int, list[int]]:
    """Session id -> [forgotten position] for ``round(fraction * S_train)`` training sessions."""
    train = np.flatnonzero(data.part == TRAIN)
    lengths = np.diff(data.indptr)[train]
    ranges = [position_range(int(n), data.max_len) for n in lengths]
    eligible = np.array([s for s, (lo, hi) in zip(train, ranges, strict=True) if lo <= hi],
                        dtype=np.int64)
    count = round(fraction * len(train))
    if count > len(eligible):
        raise ValueError(f"{count} requests asked, only {len(eligible)} sessions have a "
                         "forgettable position")
    rng = np.random.default_rng([seed, 0xC4A])
    chosen = np.sort(rng.choice(eligible, size=count, replace=False))
    out = {}
    for s in chosen:
        lo, hi = position_range(int(data.indptr[s + 1] - data.indptr[s]), data.max_len)
        out[int(s)] = [int(rng.integers(lo, hi + 1))]
    return out


def remaining_sessions(data: SequenceData, requests: dict[int, list[int]]
                       ) -> dict[int, np.ndarray]:
    """Every session with its forgotten positions deleted (D_r; untouched sessions as they are)."""
    return {s: (np.asarray(remaining_session(data.session(s).tolist(), requests[s]),
                           dtype=np.int64) if s in requests else data.session(s))
            for s in range(data.num_sessions)}


def remaining_data(data: SequenceData, requests: dict[int, list[int]]) -> SequenceData:
    """``data`` with the forgotten items removed (what Retrain trains on); same parts."""
    sessions = remaining_sessions(data, requests)
    lengths = np.array([len(sessions[s]) for s in range(data.num_sessions)], dtype=np.int64)
    indptr = np.zeros(data.num_sessions + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    items = (np.concatenate([sessions[s] for s in range(data.num_sessions)])
             if data.num_sessions else data.items[:0])
    return dataclasses.replace(data, indptr=indptr, items=items)


def forget_set(data: SequenceData, requests: dict[int, list[int]]
               ) -> tuple[ForgetSet, list[int]]:
    """The CAU forget samples of ``requests`` and their sessions."""
    sessions = {s: data.session(s).tolist() for s in requests}
    return build_forget_set(sessions, requests, data.max_len)
