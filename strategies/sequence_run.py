"""The sequence family's whole run (run config ``family = "sequence"``): devices, the learning
rounds of :class:`strategies.sequence.SequenceStrategy`, the test of the kept model, then, with
``unlearn = true``, the unlearning phase (:mod:`strategies.sequence_unlearning`), and the
outputs, each written whole: ``config.json``, ``metrics.csv``, ``model.npy`` (the kept learned
vector), with unlearning ``requests.json`` and ``unlearned_model.npy``, and last
``summary.json``.
"""

from __future__ import annotations

import time
from logging import INFO
from typing import Any

import numpy as np
from flwr.common import log
from flwr.serverapp import Grid

from fedshare import protocol
from fedshare.atomic import write_atomically, write_json
from fedshare.federated.rounds import PROGRESS
from fedshare.runconfig import ServerSettings, sequence_config, sequence_unlearning
from fedshare.sequences.config import SequenceConfig
from fedshare.sequences.directory import SequenceDirectory, build_directory
from fedshare.sequences.summary import SequenceSummary
from strategies.audit import MessageAudit
from strategies.inbox import Inbox
from strategies.nodes import wait_for_nodes
from strategies.sequence import SequenceStrategy
from strategies.sequence_unlearning import serve_unlearning


def describe_devices(grid: Grid, nodes: list[int], inbox: Inbox, timeout: float
                     ) -> SequenceDirectory:
    """Ask every node for its devices; a node whose report is refused takes no part."""
    replies = grid.send_and_receive([protocol.sequence_devices_request(n) for n in nodes],
                                    timeout=timeout)
    reports = [r for _, r in inbox.read("devices", 0, replies,
                                        protocol.read_sequence_devices_reply)]
    directory, refused = build_directory(reports)
    for node, reason in refused:
        inbox.reject("devices", 0, node, reason)
    return directory


def serve_sequences(grid: Grid, settings: ServerSettings) -> None:
    """The whole sequence run: nodes, devices, rounds, test of the best model, outputs."""
    started = time.perf_counter()
    config = sequence_config(settings.run_config)
    inbox = Inbox(MessageAudit(settings.audit_dir) if settings.audit_dir else None)
    nodes = wait_for_nodes(grid, settings.num_nodes, settings.node_timeout, settings.max_failed)
    log(INFO, "%s sequence devices round: %d nodes", PROGRESS, len(nodes))
    directory = describe_devices(grid, nodes, inbox, settings.round_timeout)
    strategy = SequenceStrategy(config, directory, inbox, settings.max_failed)
    out = settings.out_dir
    write_json(out / "config.json", recorded(config, settings))
    strategy.start(grid, protocol.model_record(strategy.server.table),
                   num_rounds=config.rounds, timeout=settings.round_timeout)
    test = strategy.test_best(grid, settings.round_timeout)
    traffic = {k: t.to_dict() for k, t in strategy.traffic.items()}
    metrics = strategy.log.frame()
    write_atomically(out / "metrics.csv", lambda fh: metrics.to_csv(fh, index=False), "w")
    write_atomically(out / "model.npy", lambda fh: np.save(fh, strategy.best.numpy()))
    unlearning = sequence_unlearning(settings.run_config)
    phase = None if unlearning is None else serve_unlearning(
        grid, strategy, unlearning, test, inbox, out, settings.round_timeout,
        settings.max_failed)
    summary = SequenceSummary(
        "flower", config.backbone, config.rounds, strategy.best_round, strategy.best_valid,
        test, time.perf_counter() - started, directory.counts(), len(strategy.server.table),
        len(directory.nodes()), traffic, inbox.rejected, unlearning=phase)
    write_json(out / "summary.json", summary.to_dict())
    log(INFO, "%s done  test Recall@10 %.4f  NDCG@10 %.4f  -> %s", PROGRESS,
        test.get("recall@10", float("nan")), test.get("ndcg@10", float("nan")), out)


def recorded(config: SequenceConfig, settings: ServerSettings) -> dict[str, Any]:
    """``config.json``: the family, its settings and how the run was served."""
    return {"family": "sequence", **config.to_dict(), "num_nodes": settings.num_nodes,
            "out_dir": str(settings.out_dir), "node_timeout": settings.node_timeout,
            "round_timeout": settings.round_timeout, "max_failed": settings.max_failed}

