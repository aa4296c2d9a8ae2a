"""The FedShare learning-phase strategy on Flower's ``flwr.serverapp.strategy`` API.

Each round (Algorithm 1): sample users (Sec. IV-B1), send V_s to the nodes serving them
(configure_train), average the replies (Eq. 16, :func:`fedshare.federated.aggregation.aggregate`)
and let the server refine the result on G_s (Eq. 17-18, :class:`fedshare.federated.server.Server`)
in aggregate_train. Validation runs every ``eval-every`` rounds on every node. The ML lives in
the Flower-free ``fedshare.federated`` package; this class only routes messages.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from torch import Tensor

from fedshare.data.interactions import Interactions
from fedshare.federated.aggregation import aggregate
from fedshare.federated.config import FederatedConfig
from fedshare.federated.durable import ServerStore
from fedshare.federated.population import NodeUpdate
from fedshare.federated.server import Server
from fedshare.federated.simulate import sample_users
from fedshare.federated.validation import update_problem
from fedshare.storage import client
from fedshare.unlearning.fru import KIND as FRU_KIND
from strategies.audit import MessageAudit
from strategies.records import FRU_BYTES, FRU_USERS, WEIGHT, table_record, update_from


@dataclass
class Directory:
    """What the server learned from the nodes' share replies: who is where, and D_s."""

    node_users: dict[int, np.ndarray]
    local_counts: dict[int, int]
    shared: Interactions

    @property
    def user_node(self) -> dict[int, int]:
        return {int(u): node for node, users in self.node_users.items() for u in users}


class FedShareStrategy(FedAvg):
    """FedShare and its learning-phase variants (``config.variant``).

    Args:
        config: the run's settings.
        directory: node -> users map, |I_local| per user, and the shared data D_s.
        progress: called with each validation row.
        audit: optional log of every reply.
        max_failed: a round completes while at most this fraction of the nodes asked to
            train fail, time out or send a rejected reply; beyond it the round changes nothing.
        store: the durable server state; every completed round is committed to it.
    """

    def __init__(self, config: FederatedConfig, directory: Directory,
                 progress: Callable[[dict], None] | None = None,
                 audit: MessageAudit | None = None, max_failed: float = 0.5,
                 store: ServerStore | None = None) -> None:
        nodes = len(directory.node_users)
        super().__init__(fraction_train=config.fraction, min_train_nodes=1,
                         min_evaluate_nodes=nodes, min_available_nodes=nodes)
        self.config = config
        self.directory = directory
        self.server = Server(directory.shared, config)
        self.user_node = directory.user_node
        self.candidates = np.array(sorted(u for u, n in directory.local_counts.items() if n > 0),
                                   dtype=np.int64)
        self.progress = progress
        self.audit = audit
        self.history: list[dict] = []
        self.rounds: list[dict] = []
        self.started = time.perf_counter()
        self.train_started = self.started
        self.max_failed = max_failed  # the largest fraction of failed nodes a round tolerates
        self.sampled: dict[int, list[int]] = {}  # node -> users asked to train, this round
        self.rejected: list[dict] = []
        self.round_failed = False
        self.store = store
        self.run_key = store.run_key if store is not None else ""
        self.offset = 0  # rounds already done when Flower's loop (numbered from 1) starts
        self.timeout = 3600.0  # seconds a round waits for replies

    def resume(self, store: ServerStore) -> int:
        """Continue from the store's last committed round: V_s, snapshots and the server's
        private state as committed; Flower's round ``r`` becomes round ``last + r``."""
        last = store.last_round()
        table = store.model()
        if last and table is not None:
            self.server.load_state(table, store.state())
            for snapshot in store.snapshots():
                self.server.snapshots.append(snapshot)
        self.offset = last
        return last

    def summary(self) -> None:
        log(INFO, "\t├──> FedShare variant %s, %d nodes, %d trainable users",
            self.config.variant, len(self.directory.node_users), len(self.candidates))
        log(INFO, "\t└──> shared interactions |D_s| = %d", len(self.directory.shared))

    def _messages(self, per_node: dict[int, ConfigRecord], arrays: ArrayRecord,
                  message_type: str) -> list[Message]:
        return [Message(RecordDict({"arrays": arrays, "config": cfg}), dst_node_id=node,
                        message_type=message_type) for node, cfg in per_node.items()]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.train_messages(server_round + self.offset, arrays, config, grid)

    def train_messages(self, round_: int, arrays: ArrayRecord, config: ConfigRecord,
                       grid: Grid) -> list[Message]:
        """Sample round ``round_``'s users (Sec. IV-B1) and ask their nodes to train them.

        Nodes the SuperLink no longer lists as connected are not sent anything; they count
        as failed nodes of the round.
        """
        self.train_started = time.perf_counter()
        users = sample_users(self.candidates, self.config.fraction, self.config.seed, round_)
        per_node: dict[int, list[int]] = {}
        for u in users:
            per_node.setdefault(self.user_node[int(u)], []).append(int(u))
        self.sampled = {node: us for node, us in per_node.items()}
        online = set(grid.get_node_ids())
        return self._messages(
            {node: ConfigRecord({**config, "users": us, "server-round": round_,
                                 "run-key": self.run_key})
             for node, us in per_node.items() if node in online}, arrays, MessageType.TRAIN)

    def local_view(self, server_round: int, replies: Iterable[Message]
                   ) -> tuple[Tensor, list[NodeUpdate]]:
        """Average the accepted replies into the round's local view (Eq. 16).

        Error replies and replies failing :func:`update_problem` are logged and left out. When
        more than ``max_failed`` of the nodes asked did not give an accepted reply, the round
        changes nothing: the view is the current table and ``self.round_failed`` is set.
        """
        valid, errors = self._check_and_log_replies(replies, is_train=True, validate=False)
        for message in errors:
            log(WARNING, "node %d failed: %s", message.metadata.src_node_id, message.error.reason)
        if self.audit is not None:
            for message in valid:
                self.audit.record("train", server_round, message)
        updates = self.accept_replies(server_round,
                                      [(m.metadata.src_node_id, m.content) for m in valid])
        self.round_failed = self.too_many_failures(len(updates))
        if self.round_failed:
            log(WARNING, "round %d: %d of %d nodes gave an accepted reply; the round changes "
                "nothing", server_round, len(updates), len(self.sampled))
            return self.server.table.clone(), []
        extra = self.server.server_client_update(server_round)
        if extra is not None:
            updates.append(extra)
        view = aggregate(self.server.table, updates, self.config.aggregation,
                         self.config.server_lr)
        return view, updates

    def too_many_failures(self, accepted: int) -> bool:
        """Whether more than ``max_failed`` of this round's nodes gave no accepted reply."""
        asked = max(len(self.sampled), 1)
        return (asked - accepted) / asked > self.max_failed

    def accept_replies(self, server_round: int, replies: list[tuple[int, RecordDict]]
                       ) -> list[NodeUpdate]:
        """The train replies that may be averaged; the others are logged in ``rejected``."""
        accepted = []
        for node, content in replies:
            fru: list[tuple[int, int]] = []
            if node not in self.sampled:
                problem: str | None = "a reply from a node that was not asked to train"
            else:
                asked = self.sampled[node]
                try:
                    update = update_from(content["arrays"], content["metrics"])
                    fru = self._fru_report(content["arrays"], asked)
                except Exception as exc:  # untrusted input: any failure rejects it
                    problem = f"malformed reply ({type(exc).__name__}: {exc})"
                else:
                    problem = update_problem(update, self.server.num_items, self.config.dim,
                                             len(asked), sum(self.directory.local_counts.get(
                                                 u, 0) for u in asked))
            if problem is not None:
                log(WARNING, "round %d: rejected the reply of node %d: %s", server_round, node,
                    problem)
                self.rejected.append({"round": server_round, "node": node, "reason": problem})
                continue
            accepted.append(update)
            for user, nbytes in fru:  # FRU's client-side stores, as the nodes report them
                self.server.ledger.set(client(user), FRU_KIND, nbytes)
        return accepted

    @staticmethod
    def _fru_report(arrays: ArrayRecord, asked: list[int]) -> list[tuple[int, int]]:
        """(user, bytes) of the node's FRU stores; only for users it was asked to train."""
        if FRU_USERS not in arrays and FRU_BYTES not in arrays:
            return []
        users, sizes = arrays[FRU_USERS].numpy(), arrays[FRU_BYTES].numpy()
        if users.shape != sizes.shape or users.ndim != 1 or users.dtype.kind != "i" \
                or sizes.dtype.kind != "i" or (sizes < 0).any() or not set(
                    users.tolist()) <= set(asked):
            raise ValueError("an FRU store report that does not fit the users asked")
        return list(zip(users.tolist(), sizes.tolist(), strict=True))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.offset
        replied = time.perf_counter()
        local_view, updates = self.local_view(server_round, replies)
        table = self.server.table if self.round_failed else \
            self.server.finish_round(local_view, server_round)
        if self.store is not None:
            self.store.commit_round(server_round, table, list(self.server.snapshots),
                                    self.server.state())
        now = time.perf_counter()
        self.rounds.append({"round": server_round, "seconds": now - self.started,
                            "num-users": sum(u.num_users for u in updates),
                            "num-examples": sum(u.weight for u in updates),
                            # sent -> every reply in: messages and local training
                            "train-seconds": replied - self.train_started,
                            # aggregation, refinement (Eq. 18), the durable commit
                            "server-seconds": now - replied})
        metrics = MetricRecord({"num-users": sum(u.num_users for u in updates),
                                WEIGHT: float(sum(u.weight for u in updates))})
        return table_record(table), metrics

    def _is_eval_round(self, server_round: int) -> bool:
        return server_round % self.config.eval_every == 0 or server_round == self.config.rounds

    def evaluate_messages(self, arrays: ArrayRecord, config: dict, grid: Grid
                          ) -> list[Message]:
        """Evaluate on every connected node of the directory."""
        online = set(grid.get_node_ids())
        return self._messages({node: ConfigRecord({**config, "run-key": self.run_key})
                               for node in self.directory.node_users if node in online},
                              arrays, MessageType.EVALUATE)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        server_round += self.offset
        return self.evaluate_messages(arrays, {"parts": "valid"}, grid) \
            if self._is_eval_round(server_round) else []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        server_round += self.offset
        valid = self.scores(server_round, replies, ("valid",))["valid"]
        if not valid:
            return None
        if server_round > 0:
            row = {"round": server_round, "seconds": time.perf_counter() - self.started,
                   **{f"valid_{k}": v for k, v in valid.items()}}
            self.history.append(row)
            if self.progress is not None:
                self.progress(row)
        return MetricRecord(valid)

    def evaluate_now(self, grid: Grid, parts: tuple[str, ...] = ("valid", "test")
                     ) -> dict[str, dict[str, float]]:
        """Score the current table on ``parts`` across all nodes, in one message per node."""
        replies = grid.send_and_receive(
            self.evaluate_messages(table_record(self.server.table), {"parts": ",".join(parts)},
                                   grid), timeout=self.timeout)
        return self.scores(self.offset + self.config.rounds, replies, parts)

    def scores(self, server_round: int, replies: Iterable[Message], parts: tuple[str, ...]
               ) -> dict[str, dict[str, float]]:
        """The nodes' metric sums over their users, divided by the user counts, per part.

        A reply is counted only when, for every part, its count is a non-negative whole
        number and every metric sum is finite and between 0 and the count (each metric of one
        user lies in [0, 1]); anything else is logged in ``rejected``. A part no node scored
        is ``{}``.
        """
        sums: dict[str, float] = {}
        for message in replies:
            node = message.metadata.src_node_id
            if message.has_error():
                log(WARNING, "node %d did not evaluate: %s", node, message.error.reason)
                continue
            try:  # untrusted input: any failure rejects it
                metrics = {k: float(v) for k, v in message.content["metrics"].items()}
                problem = _score_problem(metrics, parts)
            except Exception as exc:
                problem = f"malformed ({type(exc).__name__}: {exc})"
            if problem is not None:
                log(WARNING, "rejected the evaluation of node %d: %s", node, problem)
                self.rejected.append({"round": server_round, "node": node,
                                      "reason": f"evaluation: {problem}"})
                continue
            if self.audit is not None:
                self.audit.record("evaluate", server_round, message)
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value
        scores: dict[str, dict[str, float]] = {}
        for part in parts:
            count = sums.get(f"{part}:count", 0.0)
            scores[part] = {} if count <= 0 else {
                key.split(":", 1)[1]: value / count for key, value in sums.items()
                if key.startswith(f"{part}:") and key != f"{part}:count"}
        return scores


def _score_problem(metrics: dict[str, float], parts: tuple[str, ...]) -> str | None:
    """Why an evaluate reply cannot be counted (see :meth:`FedShareStrategy.scores`)."""
    for part in parts:
        count = metrics.get(f"{part}:count")
        if count is None or not math.isfinite(count) or count < 0 or count != int(count):
            return f"no sound user count for {part}"
        values = [v for k, v in metrics.items() if k.startswith(f"{part}:")]
        if any(not math.isfinite(v) or v < 0 or v > count for v in values):
            return f"a metric sum outside [0, count] for {part}"
    if any(key.split(":", 1)[0] not in parts for key in metrics):
        return "metrics of a part that was not asked for"
    return None
