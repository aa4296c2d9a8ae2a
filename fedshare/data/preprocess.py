"""From a raw publisher frame to contiguous implicit interactions (Sec. V-A).

Every rating counts as an interaction (implicit feedback). Repeated (user, item) pairs keep their
earliest timestamp. Users with fewer than ``min_user_interactions`` interactions are dropped once,
after deduplication, as the paper describes; items are never filtered, they simply disappear
when no remaining user touched them. Ids are re-indexed in sorted order of the publisher's ids,
so the same file always gives the same ids.
"""

from __future__ import annotations

import pandas as pd

from fedshare.data.interactions import Interactions
from fedshare.errors import FedShareError


def deduplicate(raw: pd.DataFrame) -> pd.DataFrame:
    """One row per (user, item), the earliest."""
    ordered = raw.sort_values(["user", "item", "timestamp"], kind="stable")
    return ordered.drop_duplicates(["user", "item"], keep="first")


def filter_users(raw: pd.DataFrame, min_user_interactions: int) -> pd.DataFrame:
    """Drop users with fewer than ``min_user_interactions`` interactions."""
    if min_user_interactions < 0:
        raise FedShareError("min_user_interactions must be >= 0")
    counts = raw.groupby("user")["item"].transform("size")
    return raw[counts >= min_user_interactions]


def reindex(raw: pd.DataFrame) -> tuple[Interactions, pd.Index, pd.Index]:
    """Contiguous ids; returns the interactions and the publisher ids of users and items."""
    if raw.empty:
        raise FedShareError("no interactions are left after filtering")
    user_codes, user_ids = pd.factorize(raw["user"], sort=True)
    item_codes, item_ids = pd.factorize(raw["item"], sort=True)
    frame = pd.DataFrame({"user": user_codes.astype("int64"), "item": item_codes.astype("int64"),
                          "timestamp": raw["timestamp"].to_numpy("int64")})
    frame = frame.sort_values(["user", "timestamp", "item"], kind="stable").reset_index(drop=True)
    return Interactions(frame, len(user_ids), len(item_ids)), user_ids, item_ids


def to_implicit(raw: pd.DataFrame, min_user_interactions: int
                ) -> tuple[Interactions, pd.Index, pd.Index]:
    """Deduplicate, filter and re-index a raw frame."""
    return reindex(filter_users(deduplicate(raw), min_user_interactions))
