"""Personalised sharing and unsharing plans (Sec. III-B, Eq. 6-7; Sec. V-A).

Every user is put in one of three groups, in ratio 1:2:7 by default: fully sharing (all training
interactions go to the server), partially sharing (a 0.3 fraction of them) and non-sharing. The
result is, per training interaction, whether it stays local (I_local) or is shared (I_share).
The unsharing plan then picks a fraction gamma = 0.3 of the sharing users; each asks to unshare
a fraction (all, by default) of its shared interactions: I_unlearn is a subset of I_share.

Choices where the paper is silent: group sizes use largest-remainder rounding of
``fraction * num_users``; a partial sharer with ``n`` training items shares
``round(0.3 * n)`` of them, clipped to ``[1, n - 1]`` so the share is a non-empty proper subset;
an unsharing user unshares ``round(fraction * |I_share|)`` interactions, at least one. Every
draw comes from one seeded generator, so a plan is a pure function of (train data, config).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from fedshare.data.interactions import Interactions
from fedshare.data.split import check_fractions
from fedshare.errors import FedShareError

FULL, PARTIAL, NONE = 0, 1, 2
GROUP_NAMES = ("full", "partial", "none")


@dataclass(frozen=True)
class SharingConfig:
    """Ratios of the sharing experiment, with the paper's defaults.

    Args:
        group_fractions: fractions of users that share fully, partially and not at all.
        partial_share_fraction: fraction of a partial sharer's training interactions shared.
        unshare_user_fraction: gamma, the fraction of sharing users who later unshare.
        unshare_item_fraction: fraction of an unsharing user's shared interactions unshared.
        seed: seed of every draw.
    """

    group_fractions: tuple[float, float, float] = (0.1, 0.2, 0.7)
    partial_share_fraction: float = 0.3
    unshare_user_fraction: float = 0.3
    unshare_item_fraction: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.group_fractions) != 3:
            raise FedShareError("group fractions need three values: full, partial, none")
        check_fractions(tuple(self.group_fractions), "group fractions")
        for name in ("partial_share_fraction", "unshare_user_fraction",
                     "unshare_item_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise FedShareError(f"{name.replace('_', ' ')} must lie in [0, 1], got {value}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SharingPlan:
    """Who shares what, and who later takes what back, over the rows of one training set.

    ``group[u]`` is FULL / PARTIAL / NONE; ``shared[r]`` / ``unlearn[r]`` flag row ``r`` of
    the training interactions; ``unlearn`` implies ``shared``.
    """

    config: SharingConfig
    group: np.ndarray
    shared: np.ndarray
    unlearn: np.ndarray

    def __post_init__(self) -> None:
        if np.any(self.unlearn & ~self.shared):
            raise FedShareError("sharing plan is corrupt: an unshared row was never shared")

    def local(self, train: Interactions) -> Interactions:
        """I_local of every user: never leaves the client."""
        return train.subset(~self.shared)

    def shared_data(self, train: Interactions) -> Interactions:
        """D_s (Eq. 7): the union of every user's I_share."""
        return train.subset(self.shared)

    def to_unlearn(self, train: Interactions) -> Interactions:
        """The union of every user's I_unlearn."""
        return train.subset(self.unlearn)

    def remaining_shared(self, train: Interactions) -> Interactions:
        """D_s after unsharing (Eq. 19)."""
        return train.subset(self.shared & ~self.unlearn)

    def group_sizes(self) -> dict[str, int]:
        counts = np.bincount(self.group, minlength=3)
        return {name: int(c) for name, c in zip(GROUP_NAMES, counts, strict=True)}

    def unsharing_users(self, train: Interactions) -> np.ndarray:
        return np.unique(train.users[self.unlearn])


def _largest_remainder(fractions: tuple[float, ...], total: int) -> np.ndarray:
    exact = np.asarray(fractions) * total
    counts = np.floor(exact).astype(np.int64)
    remainder = total - counts.sum()
    counts[np.argsort(-(exact - counts), kind="stable")[:remainder]] += 1
    return counts


def _pick_per_user(rows_users: np.ndarray, candidate: np.ndarray, how_many: np.ndarray,
                   rng: np.random.Generator) -> np.ndarray:
    """Mark ``how_many[u]`` random candidate rows of each user ``u``."""
    idx = np.flatnonzero(candidate)
    users = rows_users[idx]
    order = np.lexsort((rng.random(len(idx)), users))
    sorted_users = users[order]
    first = np.searchsorted(sorted_users, sorted_users, side="left")
    rank = np.arange(len(idx)) - first
    chosen = np.zeros(len(rows_users), dtype=bool)
    chosen[idx[order[rank < how_many[sorted_users]]]] = True
    return chosen


def make_plan(train: Interactions, config: SharingConfig | None = None) -> SharingPlan:
    """Draw the sharing and unsharing plan for ``train`` (see the module docstring)."""
    config = config or SharingConfig()
    rng = np.random.default_rng(config.seed)
    num_users = train.num_users
    users = train.users
    degree = train.user_degrees()

    sizes = _largest_remainder(config.group_fractions, num_users)
    group = np.empty(num_users, dtype=np.int8)
    group[rng.permutation(num_users)] = np.repeat([FULL, PARTIAL, NONE], sizes)

    n_share = np.zeros(num_users, dtype=np.int64)
    n_share[group == FULL] = degree[group == FULL]
    partial = group == PARTIAL
    wanted = np.floor(degree * config.partial_share_fraction + 0.5).astype(np.int64)
    n_share[partial] = np.clip(wanted, 1, np.maximum(degree - 1, 1))[partial]
    n_share = np.minimum(n_share, degree)
    shared = _pick_per_user(users, np.ones(len(users), bool), n_share, rng)

    sharing_users = np.flatnonzero(n_share > 0)
    n_leaving = int(np.floor(len(sharing_users) * config.unshare_user_fraction + 0.5))
    leaving = rng.choice(sharing_users, size=n_leaving, replace=False)
    n_unshare = np.zeros(num_users, dtype=np.int64)
    if config.unshare_item_fraction > 0:
        want = np.floor(n_share[leaving] * config.unshare_item_fraction + 0.5).astype(np.int64)
        n_unshare[leaving] = np.clip(want, 1, n_share[leaving])
    unlearn = _pick_per_user(users, shared, n_unshare, rng)
    return SharingPlan(config, group, shared, unlearn)
