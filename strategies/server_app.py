"""The FedShare ServerApp: share round, learning rounds, final evaluation, run outputs.

The server never loads interaction data itself: it learns D_s from the nodes' ``query.share``
replies (each node uploads only its users' I_share) and scores the model through evaluate
messages. Outputs go to ``out-dir``: ``config.json``, ``metrics.csv`` (one row per validation)
and ``summary.json`` (final validation and test HR/NDCG/Recall@20, wall time, bytes kept).
"""

from __future__ import annotations

import json
import time
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from fedshare.data.interactions import Interactions
from fedshare.errors import FedShareError
from fedshare.federated.config import FederatedConfig
from fedshare.federated.durable import ServerStore
from fedshare.federated.runconfig import federated_config, unlearning_config
from fedshare.federated.validation import share_problem
from fedshare.reports import metrics_frame, write_json
from fedshare.unlearning.fru import KIND as FRU_KIND
from strategies.audit import MessageAudit
from strategies.fedshare import Directory, FedShareStrategy
from strategies.records import table_record
from strategies.unlearning import run_unlearning

app = ServerApp()
PROGRESS = "fedshare-progress"
RESUMABLE = ("rounds", "eval_every")  # settings a resumed run may change


def wait_for_nodes(grid: Grid, expected: int, timeout: float) -> list[int]:
    """Block until ``expected`` nodes are connected (simulated nodes register asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= expected:
            return nodes
        if time.monotonic() > deadline:
            raise FedShareError(f"only {len(nodes)} of {expected} nodes connected")
        time.sleep(0.5)


def collect_shares(grid: Grid, nodes: list[int], audit: MessageAudit | None,
                   timeout: float = 3600) -> Directory:
    """Ask every node for its users and its I_share; build D_s (Eq. 7).

    Each user is bound to the (authenticated) node that announced it; a second node claiming
    a user already claimed is rejected. A node that fails or is late takes no part in the run.
    """
    messages = [Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node,
                        message_type="query.share") for node in nodes]
    replies = []
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if reply.has_error():
            log(WARNING, "node %d sent no share reply: %s", reply.metadata.src_node_id,
                reply.error.reason)
        else:
            replies.append(reply)
    node_users, counts, users, items = {}, {}, [], []
    sizes: tuple[int, int] | None = None
    for reply in sorted(replies, key=lambda r: r.metadata.src_node_id):  # order-independent
        if audit is not None:
            audit.record("share", 0, reply)
        node = reply.metadata.src_node_id
        try:
            arrays, metrics = reply.content["arrays"], reply.content["metrics"]
            served, counted = arrays["served-users"].numpy(), arrays["local-counts"].numpy()
            share_users, share_items = (arrays["share-users"].numpy(),
                                        arrays["share-items"].numpy())
            reply_sizes = (int(metrics["num-users-total"]), int(metrics["num-items"]))
        except (KeyError, TypeError, ValueError) as exc:
            log(WARNING, "rejected the share reply of node %d: malformed (%s)", node, exc)
            continue
        claimed = {int(u) for us in node_users.values() for u in us}
        problem = "a catalogue size unlike the other nodes'" if sizes not in (None, reply_sizes) \
            else share_problem(served, share_users, share_items, *reply_sizes, claimed)
        if problem is None and counted.shape != served.shape:
            problem = "local counts do not match the served users"
        if problem is not None:
            log(WARNING, "rejected the share reply of node %d: %s", node, problem)
            continue
        sizes = reply_sizes
        node_users[node] = served
        counts.update(zip(served.tolist(), counted.tolist(), strict=True))
        users.append(share_users)
        items.append(share_items)
    if sizes is None:
        raise FedShareError("no node sent an acceptable share reply")
    shared = Interactions.from_arrays(np.concatenate(users), np.concatenate(items), *sizes)
    return Directory(node_users, counts, shared)


def open_store(path: Path, directory: Directory, config: FederatedConfig) -> ServerStore:
    """The run directory's durable store: a new one takes D_s from the share round; an existing
    one (a resumed run) is authoritative for D_s, since requests it served deleted
    interactions the devices still hold. A resumed run must use the same settings, the number
    of rounds and the evaluation period aside."""
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
    keep_bindings(store, directory)
    return store


def keep_bindings(store: ServerStore, directory: Directory) -> None:
    """A user stays bound to the node that first announced it, across restarts: a node that
    announces a user bound to another node takes no part in the run (logged)."""
    bound = store.bindings()
    for node, users in sorted(directory.node_users.items()):
        if any(bound.get(int(u), node) != node for u in users):
            log(WARNING, "rejected node %d: it announces users bound to another node", node)
            del directory.node_users[node]
            for u in users:
                directory.local_counts.pop(int(u), None)
    if not directory.node_users:
        raise FedShareError("no node may speak for the users it announced")
    store.bind(directory.user_node)


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_config = context.run_config
    config = federated_config(run_config)
    unlearning = unlearning_config(run_config)
    out_dir = Path(str(run_config.get("out-dir") or f"runs/flwr-{time.strftime('%Y%m%d-%H%M%S')}"))
    out_dir.mkdir(parents=True, exist_ok=True)
    audit = MessageAudit(str(run_config["audit-dir"])) if run_config.get("audit-dir") else None
    started = time.perf_counter()
    nodes = wait_for_nodes(grid, int(run_config.get("num-nodes", 2)),
                           float(run_config.get("node-timeout", 120)))
    directory = collect_shares(grid, nodes, audit, float(run_config.get("round-timeout", 3600)))

    def progress(row: dict) -> None:
        log(INFO, "%s round %d  %.1f s  valid HR@20 %.4f  NDCG@20 %.4f", PROGRESS, row["round"],
            row["seconds"], row["valid_hr@20"], row["valid_ndcg@20"])

    store = open_store(out_dir / "state.db", directory, config)
    resumed = store.last_round()
    strategy = FedShareStrategy(config, directory, progress, audit,
                                float(run_config.get("max-failed-fraction", 0.5)), store)
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
    metrics_frame(strategy.rounds, strategy.history).to_csv(out_dir / "metrics.csv",
                                                            index=False)
    np.save(out_dir / "item_table.npy", strategy.server.table.numpy())
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
