"""A seeded stand-in for MovieLens-1M when the real file is absent (benchmarks, scale tests).

Shape targets are ML-1M's published statistics after the paper's filter: 6,040 users, 3,706 rated
items, 1,000,209 ratings; user degrees from 20 to 2,314 (mean 165.6, median 96); item degrees
from 1 to 3,428 (mean 269.9, median 123.5).

Distributions chosen, and why:

* User degrees: a log-normal truncated below at ``min_user_degree`` (ML-1M keeps only users with
  >= 20 ratings; above that its user degrees are right-skewed, mean / median ~1.7, the shape
  of a log-normal). At ML-1M size ``sigma = 1.08`` with the truncation at ``z = -1.34``
  standard deviations (``mu = 4.45``) matches the mean and the median to 1 % and gives a
  largest draw near 2,300-2,900, so the few draws above ``max_user_degree`` (2,314) are clipped
  (seed 0: quartiles 50 / 192, median 96, a handful of users at 2,314).
  Draws are then rescaled (the part above the minimum) so degrees sum to exactly
  ``num_interactions``; at ML-1M size the rescaling factor is ~1.
* Item popularity: Zipf-Mandelbrot weights ``(rank + zipf_offset) ** -zipf_exponent`` over a
  random permutation of the items, and every user draws its items *without replacement* with
  probability proportional to popularity (successive sampling, vectorised as an exponential
  race: the ``d`` smallest of ``Exp(1) / weight``). Heavy users saturate the popular items, so
  realised degrees are flatter than the weights: a pure Zipf head (offset 0) makes the top
  item rated by nearly every user, hence the offset. Exponent 1.2 and offset 45 are fitted to
  ML-1M's top item (3,428 ratings) and median (123.5): seed 0 gives 3,428 and 119, mean 269.9.
  The fit is lighter than ML-1M in the far tail (least-rated item ~38 ratings, not 1), which
  matters for neither speed nor memory. Before the race each item is given to the owner of a
  distinct random interaction slot, so every item is rated and ``num_items`` is exact.
* Timestamps: the rows are shuffled (users interleave, as in a real log) and stamped with
  strictly increasing times over ML-1M's span (April 2000 to February 2003).

The raw frame then goes through :func:`fedshare.data.preprocess.to_implicit`, the code path of
real data, so ids, row order and filters are those :func:`~fedshare.data.dataset.load_dataset`
gives; :func:`synthetic_prepared` splits and plans it with the functions that
:func:`fedshare.data.prepared.prepare` uses.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from fedshare.data.dataset import Dataset
from fedshare.data.prepared import PreparedData
from fedshare.data.preprocess import to_implicit
from fedshare.data.sharing import SharingConfig, make_plan
from fedshare.data.split import split_by_parts, split_parts

ML1M_START, ML1M_END = 956_703_932, 1_046_454_590  # first and last ML-1M timestamps
_CHUNK_CELLS = 1 << 22  # users x items keys drawn per chunk (bounds memory at ~32 MB)


def _truncated_normal(n: int, low: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` standard normal draws conditioned on ``z >= low`` (vectorised rejection)."""
    out = np.empty(0)
    while len(out) < n:
        z = rng.standard_normal(2 * (n - len(out)) + 16)
        out = np.concatenate([out, z[z >= low]])
    return out[:n]


def _user_degrees(num_users: int, total: int, low: int, high: int, sigma: float,
                  truncation: float, rng: np.random.Generator) -> np.ndarray:
    """Truncated log-normal degrees in ``[low, high]`` summing to exactly ``total``."""
    raw = low * np.exp(sigma * (_truncated_normal(num_users, truncation, rng) - truncation))
    excess, room, target = raw - low, float(high - low), float(total - num_users * low)
    lo, hi = 0.0, 1.0
    while np.minimum(hi * excess, room).sum() < target:
        hi *= 2.0
    for _ in range(200):  # bisection on the scale of the excess; keep the side with sum >= total
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if np.minimum(mid * excess, room).sum() < target else (lo, mid)
    exact = low + np.minimum(hi * excess, room)
    degrees = np.floor(exact).astype(np.int64)
    remainder = total - int(degrees.sum())  # < number of non-integral entries (all below high)
    degrees[np.argsort(-(exact - degrees), kind="stable")[:remainder]] += 1
    return degrees


def _draw_items(degrees: np.ndarray, weights: np.ndarray,
                rng: np.random.Generator) -> np.ndarray:
    """Each user's items: popularity-weighted, without replacement, every item at least once."""
    num_users, num_items = len(degrees), len(weights)
    indptr = np.concatenate([[0], np.cumsum(degrees)])
    slots = rng.choice(int(indptr[-1]), size=num_items, replace=False)
    owner = np.searchsorted(indptr, slots, side="right") - 1  # distinct slots: <= d_u per user
    inv_weight = (1.0 / weights).astype(np.float32)
    chunk = max(1, _CHUNK_CELLS // num_items)
    out = []
    for start in range(0, num_users, chunk):
        stop = min(start + chunk, num_users)
        keys = -np.log1p(-rng.random((stop - start, num_items), dtype=np.float32)) * inv_weight
        mine = (owner >= start) & (owner < stop)
        keys[owner[mine] - start, np.flatnonzero(mine)] = -1.0  # forced: smallest key
        order = np.argsort(keys, axis=1)
        take = np.arange(num_items)[None, :] < degrees[start:stop, None]
        out.append(order[take])
    return np.concatenate(out).astype(np.int64)


def synthetic_interactions(num_users: int = 6040, num_items: int = 3706,
                           num_interactions: int = 1_000_209, seed: int = 0, *,
                           min_user_degree: int = 20, max_user_degree: int = 2314,
                           sigma: float = 1.08, truncation: float = -1.34,
                           zipf_exponent: float = 1.2, zipf_offset: float = 45.0,
                           name: str = "synthetic-ml-1m") -> Dataset:
    """A dataset shaped like ML-1M (see the module docstring); a pure function of its arguments.

    Args:
        num_users, num_items, num_interactions: exact sizes of the result.
        seed: every draw.
        min_user_degree, max_user_degree: bounds of a user's degree (the upper one is also
            capped at ``num_items``).
        sigma, truncation: log-normal spread of user degrees, and where (in standard
            deviations) the minimum degree cuts it.
        zipf_exponent, zipf_offset: item popularity ``(rank + zipf_offset) ** -zipf_exponent``.
        name: the dataset's name in prepared data and reports.
    """
    high = min(max_user_degree, num_items)
    if num_users < 1 or num_items < 1 or not 1 <= min_user_degree <= high:
        raise ValueError("need num_users, num_items >= 1 and 1 <= min_user_degree <= "
                         "min(max_user_degree, num_items)")
    if not max(num_users * min_user_degree, num_items) <= num_interactions <= num_users * high:
        raise ValueError(f"{num_interactions} interactions cannot give {num_users} users "
                         f"{min_user_degree}..{high} distinct items each and rate all "
                         f"{num_items} items")
    rng = np.random.default_rng(seed)
    degrees = _user_degrees(num_users, num_interactions, min_user_degree, high, sigma,
                            truncation, rng)
    weights = np.empty(num_items)
    ranks = np.arange(1, num_items + 1, dtype=np.float64)
    weights[rng.permutation(num_items)] = (ranks + zipf_offset) ** -zipf_exponent
    items = _draw_items(degrees, weights, rng)
    users = np.repeat(np.arange(num_users), degrees)
    order = rng.permutation(num_interactions)
    gaps = rng.integers(1, max(2, 2 * (ML1M_END - ML1M_START) // num_interactions),
                        num_interactions)
    raw = pd.DataFrame({"user": users[order] + 1, "item": items[order] + 1,
                        "rating": np.ones(num_interactions, np.int64),
                        "timestamp": ML1M_START + np.cumsum(gaps)})
    interactions, user_ids, item_ids = to_implicit(raw, min_user_degree)
    return Dataset(name, interactions, user_ids, item_ids)


def synthetic_prepared(num_users: int = 6040, num_items: int = 3706,
                       num_interactions: int = 1_000_209, seed: int = 0, *,
                       split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
                       split_seed: int = 0, sharing: SharingConfig | None = None,
                       **shape: Any) -> PreparedData:
    """:func:`synthetic_interactions`, split and planned as
    :func:`fedshare.data.prepared.prepare` does for real data (same functions, same defaults).

    ``shape`` passes the generator's keyword-only arguments through.
    """
    dataset = synthetic_interactions(num_users, num_items, num_interactions, seed, **shape)
    data = dataset.interactions
    split = split_by_parts(data, split_parts(data, split_fractions, split_seed))
    return PreparedData(dataset.name, split, make_plan(split.train, sharing or SharingConfig()),
                        split_seed, tuple(split_fractions))
