"""The FedShare ServerApp: share round, learning rounds, final evaluation, run outputs.

Run config ``family = "sequence"`` trains a sequence model instead (:mod:`strategies.sequence_run`);
what follows is the LightGCN family's run.

The server never loads interaction data itself: it learns D_s from the nodes' ``query.share``
replies (each node uploads only its users' I_share) and scores the model through evaluate
messages. Outputs go to ``out-dir``: ``config.json``, ``state.db`` (the state database),
``metrics.csv`` (one row per round, validation metrics where validated), ``item_table.npy`` and
``summary.json`` (:class:`fedshare.federated.summary.RunSummary`). With SecAgg+ (run config
``defence`` naming ``secagg``, :mod:`strategies.secagg`) each round's row adds its
``secagg-bytes-down``, ``secagg-bytes-up`` and ``secagg-seconds``, and ``secagg.json`` holds the
settings and every SecAgg+ round's stages (messages, bytes each way, seconds), the unlearning
phase's remaining-data rounds included.
"""

from __future__ import annotations

import json
import time
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
from flwr.app import Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from fedshare import protocol
from fedshare.atomic import write_atomically, write_json
from fedshare.errors import FedShareError
from fedshare.federated.directory import Directory, build_directory
from fedshare.federated.recording import RoundRecorder
from fedshare.federated.rounds import PROGRESS, progress_line
from fedshare.federated.state_db import StateDB, open_store, stored_directory
from fedshare.federated.summary import RunSummary
from fedshare.reports import metrics_frame
from fedshare.run_lease import RunLease
from fedshare.runconfig import ServerSettings, fru_settings, model_family
from fedshare.storage_ledger import FRU_CLIENT
from fedshare.unlearning.cufru import TransferStation
from fedshare.unlearning.fru import FruHistory, FruSettings
from fedshare.unlearning.replay import ReplayConfig
from strategies.audit import MessageAudit
from strategies.fedshare import FedShareStrategy
from strategies.inbox import Inbox
from strategies.nodes import wait_for_nodes
from strategies.sequence_run import serve_sequences
from strategies.unlearning import run_unlearning

app = ServerApp()


def share_round(grid: Grid, nodes: list[int], inbox: Inbox, stored: Path | None,
                bind: bool, timeout: float = 3600) -> Directory:
    """Ask every node for its users and its I_share and build the directory and D_s from the
    replies (a resumed run keeps its catalogue and, with ``bind``, its user bindings). A node
    that fails, is late or sends a reply that cannot be read or is refused takes no part."""
    replies = grid.send_and_receive([protocol.share_request(node) for node in nodes],
                                    timeout=timeout)
    read = [reply for _, reply in inbox.read("share", 0, replies, protocol.read_share_reply)]
    catalogue, bound = stored_directory(stored) if stored is not None else (None, {})
    directory, refused = build_directory(read, catalogue, bound if bind else {})
    for node, reason in refused:
        inbox.reject("share", 0, node, reason)
    return directory


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = ServerSettings.read(context.run_config)
    with RunLease(settings.out_dir):  # the run folder's only writer while this server lives
        if model_family(context.run_config) == "sequence":
            if settings.secagg is not None:
                log(WARNING, "defence=secagg covers the lightgcn family's train rounds; the "
                    "sequence family's rounds are not summed securely")
            serve_sequences(grid, settings)
        else:
            serve(grid, settings)


def serve(grid: Grid, settings: ServerSettings) -> None:
    """The whole run: nodes, share round, state database, learning and unlearning, outputs."""
    started = time.perf_counter()
    inbox = Inbox(MessageAudit(settings.audit_dir) if settings.audit_dir else None)
    nodes = wait_for_nodes(grid, settings.num_nodes, settings.node_timeout, settings.max_failed)
    path = settings.out_dir / "state.db"
    log(INFO, "%s share round: %d nodes", PROGRESS, len(nodes))
    # Simulated nodes draw new ids every run and are not authenticated: nothing to bind to.
    directory = share_round(grid, nodes, inbox, path if path.exists() else None, settings.bind,
                            settings.round_timeout)
    store = open_store(path, directory, settings.config, settings.bind)
    try:
        summary, strategy = run(grid, settings, directory, store, inbox)
        summary.nodes, summary.seconds = len(nodes), time.perf_counter() - started
        write_outputs(settings.out_dir, strategy, store, summary)
    finally:
        store.close()
    log(INFO, "%s done  test HR@20 %.4f  NDCG@20 %.4f  -> %s", PROGRESS,
        summary.test.get("hr@20", float("nan")), summary.test.get("ndcg@20", float("nan")),
        settings.out_dir)
    print(json.dumps(summary.to_dict()))


def run(grid: Grid, settings: ServerSettings, directory: Directory, store: StateDB,
        inbox: Inbox) -> tuple[RunSummary, FedShareStrategy]:
    """The learning rounds left to run, the final scores, then the unlearning phase if asked."""
    config = settings.config
    resumed = store.last_round()
    if store.pending() and config.rounds > resumed:
        raise FedShareError("acknowledged unsharing requests wait to be served: resume with "
                            f"rounds={resumed} first")
    replayed = settings.unlearning is not None and settings.method in ("fru", "cufru")
    if replayed and resumed > 0:
        raise FedShareError(f"unlearning={settings.method} replays a history kept in memory "
                            "while learning; a resumed run does not have it: start afresh")
    strategy = FedShareStrategy(
        config, directory, lambda row: log(INFO, "%s %s", PROGRESS, progress_line(row)), inbox,
        settings.max_failed, store, settings.round_timeout,
        recorders(settings.method, settings.run_config) if replayed else (), settings.secagg,
        settings.defence is not None and settings.defence.hidden)
    strategy.resume(store)
    write_json(settings.out_dir / "config.json", settings.recorded())
    strategy.validate_missed(grid)
    if resumed < config.rounds:
        strategy.start(grid, protocol.table_record(strategy.server.table),
                       num_rounds=config.rounds - resumed, timeout=strategy.timeout)
    scores = strategy.kept_scores(grid)
    phase = None
    if settings.unlearning is not None:
        learned = store.scores(config.rounds) or scores  # kept before the phase began
        phase = run_unlearning(grid, strategy, settings.unlearning,
                               (learned["valid"], learned["test"]), settings.method,
                               strategy.stop_recording(), ReplayConfig(**(settings.replay or {})))
        scores = strategy.kept_scores(grid)
    server = strategy.server
    summary = RunSummary(config.variant, config.rounds, "flower", scores["valid"],
                         scores["test"], 0.0, len(directory.shared), server.snapshot_bytes(),
                         len(server.snapshots), server.ledger.held(kind=FRU_CLIENT),
                         rejected_replies=strategy.rejected, resumed_from_round=resumed,
                         phase=phase, mending=server.mending_stats())
    return summary, strategy


def recorders(method: str, run_config: dict) -> tuple[RoundRecorder, ...]:
    """What the server records while learning for FRU's or CUFRU's replay."""
    if method == "fru":
        return (FruHistory(fru_settings(run_config) or FruSettings()),)
    return (TransferStation(),)


def write_outputs(out_dir: Path, strategy: FedShareStrategy, store: StateDB,
                  summary: RunSummary) -> None:
    """``metrics.csv`` (every round the store kept, a resumed run's earlier ones included),
    ``item_table.npy``, ``summary.json`` and, with SecAgg+, ``secagg.json`` (this process's
    rounds), each written whole."""
    metrics = metrics_frame(store.rows("round"), store.rows("validation"))
    write_atomically(out_dir / "metrics.csv", lambda fh: metrics.to_csv(fh, index=False), "w")
    write_atomically(out_dir / "item_table.npy",
                     lambda fh: np.save(fh, strategy.server.table.numpy()))
    write_json(out_dir / "summary.json", summary.to_dict())
    if strategy.secure is not None:
        write_json(out_dir / "secagg.json", {"settings": strategy.secure.settings.to_run_config(),
                                             "rounds": strategy.secure.history})
