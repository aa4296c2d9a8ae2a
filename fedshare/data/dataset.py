"""A loaded dataset: contiguous interactions plus the publisher ids and item metadata."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from fedshare.data.interactions import Interactions
from fedshare.data.loaders import source
from fedshare.data.preprocess import to_implicit
from fedshare.errors import FedShareError


@dataclass(frozen=True)
class Dataset:
    """Interactions with their provenance.

    ``user_ids[u]`` / ``item_ids[i]`` are the publisher's ids of contiguous user ``u`` / item
    ``i``; ``items`` (title, genres), when the format has them, is indexed by contiguous item id.
    """

    name: str
    interactions: Interactions
    user_ids: pd.Index
    item_ids: pd.Index
    items: pd.DataFrame | None = None

    @property
    def num_users(self) -> int:
        return self.interactions.num_users

    @property
    def num_items(self) -> int:
        return self.interactions.num_items


def load_dataset(name: str, path: str | Path | None = None,
                 min_user_interactions: int | None = None) -> Dataset:
    """Read ``name`` from ``path`` (or its default location) and make it implicit.

    Args:
        name: ``ml-100k``, ``ml-1m``, ``fashion`` or ``video-games``.
        path: a folder or file in the publisher's format; ``None`` uses the bundled or cached
            copy and downloads (with a checksum) only where neither exists.
        min_user_interactions: user filter; ``None`` takes the paper's value for the dataset.
    """
    spec = source(name)
    where = spec.default_path() if path is None else Path(path)
    if path is not None and not where.exists():
        raise FedShareError(f"dataset path not found: {where}")
    k = spec.min_user_interactions if min_user_interactions is None else min_user_interactions
    interactions, user_ids, item_ids = to_implicit(spec.read(where), k)
    items = None
    if spec.read_items is not None:
        folder = where if where.is_dir() else where.parent
        try:
            meta = spec.read_items(folder)
        except FedShareError:
            meta = None  # metadata is optional: ratings alone define the dataset
        if meta is not None:
            meta = meta.drop_duplicates("item").set_index("item")
            raw_ids = item_ids.astype(str)
            items = meta.reindex(raw_ids).reset_index(drop=True)
    return Dataset(name, interactions, user_ids, item_ids, items)
