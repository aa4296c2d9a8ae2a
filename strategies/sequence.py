"""The sequence family's server (run config ``family = "sequence"``): FedAvg over devices.

A run (:func:`strategies.sequence_run.serve_sequences`): ask every node for its devices
(``query.sequence_devices``: the server loads no data), then ``rounds`` rounds on Flower's
strategy loop. Each round samples training devices with
:func:`fedshare.federated.rounds.sample_users` exactly as the in-process
:func:`fedshare.sequences.federated.run_federated` does, sends the global vector to the nodes
serving them (``configure_train``), and averages the accepted replies through the same
:class:`LearningRound` and :class:`SequenceServer` (FedAvg, or FedAdam) in ``aggregate_train``.
Validation devices score the model every ``eval-every`` rounds and after the last; the
best-validation model is kept, then scored by the test devices.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import INFO, WARNING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedshare import protocol
from fedshare.federated.population import NodeUpdate
from fedshare.federated.rounds import PROGRESS, LearningRound, RunLog, sample_users
from fedshare.federated.traffic import Traffic
from fedshare.sequences.config import SequenceConfig
from fedshare.sequences.directory import SequenceDirectory
from fedshare.sequences.federated import SequenceServer, add_sums, make_backbone
from fedshare.sequences.summary import progress_line
from strategies.inbox import Inbox

METRIC = "recall@10"
"""The validation metric that picks the kept model (as ``run_federated``)."""


class SequenceStrategy(Strategy):
    """FedAvg (or FedAdam) of a sequence model over the devices of ``directory``."""

    def __init__(self, config: SequenceConfig, directory: SequenceDirectory, inbox: Inbox,
                 max_failed: float = 0.5) -> None:
        self.config, self.directory, self.inbox = config, directory, inbox
        self.max_failed = max_failed
        torch.manual_seed(config.seed)  # the initial model run_federated starts from
        model = make_backbone(config.backbone, directory.num_items, directory.max_len,
                              config.dim, config.dropout)
        self.server = SequenceServer(model, config.server_optimizer, config.server_lr,
                                     (config.server_beta1, config.server_beta2),
                                     config.server_eps)
        self.log = RunLog(lambda row: log(INFO, "%s %s", PROGRESS, progress_line(
            row["round"], row["seconds"], {k.removeprefix("valid_"): v
                                           for k, v in row.items()})))
        self.learning = LearningRound(self.server, log=self.log)
        self.candidates = directory.candidates()
        self.sampled: dict[int, list[int]] = {}  # node -> devices asked to train, this round
        self.traffic = {"train": Traffic(), "evaluate": Traffic()}
        self.best_round, self.best_valid = 0, {}
        self.best = self.server.table.clone()
        self.train_started = time.perf_counter()

    def summary(self) -> None:
        log(INFO, "\t├──> sequence model %s: %d parameters, %s server", self.config.backbone,
            len(self.server.table), self.config.server_optimizer)
        log(INFO, "\t└──> devices %s on %d nodes", self.directory.counts(),
            len(self.directory.nodes()))

    def _sent(self, kind: str, messages: list[Message], devices: Iterable[int]) -> list[Message]:
        self.traffic[kind].add(devices, sum(protocol.array_bytes(m.content) for m in messages),
                               0, len(messages))
        return messages

    def _received(self, kind: str, replies: Iterable[Message]) -> list[Message]:
        replies = list(replies)
        self.traffic[kind].add((), 0, sum(protocol.array_bytes(r.content) for r in replies
                                          if not r.has_error()), 0)
        return replies

    # ------------------------------------------------------------------------------ train
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Sample the round's training devices and send the model to the nodes serving them
        (a node the SuperLink no longer lists counts as failed)."""
        self.train_started = time.perf_counter()
        sampled = sample_users(self.candidates, self.config.fraction, self.config.seed,
                               server_round)
        self.sampled = self.directory.by_node(sampled)
        online = set(grid.get_node_ids())
        asked = {node: s for node, s in self.sampled.items() if node in online}
        return self._sent("train", protocol.sequence_train_requests(
            server_round, asked, self.server.table), [s for ss in asked.values() for s in ss])

    def problem(self, node: int, update: NodeUpdate) -> str | None:
        """Why a train reply may not be averaged, or ``None``."""
        asked = self.sampled.get(node)
        if asked is None:
            return "a reply from a node that was not asked"
        if update.table.shape != self.server.table.shape or not bool(
                torch.isfinite(update.table).all()):
            return "a model of the wrong size or with non-finite values"
        if (update.num_users, update.weight) != self.directory.expected(asked):
            return "a device count or weight that does not fit the devices asked"
        return None

    def accepted_updates(self, round_: int, replies: Iterable[Message]
                         ) -> list[NodeUpdate] | None:
        """The round's replies that may be averaged (the others are rejected), or ``None``
        when more than ``max_failed`` of the nodes asked gave none (the round changes
        nothing)."""
        updates = []
        for node, update in self.inbox.read(
                "train", round_, self._received("train", replies),
                lambda m: protocol.read_sequence_train_reply(m.content)):
            problem = self.problem(node, update)
            if problem is None:
                updates.append(update)
            else:
                self.inbox.reject("train", round_, node, problem)
        if (len(self.sampled) - len(updates)) / max(len(self.sampled), 1) > self.max_failed:
            log(WARNING, "round %d: %d of %d nodes gave an accepted reply; the round changes "
                "nothing", round_, len(updates), len(self.sampled))
            return None
        return updates

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        train_seconds = time.perf_counter() - self.train_started
        updates = self.accepted_updates(server_round, replies)
        table = self.learning(server_round, updates, train_seconds)
        row = self.log.rounds[-1]
        return protocol.model_record(table), protocol.train_metrics(row["num-users"],
                                                                    row["num-examples"])

    # --------------------------------------------------------------------------- evaluate
    def evaluate_messages(self, part: str, grid: Grid) -> list[Message]:
        """Ask every connected node serving devices of ``part`` to score the model."""
        code = protocol.SEQ_PARTS[part]
        devices = [s for s, p in self.directory.part_of.items() if p == code]
        online = set(grid.get_node_ids())
        nodes = [n for n in self.directory.by_node(devices) if n in online]
        return self._sent("evaluate", protocol.sequence_evaluate_requests(
            nodes, self.server.table, (part,)), devices)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.evaluate_messages("valid", grid) \
            if self.config.is_eval_round(server_round) else []

    def scores(self, round_: int, replies: Iterable[Message], part: str) -> dict[str, float]:
        """The nodes' metric sums over their prediction points divided by the count; unsound
        replies are rejected (:func:`fedshare.protocol.read_evaluate_reply`)."""
        read = self.inbox.read("evaluate", round_, self._received("evaluate", replies),
                               lambda m: protocol.read_evaluate_reply(m.content, (part,)))
        return add_sums([scores[part] for _, scores in read])

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        """Log the validation and keep the model if it is the best so far."""
        valid = self.scores(server_round, replies, "valid")
        if not valid:
            return None
        self.log.validation(server_round, valid)
        if not self.best_valid or valid[METRIC] > self.best_valid[METRIC]:
            self.best_round, self.best_valid = server_round, valid
            self.best = self.server.table.clone()
        return MetricRecord(valid)

    def test_best(self, grid: Grid, timeout: float) -> dict[str, float]:
        """Make the best-validation model the global one and score it on the test devices."""
        self.server.restore(self.best)
        replies = grid.send_and_receive(self.evaluate_messages("test", grid), timeout=timeout)
        return self.scores(self.config.rounds, replies, "test")
