"""CUFRU baseline (Li et al., ACM TIST 2025): a server-side gradient transfer station.

The paper is closed; FedShare describes CUFRU only as a server-side station that stores
historical gradient information and calibrates with stored and new gradients of the remaining
clients. This interpretation (``shared/specs/baselines.md``) stores on the server, per round:

- the aggregate of the clients' updates as the weighted sum ``sum_u w_u delta_u`` of every
  touched row, the summed weight behind each row and the round's total weight (so contributions
  can be subtracted exactly);
- the sparse updates (all touched rows) of the participants holding shared data, with |D_u|;
- the server's refinement update (the rows it changed), the participants, and round 0.

Item ids are stored compactly (:func:`fedshare.unlearning.fru_selection.id_dtype`: int16 up to
32767 items, else int32), as in FRU's stores. The per-sharer updates stay whole (every touched
row: positives and every negative of every local epoch), unlike FRU's selected rows: the
station must subtract a leaving user's contribution from the stored aggregate *exactly*, and the
aggregate holds every row the user touched.

Unlearning rolls back to round 0 and replays every round: the stored aggregate minus the
contributions of the users who unshared (their updates were computed from models their shared
data had shaped) is the round's client step; every ``interval``-th round is a calibration round
in which the round's participants train ``ceil(lambda * L)`` epochs and the corrected stored
aggregate keeps its length but takes their direction. The server's refinement is replayed as
in FRU (:mod:`fedshare.unlearning.replay`). Unlike FRU, nothing is stored on the devices and most
rounds need no client at all; the price is storage on the server.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from fedshare.federated.inprocess import InProcessFederation
from fedshare.federated.population import NodeUpdate
from fedshare.federated.recording import RoundRecorder
from fedshare.models.local import LocalUpdate
from fedshare.storage_ledger import SERVER, RowStore, StorageLedger
from fedshare.unlearning.fru_selection import id_dtype
from fedshare.unlearning.replay import (
    ReplayConfig,
    calibrated_step,
    dense,
    finish,
    fresh_client_step,
    server_step,
    sparse_aggregate,
)

KINDS = ("cufru-aggregates", "cufru-client-updates", "cufru-server-updates", "cufru-rounds",
         "cufru-checkpoint")


class TransferStation(RoundRecorder):
    """The server's store of CUFRU (module docstring)."""

    name = "cufru"

    def begin(self, ledger: StorageLedger, table: Tensor, user: Tensor,
              sharers: np.ndarray) -> None:
        self.sharers = set(np.asarray(sharers).tolist())
        self.aggregates = RowStore(SERVER, "cufru-aggregates", ledger)
        self.updates = RowStore(SERVER, "cufru-client-updates", ledger)
        self.server = RowStore(SERVER, "cufru-server-updates", ledger)
        self.rounds = RowStore(SERVER, "cufru-rounds", ledger)
        self.checkpoint = RowStore(SERVER, "cufru-checkpoint", ledger)
        self.checkpoint.add(0, table, user)

    def clients(self, round_: int, update: LocalUpdate, weights: Tensor, start: Tensor) -> None:
        num_items = start.shape[0]
        compact = id_dtype(num_items)
        deltas = update.row_value - start[update.row_item]
        w = weights.float()[update.row_user]
        numerator = torch.zeros_like(start).index_add(0, update.row_item, deltas * w[:, None])
        row_weight = torch.zeros(num_items).index_add(0, update.row_item, w)
        total = weights.float().sum().reshape(1)
        previous = self.aggregates.get(round_)
        if previous is not None:  # another chunk of this round: merge, one row per item
            old_items, old_numerator, old_weight, old_total = previous
            numerator.index_add_(0, old_items.long(), old_numerator)
            row_weight.index_add_(0, old_items.long(), old_weight)
            total = total + old_total
        items = (row_weight > 0).nonzero().squeeze(1)
        self.aggregates.put(round_, items.to(compact), numerator[items], row_weight[items],
                            total)
        self.rounds.add(round_, torch.from_numpy(update.users), weights.float())
        for b, user in enumerate(update.users.tolist()):
            if user in self.sharers:
                mine = update.row_user == b
                self.updates.add((round_, user), update.row_item[mine].to(compact),
                                 deltas[mine])

    def nodes(self, round_: int, users: Tensor, weights: Tensor, updates: Sequence[NodeUpdate],
              start: Tensor, sparse: Sequence[tuple[int, Tensor, Tensor]]) -> None:
        """Through Flower: the aggregate from the node replies (a node's weight times its mean
        table minus ``start`` is ``sum_u w_u delta_u`` over its users), the sharers' sparse
        updates as the nodes sent them."""
        numerator, row_weight = torch.zeros_like(start), torch.zeros(start.shape[0])
        for update in updates:
            if update.weight > 0:
                numerator += update.weight * (update.table - start)
                row_weight += update.row_weight
        total = torch.tensor([float(sum(u.weight for u in updates))])
        items = (row_weight > 0).nonzero().squeeze(1)
        compact = id_dtype(start.shape[0])
        self.aggregates.put(round_, items.to(compact), numerator[items], row_weight[items], total)
        self.rounds.add(round_, users, weights.float())
        for user, mine, rows in sparse:
            if user in self.sharers:
                self.updates.add((round_, user), mine.to(compact), rows)

    def refined(self, round_: int, aggregated: Tensor, refined: Tensor) -> None:
        delta = refined - aggregated
        items = (delta != 0).any(dim=1).nonzero().squeeze(1)
        if len(items):
            self.server.add(round_, items.to(id_dtype(len(delta))), delta[items])

    def corrected_client_step(self, round_: int, leaving: set[int], num_items: int, mode: str,
                              server_lr: float) -> Tensor:
        """The stored aggregate of ``round_`` without the contributions of ``leaving``."""
        items, numerator_rows, weight_rows, total = self.aggregates.get(round_)
        numerator = dense(items, numerator_rows, num_items)
        row_weight = torch.zeros(num_items).index_add(0, items.long(), weight_rows)
        total_weight = float(total.sum())
        users, weights = self.rounds.get(round_)
        for user, weight in zip(users.tolist(), weights.tolist(), strict=True):
            record = self.updates.get((round_, user)) if user in leaving else None
            if record is None:
                continue
            mine, rows = record
            numerator.index_add_(0, mine.long(), -weight * rows)
            row_weight.index_add_(0, mine.long(), torch.full((len(mine),), -weight))
            total_weight -= weight
        return sparse_aggregate(numerator, row_weight, total_weight, mode, server_lr)

    def replayed_rounds(self) -> list[int]:
        return sorted(set(self.rounds.keys()) | set(self.server.keys()))


def cufru_unlearn(federation: InProcessFederation, station: TransferStation, leaving: set[int],
                  config: ReplayConfig, first_round: int) -> None:
    """Roll back and replay from the station (module docstring); ``leaving`` are the users
    whose shared data are being forgotten."""
    server, cfg = federation.server, federation.config
    server.restore(station.checkpoint.get(0))
    table = server.table
    local, steps = config.local(cfg.local), config.server_steps(cfg.server_steps)
    for round_ in station.replayed_rounds():
        if station.rounds.get(round_) is not None:
            step = station.corrected_client_step(round_, leaving, server.num_items,
                                                 cfg.aggregation, cfg.server_lr)
            if round_ % config.interval == 0:
                users = station.rounds.get(round_)[0].numpy()
                new = fresh_client_step(federation, users, table, local, first_round + round_)
                step = calibrated_step(step, new)
            table = table + step
        table = table + server_step(server, table, station.server.get(round_),
                                    first_round + round_, steps)
    finish(server, table)
