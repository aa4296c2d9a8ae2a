"""The server's shared dataset D_s as a store that honours unsharing requests (Eq. 19-20).

``unshare(user, items)`` is all-or-nothing: the user must exist and every item must currently be
shared by that user, otherwise a :class:`FedShareError` names the problem and nothing changes.
Accepted requests remove the interactions from D_s (and hence from G_s, rebuilt from D_s) and are
logged with the time they were made, so the forgotten graph G_f (Eq. 23) can be built from the
log and the erasure audited.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from fedshare.data.interactions import Interactions
from fedshare.errors import FedShareError


@dataclass(frozen=True)
class UnshareRequest:
    """A logged request. The items are kept only while the unlearning phase needs them
    (``pending``); the permanent log keeps who, how many and when."""

    user: int
    count: int
    at: float


class SharedStore:
    """D_s with unsharing. Keys are ``user * num_items + item`` kept sorted."""

    def __init__(self, shared: Interactions) -> None:
        self.num_users = shared.num_users
        self.num_items = shared.num_items
        self._keys = np.unique(shared.users * shared.num_items + shared.items)
        self.log: list[UnshareRequest] = []
        self._pending: list[tuple[int, np.ndarray]] = []

    def __len__(self) -> int:
        return len(self._keys)

    def contains(self, user: int, item: int) -> bool:
        key = user * self.num_items + item
        pos = np.searchsorted(self._keys, key)
        return bool(pos < len(self._keys) and self._keys[pos] == key)

    def unshare(self, user: int, items: list[int] | np.ndarray) -> UnshareRequest:
        """Remove ``user``'s shared ``items`` from D_s (Eq. 19); all-or-nothing."""
        user = int(user)
        if not 0 <= user < self.num_users:
            raise FedShareError(f"unshare: unknown user {user}")
        items = np.unique(np.asarray(items, dtype=np.int64))
        if len(items) == 0:
            raise FedShareError(f"unshare: user {user} named no items")
        outside = items[(items < 0) | (items >= self.num_items)]
        if len(outside):
            raise FedShareError(f"unshare: unknown item {int(outside[0])}")
        keys = user * self.num_items + items
        pos = np.searchsorted(self._keys, keys).clip(max=max(len(self._keys) - 1, 0))
        present = (self._keys[pos] == keys) if len(self._keys) else np.zeros(len(keys), bool)
        if not present.all():  # counted, not named: logs and summaries keep no (user, item)
            raise FedShareError(f"unshare: user {user} did not share {int((~present).sum())} "
                                f"of the {len(items)} items named")
        self._keys = np.delete(self._keys, pos)
        request = UnshareRequest(user, len(items), time.time())
        self.log.append(request)
        self._pending.append((user, items))
        return request

    def interactions(self) -> Interactions:
        """The current D_s."""
        return Interactions.from_arrays(self._keys // self.num_items,
                                        self._keys % self.num_items, self.num_users,
                                        self.num_items)

    def erase_pending(self) -> None:
        """Forget the unshared interactions themselves once the unlearning phase has used them."""
        self._pending.clear()

    def forgotten(self) -> Interactions:
        """The interactions unshared and not yet unlearned: the edges of G_f (Eq. 23)."""
        users = [np.full(len(items), user) for user, items in self._pending]
        items = [items for _, items in self._pending]
        if not users:
            return Interactions.from_arrays(np.zeros(0), np.zeros(0), self.num_users,
                                            self.num_items)
        return Interactions.from_arrays(np.concatenate(users), np.concatenate(items),
                                        self.num_users, self.num_items)
