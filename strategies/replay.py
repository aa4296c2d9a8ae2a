"""FRU and CUFRU unlearning on Flower (the replay of :mod:`fedshare.unlearning.replay`), and
Retrain, with real messages to the devices that must take part.

Both roll the server back to round 0 and replay every learning round, each step FedEraser-
calibrated (the stored update's length in a freshly computed direction), exactly as the
in-process engine does (:func:`fedshare.unlearning.fru.fru_unlearn`,
:func:`fedshare.unlearning.cufru.cufru_unlearn`; a test checks both engines give the same
table). What differs is where the history lives and who must answer:

- **FRU**: the rows live on the nodes (``context.state``); the server kept only round 0, its own
  refinement rows and who took part in each round. The first replayed round asks every one of
  its participants for their stored rows (``query.fru_rows``); every later round is a train
  message to all of its participants, whose replies carry a fresh update *and* their stored
  rows of that round. Every participant of every round must be online.
- **CUFRU**: the station lives in the server's memory; only every ``interval``-th round asks its
  participants to train.

Every request and reply is counted (:class:`fedshare.federated.traffic.Traffic`: messages,
array bytes each way, users whose device had to answer).
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO, WARNING

import torch
from flwr.app import Message
from flwr.common import log
from flwr.serverapp import Grid
from torch import Tensor

from fedshare import protocol
from fedshare.federated.aggregation import aggregate
from fedshare.federated.rounds import PROGRESS
from fedshare.federated.traffic import Traffic
from fedshare.unlearning.cufru import TransferStation
from fedshare.unlearning.fru import FruHistory
from fedshare.unlearning.replay import (
    ReplayConfig,
    calibrated_step,
    finish,
    server_step,
    sparse_aggregate,
)
from strategies.fedshare import FedShareStrategy


def exchange(grid: Grid, messages: list[Message], timeout: float, traffic: Traffic
             ) -> list[Message]:
    """Send ``messages``, wait for the replies and count both ways."""
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    users = [u for m in messages for u in m.content[protocol.CONFIG].get(protocol.USERS, [])]
    traffic.add(users, sum(protocol.array_bytes(m.content) for m in messages),
                sum(protocol.array_bytes(r.content) for r in replies if not r.has_error()),
                len(messages))
    return replies


def nodes_of(strategy: FedShareStrategy, users: Iterable[int], grid: Grid
             ) -> dict[int, list[int]]:
    """The connected nodes serving ``users``, each with its users among them."""
    online = set(grid.get_node_ids())
    nodes: dict[int, list[int]] = {}
    for user in users:
        node = strategy.user_node.get(int(user))
        if node is not None and node in online:
            nodes.setdefault(node, []).append(int(user))
    return nodes


def fresh_direction(strategy: FedShareStrategy, round_: int, replies: list[Message],
                    table: Tensor) -> Tensor:
    """The aggregated update (Eq. 16) of a calibration round's accepted train replies."""
    updates = strategy.accepted_updates(round_, replies)
    if not updates:
        log(WARNING, "replayed round %d: no accepted update; its step is dropped", round_)
        return torch.zeros_like(table)
    cfg = strategy.config
    return aggregate(table, updates, cfg.aggregation, cfg.server_lr) - table


def stored_sum(strategy: FedShareStrategy, round_: int, replies: list[Message]
               ) -> tuple[Tensor, Tensor]:
    """``sum_u w_u row_u`` and ``sum_u w_u`` per item from the nodes' stored-rows replies."""
    server = strategy.server
    numerator = torch.zeros(server.num_items, strategy.config.dim)
    row_weight = torch.zeros(server.num_items)
    for _, (items, sums, weights) in strategy.inbox.read(
            "train", round_, replies,
            lambda m: protocol.read_stored_rows(m.content, server.num_items,
                                                strategy.config.dim)):
        numerator.index_add_(0, items, sums)
        row_weight.index_add_(0, items, weights)
    return numerator, row_weight


def replay_fru(grid: Grid, strategy: FedShareStrategy, history: FruHistory,
               replay: ReplayConfig, first: int, traffic: Traffic) -> int:
    """FRU's calibrated replay (module docstring); returns the last round number used."""
    server, cfg = strategy.server, strategy.config
    server.restore(history.checkpoint.get(0))
    table = server.table
    epochs, steps = replay.local(cfg.local).epochs, replay.server_steps(cfg.server_steps)
    rounds = history.replayed_rounds()
    for k, round_ in enumerate(rounds):
        log(INFO, "%s fru replay of round %d", PROGRESS, round_)
        participants = history.rounds.get(round_)
        if participants is not None:
            users, weights = participants
            weight = dict(zip(users.tolist(), weights.tolist(), strict=True))
            nodes = nodes_of(strategy, users.tolist(), grid)
            strategy.sampled = nodes
            if k == 0:
                messages = protocol.stored_rows_requests(round_, nodes, weight, strategy.mark())
            else:
                messages = protocol.replay_train_requests(first + round_, round_, nodes, weight,
                                                          table, strategy.mark(), epochs, True)
            replies = exchange(grid, messages, strategy.timeout, traffic)
            numerator, row_weight = stored_sum(strategy, first + round_, replies)
            step = sparse_aggregate(numerator, row_weight, float(weights.sum()),
                                    cfg.aggregation, cfg.server_lr)
            if k > 0:
                new = fresh_direction(strategy, first + round_, replies, table)
                step = calibrated_step(step, new)
            table = table + step
        table = table + server_step(server, table, history.server.get(round_), first + round_,
                                    steps)
    finish(server, table)
    return first + (rounds[-1] if rounds else 0)


def replay_cufru(grid: Grid, strategy: FedShareStrategy, station: TransferStation,
                 leaving: set[int], replay: ReplayConfig, first: int, traffic: Traffic) -> int:
    """CUFRU's replay from the station (module docstring); returns the last round used."""
    server, cfg = strategy.server, strategy.config
    server.restore(station.checkpoint.get(0))
    table = server.table
    epochs, steps = replay.local(cfg.local).epochs, replay.server_steps(cfg.server_steps)
    rounds = station.replayed_rounds()
    for round_ in rounds:
        if station.rounds.get(round_) is not None:
            step = station.corrected_client_step(round_, leaving, server.num_items,
                                                 cfg.aggregation, cfg.server_lr)
            if round_ % replay.interval == 0:
                log(INFO, "%s cufru calibration of round %d", PROGRESS, round_)
                users = station.rounds.get(round_)[0].tolist()
                nodes = nodes_of(strategy, users, grid)
                strategy.sampled = nodes
                messages = protocol.train_requests(first + round_, nodes, table,
                                                   strategy.mark(), epochs)
                replies = exchange(grid, messages, strategy.timeout, traffic)
                step = calibrated_step(step, fresh_direction(strategy, first + round_,
                                                             replies, table))
            table = table + step
        table = table + server_step(server, table, station.server.get(round_), first + round_,
                                    steps)
    finish(server, table)
    return first + (rounds[-1] if rounds else 0)



def retrain(grid: Grid, strategy: FedShareStrategy, first: int, traffic: Traffic) -> int:
    """Retrain through Flower: the server goes back to its initial state (regenerated from the
    seed), every node restarts its users (``query.restart``), and the whole learning phase
    runs again on the remaining data, rounds and random streams numbered 1..R as in the
    in-process Retrain. Returns the last round number used for the commit."""
    server, cfg = strategy.server, strategy.config
    server.restore(server.initial_state())
    server.snapshots.clear()
    nodes = nodes_of(strategy, [u for users in strategy.directory.node_users.values()
                                for u in users], grid)
    exchange(grid, protocol.restart_requests(nodes, strategy.mark()), strategy.timeout, traffic)
    for round_ in range(1, cfg.rounds + 1):
        log(INFO, "%s retrain round %d", PROGRESS, round_)
        replies = exchange(grid, strategy.train_messages(round_, grid), strategy.timeout,
                           traffic)
        updates = strategy.accepted_updates(round_, replies)
        if updates is not None:
            server.finish_round(strategy.learning.local_view(round_, updates)[0], round_)
    return first + cfg.rounds
