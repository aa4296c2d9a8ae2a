"""Sequence unlearning through Flower (run config ``unlearn = true``, family sequence; issue 17).

After learning, the server asks every node for its devices' requests
(``query.sequence_requests``, carrying the kept model: each requesting device's frozen reference
P_ref), checks them (:class:`fedshare.sequences.request_log.RequestReport`), logs the accepted
ones durably (``requests.json``) and serves them with ``seq-unlearning``:

- the joint CAU variants and ablations: exactly
  :func:`fedshare.sequences.cau_devices.joint_cau_by_devices`, message by message. The
  curriculum (:func:`fedshare.unlearning.cau.unlearn.schedule`) asks for difficulties through
  ``query.sequence_cau_scores``; each step sends ``train.sequence_cau_step`` to the nodes with
  samples in the batch and :class:`JointServer` forms the batch-mean gradients (Eq. 9), the
  MGDA weights (Eq. 10) and the update (Eq. 8) from their sums;
- ``cau-local``: one ``train.sequence_cau_local`` per node; the server averages the nodes'
  |D_f|-weighted means (the spec's federated placement);
- ``retrain`` (the learning rounds again from the seed's initial model) and
  ``fedavg-remaining`` (``seq-continued-rounds`` rounds from the kept model): the learning
  strategy on the requesters' remaining sessions.

A CAU message a node does not answer soundly stops the unlearning (a step without a node's
gradients is not the algorithm's step): the requests stay logged, unserved. Then the unlearned
model is scored: test Recall/NDCG by the test devices, Hit_u by the requesting devices
(``evaluate.sequence_forget``, one indicator per sample; the server averages), U-score from
both. Only after ``unlearned_model.npy`` is written are the requests marked served.
"""

from __future__ import annotations

import time
from dataclasses import replace
from logging import INFO
from pathlib import Path

import numpy as np
import torch
from flwr.app import Message
from flwr.common import log
from flwr.serverapp import Grid

from fedshare import protocol
from fedshare.atomic import write_atomically
from fedshare.errors import FedShareError
from fedshare.federated.rounds import PROGRESS
from fedshare.federated.traffic import Traffic
from fedshare.sequences.cau_devices import JointServer
from fedshare.sequences.config import SequenceConfig
from fedshare.sequences.directory import SequenceDirectory
from fedshare.sequences.forget_metrics import HIT_METRICS, mean_hits, with_u_score
from fedshare.sequences.request_log import RequestLog, remaining_weight
from fedshare.sequences.sample_index import SampleIndex
from fedshare.sequences.unlearning_config import JOINT, SequenceUnlearning
from fedshare.unlearning.cau.unlearn import CAUResult, schedule
from strategies.inbox import Inbox
from strategies.sequence import SequenceStrategy


class Unlearning:
    """One unlearning phase over the nodes of ``directory`` (module docstring)."""

    def __init__(self, grid: Grid, config: SequenceConfig, settings: SequenceUnlearning,
                 directory: SequenceDirectory, inbox: Inbox, out: Path, timeout: float,
                 max_failed: float) -> None:
        self.grid, self.config, self.settings = grid, config, settings
        self.directory, self.inbox, self.out = directory, inbox, out
        self.timeout, self.max_failed = timeout, max_failed
        self.log = RequestLog(out / "requests.json")
        self.index = SampleIndex({})
        self.lengths: dict[int, int] = {}
        self.traffic = {k: Traffic() for k in ("requests", "unlearning", "evaluation")}

    # ---------------------------------------------------------------------- messages
    def exchange(self, kind: str, messages: list[Message], devices: set[int]) -> list[Message]:
        """Send, wait, count the traffic (array bytes each way, the devices behind it)."""
        replies = list(self.grid.send_and_receive(messages, timeout=self.timeout))
        self.traffic[kind].add(devices, sum(protocol.array_bytes(m.content) for m in messages),
                               sum(protocol.array_bytes(r.content) for r in replies
                                   if not r.has_error()), len(messages))
        return replies

    def from_every_node(self, what: str, replies: list[Message], reader) -> dict[int, object]:
        """One sound reply per node asked, or a one-line :class:`FedShareError`."""
        read = dict(self.inbox.read(what, 0, replies, reader))
        missing = sorted(set(self.index.nodes) - set(read))
        if missing:
            raise FedShareError(f"nodes {missing} sent no sound {what} reply; the requests "
                                "stay logged, unserved")
        return read

    # ---------------------------------------------------------------------- requests
    def gather(self, vector: torch.Tensor) -> None:
        """Ask every node for its requests; log the accepted ones before serving any."""
        online = set(self.grid.get_node_ids())
        nodes = [n for n in self.directory.nodes() if n in online]
        replies = self.exchange("requests", protocol.model_requests(
            protocol.SEQ_REQUESTS, nodes, vector), set())
        accepted = {}
        for node, report in self.inbox.read("requests", 0, replies,
                                            protocol.read_sequence_requests_reply):
            problem = report.problem(self.directory, self.log.sessions)
            if problem is not None:
                self.inbox.reject("requests", 0, node, problem)
                continue
            if len(report.sessions):
                accepted[node] = report.requests()
                self.lengths |= dict(zip(report.sessions.tolist(), report.lengths.tolist(),
                                         strict=True))
                self.log.receive(node, accepted[node])
        self.index = SampleIndex(accepted)
        self.traffic["requests"].devices.update(self.index.owners)
        log(INFO, "%s unlearning: %d requests from %d nodes (%d samples)", PROGRESS,
            len(self.log.entries), len(accepted), len(self.index))

    def remaining_directory(self) -> SequenceDirectory:
        """The directory with the requesters' |D_u| on their remaining sessions."""
        weights = dict(self.directory.weight_of)
        for session, positions in self.log.requests().items():
            weights[session] = remaining_weight(self.lengths[session], len(positions),
                                                self.directory.max_len)
        return replace(self.directory, weight_of=weights)

    # ---------------------------------------------------------------------- methods
    def joint(self, start: torch.Tensor) -> tuple[torch.Tensor, CAUResult]:
        """:func:`joint_cau_by_devices` with the devices behind messages."""
        cau = self.settings.cau_config(self.config.backbone, self.config.seed)
        server, result = JointServer(start, cau), CAUResult()
        rows = self.index.rows

        def scores() -> np.ndarray:
            replies = self.exchange("unlearning", protocol.model_requests(
                protocol.SEQ_CAU_SCORES, self.index.nodes, server.vector),
                set(self.index.owners))
            read = self.from_every_node("scores", replies, lambda m: (
                protocol.read_sequence_scores_reply(m.content,
                                                    len(rows[m.metadata.src_node_id]))))
            out = np.empty(len(self.index))
            for node, values in read.items():
                out[rows[node]] = values
            return out

        for step, batch in enumerate(schedule(scores, len(self.index), cau)):
            asked = self.index.split(batch)
            devices = set().union(*(self.index.devices(n, s) for n, s in asked.items()))
            replies = self.exchange("unlearning", protocol.sequence_cau_step_requests(
                step, asked, server.vector), devices)
            read = dict(self.inbox.read("cau", step, replies, lambda m, asked=asked: (
                protocol.read_sequence_cau_step_reply(m.content, len(start),
                                                      len(asked[m.metadata.src_node_id])))))
            if set(read) != set(asked):
                raise FedShareError(f"step {step}: nodes {sorted(set(asked) - set(read))} "
                                    "sent no sound gradients; the requests stay logged, "
                                    "unserved")
            result.weights.append(server.step([read[n][0] for n in sorted(read)],
                                              [read[n][1] for n in sorted(read)]))
            result.batches.append(np.asarray(batch))
        return server.vector.clone(), result

    def local(self, start: torch.Tensor) -> torch.Tensor:
        """``cau-local``: the nodes' |D_f|-weighted means, averaged by weight."""
        replies = self.exchange("unlearning", protocol.model_requests(
            protocol.SEQ_CAU_LOCAL, self.index.nodes, start), set(self.index.owners))

        def sound(m: Message):
            update = protocol.read_sequence_train_reply(m.content)
            node = m.metadata.src_node_id
            if update.table.shape != start.shape or not bool(torch.isfinite(
                    update.table).all()) or (update.weight, update.num_users) != (
                    len(self.index.rows[node]), len(self.index.devices(node))):
                raise ValueError("a model or weight that does not fit the node's requests")
            return update

        read = self.from_every_node("cau", replies, sound)
        total = sum(u.weight * u.table.double() for u in read.values())
        return (total / sum(u.weight for u in read.values())).to(start.dtype)

    def rounds_on_remaining(self, learned: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """``retrain`` or ``fedavg-remaining``: the learning strategy on D_r (the requesters
        train on their remaining sessions since they sent their requests)."""
        again = self.settings.method == "retrain"
        config = self.config if again else replace(self.config,
                                                   rounds=self.settings.continued_rounds)
        strategy = SequenceStrategy(config, self.remaining_directory(), self.inbox,
                                    self.max_failed)
        if not again:
            strategy.server.restore(learned)
            strategy.best = learned.clone()
        strategy.start(self.grid, protocol.model_record(strategy.server.table),
                       num_rounds=config.rounds, timeout=self.timeout)
        for traffic in strategy.traffic.values():  # its rounds and validations
            self.traffic["unlearning"].add(traffic.devices, traffic.bytes_down,
                                           traffic.bytes_up, traffic.messages)
        return strategy.best.clone(), {"best_round": strategy.best_round}

    def run(self, learned: torch.Tensor) -> tuple[torch.Tensor, dict, float]:
        """The method's unlearned vector, what it adds to the summary, its seconds."""
        started = time.perf_counter()
        extra: dict = {}
        method = self.settings.method
        if not len(self.index):
            vector = learned.clone()
        elif method in JOINT:
            vector, result = self.joint(learned)
            extra = {"steps": len(result.batches)}
            if result.weights:
                extra["mean_weights"] = np.mean(result.weights, axis=0).round(4).tolist()
        elif method == "cau-local":
            vector = self.local(learned)
        else:
            vector, extra = self.rounds_on_remaining(learned)
        return vector, extra, time.perf_counter() - started

    # ---------------------------------------------------------------------- scores
    def hits(self, vector: torch.Tensor) -> dict[str, float]:
        """Hit_u of every forget sample, from the requesting devices' indicators."""
        if not len(self.index):
            return {name: 0.0 for name in HIT_METRICS}
        replies = self.exchange("evaluation", protocol.model_requests(
            protocol.SEQ_FORGET, self.index.nodes, vector), set(self.index.owners))
        read = self.from_every_node("forget", replies, lambda m: (
            protocol.read_sequence_forget_reply(m.content,
                                                len(self.index.rows[m.metadata.src_node_id]))))
        union = {name: np.empty(len(self.index), np.int64) for name in HIT_METRICS}
        for node, hits in read.items():
            for name in HIT_METRICS:
                union[name][self.index.rows[node]] = hits[name]
        return mean_hits(union)

    def test(self, strategy: SequenceStrategy, vector: torch.Tensor) -> dict[str, float]:
        """Test Recall/NDCG of ``vector`` by the test devices."""
        strategy.server.restore(vector)
        messages = strategy.evaluate_messages("test", self.grid)
        replies = self.exchange("evaluation", messages, set())
        return strategy.scores(0, replies, "test")


def serve_unlearning(grid: Grid, strategy: SequenceStrategy, settings: SequenceUnlearning,
                     learned_test: dict[str, float], inbox: Inbox, out: Path, timeout: float,
                     max_failed: float) -> dict:
    """Requests, the method, the scores, ``unlearned_model.npy``, the requests marked served;
    returns the summary's ``unlearning`` entry."""
    phase = Unlearning(grid, strategy.config, settings, strategy.directory, inbox, out,
                       timeout, max_failed)
    learned = strategy.best.clone()
    phase.gather(learned)
    original = with_u_score({**learned_test, **phase.hits(learned)})
    vector, extra, seconds = phase.run(learned)
    test = phase.test(strategy, vector)
    unlearned = with_u_score({**test, **phase.hits(vector)})
    write_atomically(out / "unlearned_model.npy", lambda fh: np.save(fh, vector.numpy()))
    phase.log.mark_served(settings.method)
    log(INFO, "%s unlearned (%s) in %.1f s  Recall@10 %.4f  Hit_u@1 %.4f  U %.4f", PROGRESS,
        settings.method, seconds, unlearned["recall@10"], unlearned["hit_u@1"],
        unlearned["u_score"])
    return {"method": settings.method, "settings": settings.to_dict(),
            "requests": phase.log.counts(), "forget_samples": len(phase.index),
            "seconds": seconds, "original": original, "unlearned": unlearned, **extra,
            "traffic": {k: t.to_dict() for k, t in phase.traffic.items()}}
