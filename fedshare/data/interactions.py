"""The one representation of implicit feedback used everywhere: (user, item, timestamp) rows.

Ids are contiguous (users in ``[0, num_users)``, items in ``[0, num_items)``) so that they index
embedding tables directly. Conversions to PyG's bipartite ``edge_index`` and to torch sparse
matrices live here so that no other module re-derives them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

COLUMNS = ("user", "item", "timestamp")


@dataclass(frozen=True)
class Interactions:
    """Implicit interactions over a fixed id space.

    Args:
        frame: columns ``user``, ``item`` (int64, contiguous ids) and ``timestamp`` (int64).
        num_users: size of the user id space (may exceed the users present in ``frame``).
        num_items: size of the item id space.
    """

    frame: pd.DataFrame
    num_users: int
    num_items: int

    def __post_init__(self) -> None:
        missing = [c for c in COLUMNS if c not in self.frame.columns]
        if missing:
            raise ValueError(f"interaction frame lacks columns {missing}")
        if len(self.frame):
            if self.frame["user"].min() < 0 or self.frame["user"].max() >= self.num_users:
                raise ValueError("user id outside [0, num_users)")
            if self.frame["item"].min() < 0 or self.frame["item"].max() >= self.num_items:
                raise ValueError("item id outside [0, num_items)")

    @classmethod
    def from_arrays(
        cls,
        users: np.ndarray,
        items: np.ndarray,
        num_users: int,
        num_items: int,
        timestamps: np.ndarray | None = None,
    ) -> Interactions:
        users = np.asarray(users, dtype=np.int64)
        items = np.asarray(items, dtype=np.int64)
        ts = np.zeros_like(users) if timestamps is None else np.asarray(timestamps, np.int64)
        frame = pd.DataFrame({"user": users, "item": items, "timestamp": ts})
        return cls(frame, num_users, num_items)

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def users(self) -> np.ndarray:
        return self.frame["user"].to_numpy(np.int64, copy=True)

    @property
    def items(self) -> np.ndarray:
        return self.frame["item"].to_numpy(np.int64, copy=True)

    def subset(self, mask: np.ndarray) -> Interactions:
        """Rows where ``mask`` is true, in the same id space."""
        return Interactions(self.frame[np.asarray(mask)].reset_index(drop=True),
                            self.num_users, self.num_items)

    def concat(self, other: Interactions) -> Interactions:
        if (other.num_users, other.num_items) != (self.num_users, self.num_items):
            raise ValueError("cannot concatenate interactions over different id spaces")
        frame = pd.concat([self.frame, other.frame], ignore_index=True)
        return Interactions(frame, self.num_users, self.num_items)

    def user_degrees(self) -> np.ndarray:
        return np.bincount(self.users, minlength=self.num_users)

    def item_degrees(self) -> np.ndarray:
        return np.bincount(self.items, minlength=self.num_items)

    def items_by_user(self) -> tuple[np.ndarray, np.ndarray]:
        """CSR view ``(indptr, items)``: user ``u``'s items are ``items[indptr[u]:indptr[u+1]]``."""
        order = np.lexsort((self.items, self.users))
        indptr = np.zeros(self.num_users + 1, dtype=np.int64)
        np.cumsum(self.user_degrees(), out=indptr[1:])
        return indptr, self.items[order]

    def bipartite_edge_index(self) -> torch.Tensor:
        """PyG ``edge_index`` of the user-item graph: users ``[0, U)``, items ``[U, U + I)``,
        both directions (LightGCN propagates users -> items and items -> users)."""
        u = torch.from_numpy(self.users)
        i = torch.from_numpy(self.items) + self.num_users
        return torch.stack([torch.cat([u, i]), torch.cat([i, u])])

    def to_sparse(self) -> torch.Tensor:
        """Binary ``num_users x num_items`` interaction matrix (sparse COO, duplicates summed)."""
        index = torch.from_numpy(np.stack([self.users, self.items]))
        values = torch.ones(len(self), dtype=torch.float32)
        shape = (self.num_users, self.num_items)
        return torch.sparse_coo_tensor(index, values, shape).coalesce()
