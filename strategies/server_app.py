"""The FedShare ServerApp: share round, learning rounds, final evaluation, run outputs.

The server never loads interaction data itself: it learns D_s from the nodes' ``query.share``
replies (each node uploads only its users' I_share) and scores the model through evaluate
messages. Outputs go to ``out-dir``: ``config.json``, ``metrics.csv`` (one row per validation)
and ``summary.json`` (final validation and test HR/NDCG/Recall@20, wall time, bytes kept).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
import pandas as pd
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from fedshare.data.interactions import Interactions
from fedshare.errors import FedShareError
from fedshare.federated.config import FederatedConfig
from fedshare.federated.durable import ServerStore
from fedshare.federated.runconfig import federated_config, unlearning_config
from fedshare.federated.validation import share_problem
from fedshare.reports import metrics_frame, write_atomically, write_json
from fedshare.unlearning.fru import KIND as FRU_KIND
from strategies.audit import MessageAudit
from strategies.fedshare import Directory, FedShareStrategy
from strategies.records import table_record
from strategies.unlearning import run_unlearning

app = ServerApp()
PROGRESS = "fedshare-progress"
RESUMABLE = ("rounds", "eval_every")  # settings a resumed run may change


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


@dataclass
class ShareReply:
    """One node's share reply, read but not yet trusted."""

    node: int
    served: np.ndarray
    counts: np.ndarray
    users: np.ndarray
    items: np.ndarray
    catalogue: tuple[int, int]


def share_replies(grid: Grid, nodes: list[int], audit: MessageAudit | None,
                  timeout: float = 3600) -> list[ShareReply]:
    """Ask every node for its users and its I_share. A node that fails, is late or sends a
    reply that cannot be read takes no part in the run (logged)."""
    messages = [Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node,
                        message_type="query.share") for node in nodes]
    replies = []
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            log(WARNING, "node %d sent no share reply: %s", node, reply.error.reason)
            continue
        try:  # untrusted input: any failure to read it rejects it
            arrays, metrics = reply.content["arrays"], reply.content["metrics"]
            read = ShareReply(node, arrays["served-users"].numpy(),
                              arrays["local-counts"].numpy(), arrays["share-users"].numpy(),
                              arrays["share-items"].numpy(),
                              (int(metrics["num-users-total"]), int(metrics["num-items"])))
            if audit is not None:
                audit.record("share", 0, reply)
        except Exception as exc:
            log(WARNING, "rejected the share reply of node %d: malformed (%s: %s)", node,
                type(exc).__name__, exc)
            continue
        replies.append(read)
    return sorted(replies, key=lambda r: r.node)  # order-independent


def build_directory(replies: list[ShareReply], catalogue: tuple[int, int] | None = None,
                    bound: dict[int, int] | None = None) -> Directory:
    """D_s (Eq. 7) and who serves whom, from the readable share replies.

    The catalogue is the stored one on a resumed run, else the one most nodes report; a node
    reporting another is rejected. A node claiming a user bound to another node (``bound``,
    kept across restarts) or already claimed in this round is rejected; so is a node whose
    local counts are not one non-negative integer per served user.
    """
    if catalogue is None:
        sizes = Counter(r.catalogue for r in replies if min(r.catalogue) > 0)
        if not sizes:
            raise FedShareError("no node sent an acceptable share reply")
        catalogue = min(sizes, key=lambda size: (-sizes[size], size))
    bound = bound or {}
    node_users: dict[int, np.ndarray] = {}
    counts: dict[int, int] = {}
    users, items = [], []
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
            log(WARNING, "rejected the share reply of node %d: %s", reply.node, problem)
            continue
        node_users[reply.node] = reply.served
        counts.update(zip(reply.served.tolist(), reply.counts.tolist(), strict=True))
        users.append(reply.users)
        items.append(reply.items)
    if not node_users:
        raise FedShareError("no node sent an acceptable share reply")
    shared = Interactions.from_arrays(np.concatenate(users), np.concatenate(items), *catalogue)
    return Directory(node_users, counts, shared)


def open_store(path: Path, directory: Directory, config: FederatedConfig,
               bind: bool = True) -> ServerStore:
    """The run directory's durable store: a new one takes D_s from the share round; an existing
    one (a resumed run) is authoritative for D_s, since requests it served deleted
    interactions the devices still hold. A resumed run must use the same settings, the number
    of rounds and the evaluation period aside. With ``bind``, users newly announced are bound
    to their nodes for good."""
    shared = directory.shared
    try:
        store = ServerStore(path, shared.num_users, shared.num_items)
    except ValueError as exc:
        raise FedShareError(str(exc)) from None
    settings = {k: v for k, v in config.to_dict().items() if k not in RESUMABLE}
    stored = store.settings()
    if stored is None:
        store.set_shared(shared)
        store.set_settings(settings)
    elif stored != json.loads(json.dumps(settings)):
        changed = sorted(k for k in settings if stored.get(k) != settings[k])
        store.close()
        raise FedShareError(f"{path} belongs to a run with other settings ({', '.join(changed)})"
                            "; use a new out-dir")
    else:
        directory.shared = store.shared()
    if bind:
        store.bind(directory.user_node)
    return store


def stored_directory(path: Path) -> tuple[tuple[int, int] | None, dict[int, int]]:
    """The catalogue and user bindings of an existing store (a resumed run)."""
    try:
        catalogue = ServerStore.catalogue_of(path)
        if catalogue is None:
            return None, {}
        store = ServerStore(path, *catalogue)
    except ValueError as exc:
        raise FedShareError(str(exc)) from None
    try:
        return catalogue, store.bindings()
    finally:
        store.close()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_config = context.run_config
    config = federated_config(run_config)
    unlearning = unlearning_config(run_config)
    out_dir = Path(str(run_config.get("out-dir") or f"runs/flwr-{time.strftime('%Y%m%d-%H%M%S')}"))
    out_dir.mkdir(parents=True, exist_ok=True)
    audit = MessageAudit(str(run_config["audit-dir"])) if run_config.get("audit-dir") else None
    started = time.perf_counter()
    max_failed = float(run_config.get("max-failed-fraction", 0.5))
    nodes = wait_for_nodes(grid, int(run_config.get("num-nodes", 2)),
                           float(run_config.get("node-timeout", 120)), max_failed)
    replies = share_replies(grid, nodes, audit, float(run_config.get("round-timeout", 3600)))
    path = out_dir / "state.db"
    # Simulated nodes draw new ids every run and are not authenticated: nothing to bind to.
    bind = bool(run_config.get("bind-users", True))
    catalogue, bound = stored_directory(path) if path.exists() else (None, {})
    directory = build_directory(replies, catalogue, bound if bind else {})

    def progress(row: dict) -> None:
        log(INFO, "%s round %d  %.1f s  valid HR@20 %.4f  NDCG@20 %.4f", PROGRESS, row["round"],
            row["seconds"], row["valid_hr@20"], row["valid_ndcg@20"])

    store = open_store(path, directory, config, bind)
    resumed = store.last_round()
    if store.pending() and config.rounds > resumed:
        store.close()
        raise FedShareError("acknowledged unsharing requests wait to be served: resume with "
                            f"rounds={resumed} first")
    strategy = FedShareStrategy(config, directory, progress, audit, max_failed, store)
    strategy.timeout = float(run_config.get("round-timeout", 3600))
    strategy.resume(store)
    write_json(out_dir / "config.json", {**config.to_dict(), **{
        k: v for k, v in run_config.items() if k not in config.to_run_config()}})
    if resumed < config.rounds:
        strategy.start(grid, table_record(strategy.server.table),
                       num_rounds=config.rounds - resumed, timeout=strategy.timeout)
    scores = strategy.evaluate_now(grid)
    valid, test = scores["valid"], scores["test"]
    phase: dict = {}
    if unlearning is not None:
        learned = {"learned_valid": valid, "learned_test": test}
        phase = {**learned, **run_unlearning(grid, strategy, unlearning)}
        scores = strategy.evaluate_now(grid)
        valid, test = scores["valid"], scores["test"]
    metrics = metrics_frame(strategy.rounds, strategy.history)
    if resumed and (out_dir / "metrics.csv").exists():  # the rounds before the restart first
        earlier = pd.read_csv(out_dir / "metrics.csv")
        metrics = pd.concat([earlier[earlier["round"] <= resumed], metrics], ignore_index=True)
    write_atomically(out_dir / "metrics.csv", lambda fh: metrics.to_csv(fh, index=False), "w")
    write_atomically(out_dir / "item_table.npy",
                     lambda fh: np.save(fh, strategy.server.table.numpy()))
    summary = {"variant": config.variant, "rounds": config.rounds, "engine": "flower",
               "valid": valid, "test": test, "seconds": time.perf_counter() - started,
               "nodes": len(nodes), "shared_interactions": len(directory.shared),
               "snapshot_bytes": strategy.server.snapshot_bytes(),
               "fru_client_bytes": strategy.server.ledger.held(kind=FRU_KIND),
               "rejected_replies": strategy.rejected,
               "snapshots": len(strategy.server.snapshots), "resumed_from_round": resumed,
               **phase}
    store.close()
    write_json(out_dir / "summary.json", summary)
    log(INFO, "%s done  test HR@20 %.4f  NDCG@20 %.4f  -> %s", PROGRESS,
        test.get("hr@20", float("nan")), test.get("ndcg@20", float("nan")), out_dir)
    print(json.dumps(summary))
