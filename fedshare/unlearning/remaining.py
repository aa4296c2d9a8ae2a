"""The data after unsharing, and canaries for auditing unlearning.

``remaining_data`` drops every interaction a user unshared from the training set: Eq. 9 defines
the retrained reference on ``I_local + (I_share - I_unlearn)``, so the forgotten interactions
influence nothing afterwards, not even the client's own ranking history.

Canaries (an audit option, off in normal runs): before learning, each user who will unshare gets
``per_user`` random items it never interacted with added to its *shared and to-unlearn* training
interactions. A model that memorised them ranks them high; Retrain ranks them as it ranks any
random item it never saw (low: random items are mostly unpopular), which is the reference.
They are never in validation or test, so they never count in utility.
"""

from __future__ import annotations

import numpy as np

from fedshare.data.interactions import Interactions
from fedshare.data.prepared import PreparedData
from fedshare.data.sharing import SharingPlan
from fedshare.data.split import Split
from fedshare.sampling import sample_negatives


def remaining_data(data: PreparedData) -> PreparedData:
    """``data`` with the to-unlearn training interactions removed; nobody unshares any more."""
    keep = ~data.plan.unlearn
    train = data.split.train.subset(keep)
    plan = SharingPlan(data.plan.config, data.plan.group, data.plan.shared[keep],
                       np.zeros(int(keep.sum()), dtype=bool))
    return PreparedData(data.dataset, Split(train, data.split.valid, data.split.test), plan,
                        data.split_seed, data.split_fractions)


def add_canaries(data: PreparedData, per_user: int = 5, seed: int = 0, common: bool = False
                 ) -> tuple[PreparedData, Interactions]:
    """Add ``per_user`` canary interactions to every unsharing user's shared, to-unlearn data.

    Returns the new data and the canaries. Canary items are drawn uniformly among the items the
    user has no interaction with in any part of the split. ``common=True`` repeats one set of
    canary items across all unsharing users (items none of them ever interacted with): each
    canary then carries many forgotten edges, a much stronger memorisation signal.
    """
    train = data.split.train
    users = data.plan.unsharing_users(train)
    every = [data.split.train, data.split.valid, data.split.test]
    if common:
        touched = np.zeros(data.num_items, dtype=bool)
        for part in every:
            touched[part.items[np.isin(part.users, users)]] = True
        pool = np.flatnonzero(~touched)
        rng = np.random.default_rng([seed, 0xCA7A])
        chosen = rng.choice(pool, size=min(per_user, len(pool)), replace=False)
        owners = np.repeat(users, len(chosen))
        items = np.tile(chosen, len(users))
        return _with_canaries(data, Interactions.from_arrays(owners, items, data.num_users,
                                                             data.num_items))
    known = np.unique(np.concatenate([p.users * data.num_items + p.items for p in every]))
    owners = np.repeat(users, per_user)
    slots = np.tile(np.arange(per_user), len(users))
    items = sample_negatives(owners, slots, known, data.num_items, seed, 0xCA7A)
    # Distinct canaries per user: redraw duplicates with fresh slots.
    for attempt in range(1, 100):
        keys = owners * data.num_items + items
        _, first = np.unique(keys, return_index=True)
        dup = np.setdiff1d(np.arange(len(keys)), first)
        if len(dup) == 0:
            break
        items[dup] = sample_negatives(owners[dup], slots[dup] + attempt * per_user, known,
                                      data.num_items, seed, 0xCA7A)
    return _with_canaries(data, Interactions.from_arrays(owners, items, data.num_users,
                                                         data.num_items))


def _with_canaries(data: PreparedData, canaries: Interactions
                   ) -> tuple[PreparedData, Interactions]:
    train = data.split.train
    new_train = train.concat(canaries)
    ones = np.ones(len(canaries), dtype=bool)
    plan = SharingPlan(data.plan.config, data.plan.group,
                       np.concatenate([data.plan.shared, ones]),
                       np.concatenate([data.plan.unlearn, ones]))
    split = Split(new_train, data.split.valid, data.split.test)
    return PreparedData(data.dataset, split, plan, data.split_seed, data.split_fractions), \
        canaries
