"""The unlearning phase of the FedShare strategy (Sec. IV-C, IV-D, Algorithm 2) on Flower.

After learning, a ``query.unshare`` round collects the nodes' unsharing requests (each is a set
of interactions the user had shared, so nothing new reaches the server); the server applies them
to its :class:`SharedStore` (all-or-nothing per request), rebuilds G_s (Eq. 19-20), builds the
forgotten views from its M snapshots (Eq. 23-24), and runs T_un rounds of remaining-data training
(the strategy's train messages; nodes now hold only their remaining data) followed by the
contrastive unlearning update (Eq. 25). The pre-request snapshots and the pending interactions
are deleted when the phase ends. With SecAgg+ (``defence`` naming ``secagg``) the remaining-data
rounds, and Retrain's rounds, are summed securely as the learning rounds are (the strategy's
``train_messages`` and ``accepted_updates``); the phase's traffic then counts their
``train.secagg`` messages and masked replies, SecAgg+'s other stages are in ``secagg.json``.
FRU and CUFRU need each node's update and refuse SecAgg+
(:func:`fedshare.runconfig.secagg_settings`).
"""

from __future__ import annotations

import time
from dataclasses import replace
from logging import INFO

import numpy as np
import torch
from flwr.app import RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from fedshare import protocol
from fedshare.errors import FedShareError
from fedshare.federated.recording import RoundRecorder
from fedshare.federated.rounds import PROGRESS
from fedshare.federated.summary import PhaseSummary
from fedshare.federated.traffic import Traffic
from fedshare.storage_ledger import RowStore
from fedshare.unlearning.algorithm import complete_erasure, run_algorithm2
from fedshare.unlearning.config import VARIANTS, UnlearningConfig
from fedshare.unlearning.phase import kept_bytes
from fedshare.unlearning.replay import ReplayConfig
from fedshare.unlearning.shared_store import SharedStore
from strategies.fedshare import FedShareStrategy
from strategies.replay import exchange, replay_cufru, replay_fru, retrain

REPLAYED = ("fru", "cufru")


def collect_requests(grid: Grid, strategy: FedShareStrategy) -> list[tuple[int, np.ndarray]]:
    """Ask the connected nodes whose shares were accepted for their users' unsharing requests.

    The server binds each user to the authenticated node that announced it in the share round:
    a node may speak only for its own users (anything else is rejected whole). A node that
    fails or does not answer in time sends nothing now; it can repeat its requests later.
    """
    online = set(grid.get_node_ids())
    mark = strategy.mark()
    messages = [protocol.unshare_request(node, mark)
                for node in strategy.directory.node_users if node in online]
    replies = grid.send_and_receive(messages, timeout=strategy.timeout)
    requests = []
    for node, content in strategy.inbox.read("unshare", strategy.config.rounds, replies,
                                             lambda m: m.content):
        requests += requests_from(strategy, node, content)
    return requests


def requests_from(strategy: FedShareStrategy, node: int, content: RecordDict
                  ) -> list[tuple[int, np.ndarray]]:
    """One node's ``(user, items)`` unsharing requests; all of them are rejected when the reply
    is malformed or speaks for a user of another node."""
    try:
        users, items = protocol.read_unshare_reply(content)
        if not np.isin(users, strategy.directory.node_users.get(node, [])).all():
            raise ValueError("requests for users the node does not serve")
    except Exception as exc:  # untrusted input: any failure rejects it
        strategy.inbox.reject("unshare", strategy.config.rounds, node, str(exc))
        return []
    return [(int(u), items[users == u]) for u in np.unique(users)]


def accept_requests(strategy: FedShareStrategy, store: SharedStore,
                    requests: list[tuple[int, np.ndarray]]) -> int:
    """Apply the acknowledged-but-unserved requests of the state database (a resumed run), then
    the new ones: each all-or-nothing on ``store`` (items the user never shared refuse it
    whole), acknowledged durably before it is served. A request logged before, pending or
    served, is not applied again; items of a user's served requests are left out of its new
    ones (a device keeps announcing everything it unshared). Returns how many requests the
    phase serves."""
    durable = strategy.store
    pending = durable.pending() if durable is not None else []
    for request in pending:  # applied in a run that stopped before serving them
        store.unshare(request.user, request.items)
    accepted = len(pending)
    for user, items in requests:
        if durable is not None:  # a device repeats what it asked before, and may add to it
            items = durable.unserved(user, items)
            known = durable.find(user, items) if len(items) else None
            if not len(items) or known is not None:
                log(INFO, "the unsharing request of user %d is already %s", user,
                    "logged" if known is not None and not known.served else "served")
                continue
        try:
            store.unshare(user, items)
        except FedShareError as exc:
            strategy.inbox.reject("unshare", strategy.config.rounds, -1, str(exc))
            continue
        if durable is not None:
            durable.acknowledge(user, items)
        accepted += 1
    return accepted


def run_unlearning(grid: Grid, strategy: FedShareStrategy, config: UnlearningConfig,
                   learned: tuple[dict, dict], method: str = "fedshare",
                   histories: dict[str, RoundRecorder] | None = None,
                   replay: ReplayConfig | None = None) -> PhaseSummary:
    """The unlearning phase after ``strategy`` has learned (``learned``: its valid and test
    scores): Algorithm 2 or one of its ablations, or FRU's / CUFRU's replay from the
    ``histories`` recorded while learning (:mod:`strategies.replay`); returns the phase's
    summary, with what the method cost on the wire.

    Rounds are numbered on from the last committed one; with nothing to serve (e.g. a resumed
    run whose phase had already finished) the model is left as it is.
    """
    server = strategy.server
    started = time.perf_counter()
    traffic = Traffic()
    kept = kept_bytes(server.ledger, method)[0] if method in REPLAYED else \
        0 if method == "retrain" else server.snapshot_bytes()
    store = SharedStore(server.shared)
    log(INFO, "%s unlearning: collecting unsharing requests", PROGRESS)
    accepted = accept_requests(strategy, store, collect_requests(grid, strategy))
    log(INFO, "%s unlearning: %d requests acknowledged", PROGRESS, accepted)
    first = max(strategy.config.rounds, strategy.store.last_round() if strategy.store else 0)
    forgotten = len(store.forgotten())

    def summary() -> PhaseSummary:
        settings = {} if method == "retrain" else config.to_dict() if method not in REPLAYED \
            else (replay or ReplayConfig()).to_dict()
        return PhaseSummary(*learned, time.perf_counter() - started, kept, accepted, forgotten,
                            settings, method, **traffic.to_dict())

    if accepted == 0:
        log(INFO, "no unsharing request to serve")
        return summary()
    server.set_shared(store.interactions())

    def remaining_round(round_: int) -> torch.Tensor:
        """A remaining-data round: the nodes now hold only their remaining data (Eq. 9)."""
        log(INFO, "%s unlearning round %d", PROGRESS, round_)
        messages = strategy.train_messages(round_, grid, config.local_epochs)
        replies = exchange(grid, messages, strategy.timeout, traffic)
        updates = strategy.accepted_updates(round_, replies)
        if updates is None:
            return server.table.clone()
        return strategy.learning.local_view(round_, updates)[0]

    histories = histories or {}
    if method in REPLAYED and method not in histories:
        raise FedShareError(f"{method} needs the history recorded while learning: run the "
                            f"learning phase with unlearning={method}, not a resumed run")
    if method == "fru":
        last = replay_fru(grid, strategy, histories["fru"], replay or ReplayConfig(), first,
                          traffic)
    elif method == "retrain":
        last = retrain(grid, strategy, first, traffic)
    elif method == "cufru":
        leaving = set(np.unique(store.forgotten().users).tolist())
        last = replay_cufru(grid, strategy, histories["cufru"], leaving,
                            replay or ReplayConfig(), first, traffic)
    else:
        run_algorithm2(server, store, replace(config, **VARIANTS[method]), first,
                       remaining_round)
        last = first + config.rounds
    if method in (*REPLAYED, "retrain"):  # one snapshot left, the final table (the audit's rule)
        complete_erasure(server, store)
    if method in REPLAYED:
        drop_history(histories[method])
    if strategy.store is not None:  # D_s without the requests and the unlearned table, at once
        strategy.store.serve(strategy.store.pending(), (last, server.table,
                                                        list(server.snapshots),
                                                        server.state()))
    return summary()


def drop_history(history: RoundRecorder) -> None:
    """A replay's history has served: every store of it is emptied (its rows were computed
    from models the forgotten data had shaped)."""
    for value in vars(history).values():
        if isinstance(value, RowStore):
            value.drop()
