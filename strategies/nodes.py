"""Waiting for the nodes a run needs, whichever model family it trains."""

from __future__ import annotations

import time
from logging import WARNING

from flwr.common import log
from flwr.serverapp import Grid

from fedshare.errors import FedShareError


def wait_for_nodes(grid: Grid, expected: int, timeout: float, max_failed: float = 0.0
                   ) -> list[int]:
    """Block until ``expected`` nodes are connected (simulated nodes register asynchronously);
    after ``timeout``, go on with at least ``(1 - max_failed) * expected`` of them (a device
    that died must not keep the others from resuming)."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= expected:
            return nodes
        if time.monotonic() > deadline:
            if nodes and len(nodes) >= (1 - max_failed) * expected:
                log(WARNING, "going on with %d of %d nodes", len(nodes), expected)
                return nodes
            raise FedShareError(f"only {len(nodes)} of {expected} nodes connected")
        time.sleep(0.5)
