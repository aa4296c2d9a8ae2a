"""The FedShare learning-phase strategy on Flower's ``flwr.serverapp.strategy.Strategy`` API.

Each round (Algorithm 1): sample users (Sec. IV-B1) and send V_s to the nodes serving them
(``configure_train``); read and check their replies (:class:`strategies.inbox.Inbox`,
:class:`fedshare.federated.validation.ReplyChecks`) and hand the accepted ones to the round every
engine runs (:class:`fedshare.federated.rounds.LearningRound`: Eq. 16 aggregation, the server's
refinement of Eq. 17-18, the durable commit, the metrics row) in ``aggregate_train``. Validation
follows :func:`fedshare.federated.rounds.is_eval_round`. This class only routes messages; the
wire format is :mod:`fedshare.protocol`. With SecAgg+ (run config ``defence`` naming ``secagg``)
the train exchange of every round is :class:`strategies.secagg.SecureRounds`': its setup and key
exchange run in ``configure_train`` on the grid, its unmasking in ``aggregate_train``, and the
round aggregates the one summed update it yields.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedshare import protocol
from fedshare.federated.config import FederatedConfig
from fedshare.federated.directory import Directory
from fedshare.federated.population import NodeUpdate
from fedshare.federated.recording import RoundRecorder
from fedshare.federated.rounds import LearningRound, RunLog, is_eval_round, sample_users
from fedshare.federated.server import Server
from fedshare.federated.state_db import CommitRounds, StateDB, restore_server
from fedshare.federated.validation import ReplyChecks
from fedshare.runconfig import SecAggSettings
from strategies.inbox import Inbox
from strategies.secagg import SecureRounds


class FedShareStrategy(Strategy):
    """FedShare and its learning-phase variants (``config.variant``).

    Args:
        config: the run's settings.
        directory: node -> users map, |I_local| per user, and the shared data D_s.
        progress: called with each validation row.
        inbox: where replies are audited, read and rejected (a new one by default).
        max_failed: the largest fraction of a round's nodes that may fail (else the round
            changes nothing).
        store: the state database; every finished round is committed to it.
        timeout: seconds a round waits for replies.
        recorders: learning-phase histories of an unlearning baseline (FRU's participants and
            server rows, CUFRU's station); they see each learning round's accepted replies.
        secagg: SecAgg+ settings: every train exchange (learning rounds and the unlearning
            phase's remaining-data rounds) is summed securely (:mod:`strategies.secagg`); the
            server then sees one summed update per round, never a node's own.
        hidden: the ``hidden`` defence: every round asks every trainable user, and each
            device decides itself whether it trains (:func:`fedshare.defences.self_sampled`),
            so the server does not know whose update a sum holds.
    """

    def __init__(self, config: FederatedConfig, directory: Directory,
                 progress: Callable[[dict], None] | None = None, inbox: Inbox | None = None,
                 max_failed: float = 0.5, store: StateDB | None = None,
                 timeout: float = 3600.0, recorders: tuple[RoundRecorder, ...] = (),
                 secagg: SecAggSettings | None = None, hidden: bool = False) -> None:
        self.config = config
        self.directory = directory
        self.server = Server(directory.shared, config)
        self.checks = ReplyChecks(self.server.num_items, config.dim, directory.local_counts,
                                  self.server.ledger, max_failed)
        self.inbox = inbox or Inbox()
        self.log = RunLog(progress)
        self.recorders = recorders
        for recorder in recorders:
            recorder.begin(self.server.ledger, *self.server.checkpoint(),
                           np.unique(directory.shared.users))
        hooks = (CommitRounds(store, self.server, self.log),) if store is not None else ()
        self.learning = LearningRound(self.server, (*recorders, *hooks), self.log)
        self.user_node = directory.user_node
        self.candidates = directory.trainable()
        self.store = store
        self.timeout = timeout
        self.offset = 0  # rounds already done when Flower's loop (numbered from 1) starts
        self.sampled: dict[int, list[int]] = {}  # node -> users asked to train, this round
        self.accepted: list[tuple[int, NodeUpdate, list]] = []  # node, update, sparse rows
        self.train_started = time.perf_counter()
        self.hidden = hidden
        self.secure = None if secagg is None else SecureRounds(secagg, self.inbox, timeout,
                                                               config.seed)

    def mark(self) -> protocol.RunMark:
        """The run key and last committed round every request carries (devices rewind to
        that round after a restart)."""
        if self.store is None:
            return protocol.RunMark()
        return protocol.RunMark(self.store.run_key, self.store.last_round())

    @property
    def rejected(self) -> list[dict]:
        return self.inbox.rejected

    def resume(self, store: StateDB) -> int:
        """Continue from the store's last committed round; Flower's round ``r`` becomes round
        ``last + r``."""
        self.offset = restore_server(self.server, store)
        return self.offset

    def summary(self) -> None:
        log(INFO, "\t├──> FedShare variant %s, %d nodes, %d trainable users",
            self.config.variant, len(self.directory.node_users), len(self.candidates))
        log(INFO, "\t└──> shared interactions |D_s| = %d", len(self.directory.shared))

    # ------------------------------------------------------------------------------ train
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.train_messages(server_round + self.offset, grid)

    def train_messages(self, round_: int, grid: Grid, local_epochs: int | None = None
                       ) -> list[Message]:
        """Sample round ``round_``'s users (Sec. IV-B1) and ask their nodes to train them
        (with ``hidden``, ask every trainable user: the devices sample themselves).

        Nodes the SuperLink no longer lists as connected are not sent anything; they count
        as failed nodes of the round.
        """
        self.train_started = time.perf_counter()
        users = self.candidates if self.hidden else sample_users(
            self.candidates, self.config.fraction, self.config.seed, round_)
        self.sampled = {}
        for u in users:
            self.sampled.setdefault(self.user_node[int(u)], []).append(int(u))
        online = set(grid.get_node_ids())
        asked = {node: us for node, us in self.sampled.items() if node in online}
        if self.secure is None:
            return protocol.train_requests(round_, asked, self.server.table, self.mark(),
                                           local_epochs)
        # the weight every asked user may bring (|I_local|, known since the share round)
        scale = sum(self.directory.local_counts.get(u, 0) for us in asked.values() for u in us)
        messages = self.secure.prepare(round_, grid, asked, self.server.table, self.mark(),
                                       local_epochs, max(scale, 1))
        self.train_started = time.perf_counter()  # train-seconds: the train exchange alone
        return messages

    def accepted_updates(self, round_: int, replies: Iterable[Message]
                         ) -> list[NodeUpdate] | None:
        """The round's updates that may be averaged, or ``None`` when more than
        ``max_failed`` of the nodes asked gave no accepted one (the round changes nothing).
        With SecAgg+ the one update is the survivors' sum (:meth:`secure_update`)."""
        if self.secure is not None:
            update, answered = self.secure_update(round_, replies)
            updates, unmasked = ([] if update is None else [update]), update is not None
        else:
            read = self.inbox.read("train", round_, replies, lambda m: m.content)
            updates = self.accept_replies(round_, list(read))
            answered, unmasked = len(updates), True
        if not unmasked or self.checks.too_many_failures(len(self.sampled), answered):
            log(WARNING, "round %d: %d of %d nodes gave an accepted reply; the round changes "
                "nothing", round_, answered, len(self.sampled))
            return None
        return updates

    def secure_update(self, round_: int, replies: Iterable[Message]
                      ) -> tuple[NodeUpdate | None, int]:
        """The SecAgg+ round's summed update, if it could be unmasked and passes the checks a
        sum allows, and how many nodes' masked replies it sums.

        The checks of :meth:`ReplyChecks.train_problem`, applied to the sum instead of each
        node's update: shape and dtype, finite values, a weight within the |I_local| of the
        survivors' asked users, no more trained users than they were, no row weight above
        the weight. A node's own NaN, weight or user count cannot be seen; what bounds a node
        is the protocol: each coordinate of its update is clipped to ``secagg-clip`` before it
        is masked, and a sum outside what the survivors' encodings can add up to is refused
        (:func:`fedshare.secure_sum.decode`). A refused sum fails the whole round.
        """
        assert self.secure is not None
        self.accepted = []
        update, survivors = self.secure.finish(round_, replies, self.server.table)
        if update is None:
            return None, len(survivors)
        asked = [u for node in survivors for u in self.sampled.get(node, [])]
        problem = self.checks.train_problem(asked, update, [])
        if problem is not None:
            self.inbox.reject("train", round_, -1, f"the sum of nodes {survivors}: {problem}")
            return None, len(survivors)
        return update, len(survivors)

    def accept_replies(self, round_: int, replies: list[tuple[int, RecordDict]]
                       ) -> list[NodeUpdate]:
        """The train replies that may be averaged; the others are rejected."""
        self.accepted = []
        for node, content in replies:
            asked = self.sampled.get(node)
            try:
                update, fru = protocol.read_train_reply(content, asked or [])
                sparse = protocol.read_sparse_updates(content, asked or [],
                                                      self.server.num_items, self.config.dim)
            except Exception as exc:  # untrusted input: any failure rejects it
                self.inbox.reject("train", round_, node,
                                  f"malformed ({type(exc).__name__}: {exc})")
                continue
            problem = self.checks.train_problem(asked, update, fru)
            if problem is not None:
                self.inbox.reject("train", round_, node, problem)
                continue
            self.accepted.append((node, update, sparse))
        return [update for _, update, _ in self.accepted]

    def record(self, round_: int, updates: list[NodeUpdate] | None) -> None:
        """Show a learning round's accepted replies to the recorders (not unlearning's)."""
        if updates is None or not self.recorders:
            return
        users = [u for node, _, _ in self.accepted for u in self.sampled[node]
                 if self.directory.local_counts.get(u, 0) > 0]
        weights = torch.tensor([float(self.directory.local_counts[u]) for u in users])
        sparse = [row for _, _, rows in self.accepted for row in rows]
        for recorder in self.recorders:
            recorder.nodes(round_, torch.tensor(users, dtype=torch.int64), weights,
                           updates, self.server.table, sparse)

    def stop_recording(self) -> dict[str, RoundRecorder]:
        """Learning is over: the recorders' histories, by name; later rounds are not part
        of them."""
        histories = {r.name: r for r in self.recorders}
        self.learning.hooks = tuple(h for h in self.learning.hooks if h not in self.recorders)
        self.recorders = ()
        return histories

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        round_ = server_round + self.offset
        train_seconds = time.perf_counter() - self.train_started
        updates = self.accepted_updates(round_, replies)
        self.record(round_, updates)
        extra = self.secure.row(round_) if self.secure is not None else None
        table = self.learning(round_, updates, train_seconds, extra)
        row = self.log.rounds[-1]
        return protocol.table_record(table), protocol.train_metrics(row["num-users"],
                                                                    row["num-examples"])

    # --------------------------------------------------------------------------- evaluate
    def evaluate_messages(self, parts: tuple[str, ...], grid: Grid) -> list[Message]:
        """Evaluate on every connected node of the directory."""
        online = set(grid.get_node_ids())
        return protocol.evaluate_requests(
            [node for node in self.directory.node_users if node in online], self.server.table,
            parts, self.mark())

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        round_ = server_round + self.offset
        return self.evaluate_messages(("valid",), grid) \
            if is_eval_round(round_, self.config) else []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        round_ = server_round + self.offset
        valid = self.scores(round_, replies, ("valid",))["valid"]
        if not valid:
            return None
        self.log.validation(round_, valid)
        if self.store is not None:
            self.store.add_row("validation", round_, self.log.validations[-1])
        return MetricRecord(valid)

    def validate_missed(self, grid: Grid) -> None:
        """A resumed run first validates its last committed round if that was due but the
        run stopped before its validation was kept."""
        round_ = self.offset
        if self.store is None or not round_ or not is_eval_round(round_, self.config) or any(
                row["round"] == round_ for row in self.store.rows("validation")):
            return
        replies = grid.send_and_receive(self.evaluate_messages(("valid",), grid),
                                        timeout=self.timeout)
        self.aggregate_evaluate(0, replies)

    def kept_scores(self, grid: Grid) -> dict[str, dict[str, float]]:
        """The full scores of the last committed table: kept in the store when first
        evaluated, so a resumed run reports what the devices scored before they unshared."""
        if self.store is None:
            return self.evaluate_now(grid)
        round_ = self.store.last_round()
        scores = self.store.scores(round_)
        if scores is None:
            scores = self.evaluate_now(grid)
            self.store.set_scores(round_, scores)
        return scores

    def evaluate_now(self, grid: Grid, parts: tuple[str, ...] = ("valid", "test")
                     ) -> dict[str, dict[str, float]]:
        """Score the current table on ``parts`` across all nodes, in one message per node."""
        replies = grid.send_and_receive(self.evaluate_messages(parts, grid),
                                        timeout=self.timeout)
        return self.scores(self.offset + self.config.rounds, replies, parts)

    def scores(self, round_: int, replies: Iterable[Message], parts: tuple[str, ...]
               ) -> dict[str, dict[str, float]]:
        """Per part, the nodes' metric sums over their users divided by the user count (a
        part no node scored is ``{}``); unsound replies are rejected
        (:func:`fedshare.protocol.read_evaluate_reply`)."""
        sums: dict[str, dict[str, float]] = {part: {} for part in parts}
        counts = dict.fromkeys(parts, 0)
        for _, scores in self.inbox.read(
                "evaluate", round_, replies,
                lambda m: protocol.read_evaluate_reply(m.content, parts)):
            for part, (part_sums, count) in scores.items():
                for name, value in part_sums.items():
                    sums[part][name] = sums[part].get(name, 0.0) + value
                counts[part] += count
        return {part: {} if counts[part] <= 0 else
                {name: value / counts[part] for name, value in sums[part].items()}
                for part in parts}

