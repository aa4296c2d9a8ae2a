"""The unlearning phase of the FedShare strategy (Sec. IV-C, IV-D, Algorithm 2) on Flower.

After learning, a ``query.unshare`` round collects the nodes' unsharing requests (each is a set
of interactions the user had shared, so nothing new reaches the server); the server applies them
to its :class:`SharedStore` (all-or-nothing per request), rebuilds G_s (Eq. 19-20), builds the
forgotten views from its M snapshots (Eq. 23-24), and runs T_un rounds of remaining-data training
(the strategy's train messages; nodes now hold only their remaining data) followed by the
contrastive unlearning update (Eq. 25). The pre-request snapshots and the pending interactions
are deleted when the phase ends.
"""

from __future__ import annotations

import time
from logging import WARNING

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from fedshare.errors import FedShareError
from fedshare.unlearning.algorithm import run_algorithm2
from fedshare.unlearning.contrastive import UnlearningConfig
from fedshare.unlearning.store import SharedStore
from strategies.fedshare import FedShareStrategy
from strategies.records import table_record


def collect_requests(grid: Grid, strategy: FedShareStrategy) -> list[tuple[int, np.ndarray]]:
    """Ask the nodes whose shares were accepted for their users' unsharing requests; a node
    may speak only for the users it serves (anything else is logged and dropped)."""
    served = strategy.directory.node_users
    messages = [Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node,
                        message_type="query.unshare") for node in served]
    requests = []
    for reply in grid.send_and_receive(messages):
        node = reply.metadata.src_node_id
        if reply.has_error():
            raise FedShareError(f"unshare round failed on node {node}: {reply.error.reason}")
        if strategy.audit is not None:
            strategy.audit.record("unshare", strategy.config.rounds, reply)
        try:
            users = reply.content["arrays"]["unshare-users"].numpy()
            items = reply.content["arrays"]["unshare-items"].numpy()
            if users.shape != items.shape or not np.isin(users, served.get(node, [])).all():
                raise ValueError("requests for users the node does not serve")
        except (KeyError, TypeError, ValueError) as exc:
            log(WARNING, "rejected the unsharing requests of node %d: %s", node, exc)
            continue
        requests += [(int(u), items[users == u]) for u in np.unique(users)]
    return requests


def run_unlearning(grid: Grid, strategy: FedShareStrategy, config: UnlearningConfig) -> dict:
    """Algorithm 2 after ``strategy`` has learned; returns timing and storage figures."""
    server = strategy.server
    started = time.perf_counter()
    kept = server.snapshot_bytes()
    store = SharedStore(server.shared)
    requests = collect_requests(grid, strategy)
    for user, items in requests:
        try:  # all-or-nothing per request: items the user never shared refuse it whole
            store.unshare(user, items)
        except FedShareError as exc:
            log(WARNING, "rejected an unsharing request: %s", exc)
            continue
        if strategy.store is not None:  # acknowledged durably before it is served
            strategy.store.acknowledge(user, items)
    server.set_shared(store.interactions())
    forgotten = len(store.forgotten())

    def remaining_round(round_: int) -> torch.Tensor:
        messages = strategy.configure_train(
            round_, table_record(server.table),
            ConfigRecord({"local-epochs": config.local_epochs}), grid)
        return strategy.local_view(round_, grid.send_and_receive(messages))[0]

    run_algorithm2(server, store, config, strategy.config.rounds, remaining_round)
    if strategy.store is not None:  # D_s without the requests and the unlearned table, at once
        strategy.store.serve(strategy.store.pending(), (strategy.config.rounds + config.rounds,
                                                        server.table, list(server.snapshots)))
    return {"unlearning_seconds": time.perf_counter() - started,
            "unlearning_kept_bytes": kept, "unshare_requests": len(requests),
            "forgotten_interactions": forgotten, "unlearning": config.to_dict()}
