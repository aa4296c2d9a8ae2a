"""Where each forget sample lives: the server's map between the union's rows and the nodes'.

The union is ordered as :func:`fedshare.sequences.requests.forget_set` orders it (sessions
ascending, each session's positions ascending), so the server's batches are the in-process
run's; a node numbers its own samples in the same order restricted to its sessions, so a node's
samples are the union's rows of its sessions, in order.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


class SampleIndex:
    """Rows of the union per node, built from the accepted requests of each node."""

    def __init__(self, requests: Mapping[int, Mapping[int, list[int]]]) -> None:
        owner = sorted((s, len(p), node) for node, mine in requests.items()
                       for s, p in mine.items())
        self.owners = [s for s, k, _ in owner for _ in range(k)]
        nodes = [node for _, k, node in owner for _ in range(k)]  # Flower ids are uint64
        self.rows = {n: np.array([r for r, m in enumerate(nodes) if m == n], dtype=np.int64)
                     for n in set(nodes)}

    def __len__(self) -> int:
        return len(self.owners)

    @property
    def nodes(self) -> list[int]:
        return sorted(self.rows)

    def split(self, batch: np.ndarray) -> dict[int, list[int]]:
        """A batch of union rows as each node's own sample indices (nodes without any left
        out)."""
        out = {}
        for node, rows in self.rows.items():
            mine = np.flatnonzero(np.isin(rows, batch))
            if len(mine):
                out[node] = mine.tolist()
        return out

    def devices(self, node: int, samples: list[int] | None = None) -> set[int]:
        """The requesting devices (sessions) of ``node`` behind ``samples`` (default all)."""
        rows = self.rows[node] if samples is None else self.rows[node][samples]
        return {self.owners[r] for r in rows.tolist()}
