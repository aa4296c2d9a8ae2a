"""Who serves whom, and D_s: what the server learns from the nodes' share replies (Eq. 7).

The server never loads interaction data: each node announces its users, their |I_local| (the
FedAvg weights it will see anyway) and their I_share. Replies are untrusted; a reply that fails
:func:`fedshare.federated.validation.share_problem`, reports another catalogue, or claims a user
bound to another node (bindings survive restarts in the state database) takes no part in the run.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from fedshare.data.interactions import Interactions
from fedshare.errors import FedShareError
from fedshare.federated.validation import share_problem


@dataclass
class ShareReply:
    """One node's share reply, read but not yet trusted."""

    node: int
    served: np.ndarray
    counts: np.ndarray
    users: np.ndarray
    items: np.ndarray
    catalogue: tuple[int, int]


@dataclass
class Directory:
    """node -> users it serves, |I_local| per user, and the shared data D_s."""

    node_users: dict[int, np.ndarray]
    local_counts: dict[int, int]
    shared: Interactions

    @property
    def user_node(self) -> dict[int, int]:
        return {int(u): node for node, users in self.node_users.items() for u in users}

    def trainable(self) -> np.ndarray:
        """Users with local data, the only ones a round samples (Sec. IV-B1)."""
        return np.array(sorted(u for u, n in self.local_counts.items() if n > 0), dtype=np.int64)


def build_directory(replies: list[ShareReply], catalogue: tuple[int, int] | None = None,
                    bound: dict[int, int] | None = None
                    ) -> tuple[Directory, list[tuple[int, str]]]:
    """D_s (Eq. 7) and who serves whom from the readable share replies, and the (node, reason)
    of every reply left out.

    The catalogue is the stored one on a resumed run, else the one most nodes report; a node
    reporting another is rejected. A node claiming a user bound to another node (``bound``) or
    already claimed by an earlier reply is rejected; so is a node whose local counts are not one
    non-negative integer per served user.
    """
    replies = sorted(replies, key=lambda r: r.node)  # order-independent
    if catalogue is None:
        sizes = Counter(r.catalogue for r in replies if min(r.catalogue) > 0)
        if not sizes:
            raise FedShareError("no node sent an acceptable share reply")
        catalogue = min(sizes, key=lambda size: (-sizes[size], size))
    bound = bound or {}
    node_users: dict[int, np.ndarray] = {}
    counts: dict[int, int] = {}
    users, items, rejected = [], [], []
    for reply in replies:
        claimed = {int(u) for us in node_users.values() for u in us}
        problem = share_problem(reply.served, reply.users, reply.items, *catalogue, claimed)
        if reply.catalogue != catalogue:
            problem = f"a catalogue of {reply.catalogue}, not {catalogue}"
        elif problem is None and (reply.counts.shape != reply.served.shape
                                  or reply.counts.dtype.kind not in "iu"
                                  or bool((reply.counts < 0).any())):
            problem = "local counts are not one non-negative integer per served user"
        elif problem is None and any(bound.get(int(u), reply.node) != reply.node
                                     for u in reply.served):
            problem = "it announces users bound to another node"
        if problem is not None:
            rejected.append((reply.node, problem))
            continue
        node_users[reply.node] = reply.served
        counts.update(zip(reply.served.tolist(), reply.counts.tolist(), strict=True))
        users.append(reply.users)
        items.append(reply.items)
    if not node_users:
        raise FedShareError("no node sent an acceptable share reply")
    shared = Interactions.from_arrays(np.concatenate(users), np.concatenate(items), *catalogue)
    return Directory(node_users, counts, shared), rejected
