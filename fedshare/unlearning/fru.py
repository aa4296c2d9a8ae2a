"""FRU baseline (Yuan et al., WSDM 2023; ``shared/specs/baselines.md``): client-side histories.

Learning: every client keeps, for every round it took part in, FRU's selection of its item-
embedding update rows (:mod:`fedshare.unlearning.fru_selection`, settings
:class:`FruSettings`): at the paper's settings (``sampling="paper"``) its positives and
``ceil(beta * |pos|)`` negatives from the user-item mixed semi-hard pool among the negatives its
local training moved, then the top-``alpha`` of those by L2 norm of
``v_i(after) - v_i(received)``; with ``sampling="learning"`` the top-``alpha`` of every row the
local training touched. The learning phase itself is shared by every method: FRU's sampling
decides what is *stored*, not how the model was trained. The server's refinement on the shared
graph (Eq. 18) is stored as one more participant: the top-``alpha`` of the rows it changed
(here the unlearned data are shared interactions, which only the server trains on). The server
also keeps round 0 (its initial table and user embeddings) and who took part in each round with
|D_u|.

Unlearning: roll back to round 0 and replay every round with the same participants; round 1
applies the stored client updates as they are; later rounds run ``ceil(lambda * L)`` local epochs
from the replayed table and step by the stored aggregate's length in the new aggregate's direction
(:mod:`fedshare.unlearning.replay`). No participant leaves: unsharing users keep their local data.

Through Flower (``fru-alpha`` > 0 in the run config, with ``fru-beta``, ``fru-pool`` and
``fru-sampling``) the ClientApp keeps the same rows in its node's ``context.state`` (one record
per user, surviving across rounds) and reports each trained user's store size; the strategy
enters them in its ledger. The replay runs in process.

Choices: item ids are stored compactly (:func:`id_dtype`: int16 up to 32767 items, else int32)
beside the float32 rows, and both count in the ledger; the stored aggregate divides like the
run's Eq. 16 mode, over the stored rows. Replayed rounds train with the learning phase's uniform
negatives.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from fedshare.federated.inprocess import InProcessFederation
from fedshare.federated.population import ClientPopulation, NodeUpdate
from fedshare.federated.recording import RoundRecorder
from fedshare.models.local import LocalUpdate
from fedshare.storage_ledger import FRU_CLIENT, SERVER, RowStore, StorageLedger, client
from fedshare.unlearning.fru_selection import (
    FruSettings,
    id_bytes,
    id_dtype,
    kept_rows,
    row_bytes,
    select_important_rows,
    stored_rows,
)
from fedshare.unlearning.replay import (
    ReplayConfig,
    calibrated_step,
    finish,
    fresh_client_step,
    server_step,
    sparse_aggregate,
)

KIND = FRU_CLIENT
SERVER_KINDS = ("fru-server-updates", "fru-rounds", "fru-checkpoint")
KINDS = (KIND, *SERVER_KINDS)


__all__ = ["KIND", "KINDS", "FruHistory", "FruSettings", "expected_bytes", "fru_unlearn",
           "id_bytes", "id_dtype", "kept_rows", "row_bytes", "select_important_rows",
           "store_round", "stored_rows"]


def store_round(stores: dict[int, RowStore], rows: Iterator[tuple[int, Tensor, Tensor]],
                round_: int, ledger: StorageLedger) -> None:
    """After a round of local training, every trained user keeps its selected ``rows``
    (from :func:`stored_rows`)."""
    for user, items, kept in rows:
        store = stores.setdefault(user, RowStore(client(user), KIND, ledger))
        store.add(round_, items, kept)


def expected_bytes(touched_rows: list[int], alpha: float, dim: int, num_items: int) -> int:
    """The analytic size of one participant's store: ceil(alpha * candidates) rows per round
    (``touched_rows``: its candidate rows of each round)."""
    return sum(row_bytes(kept_rows(alpha, n), dim, num_items) for n in touched_rows)


class FruHistory(RoundRecorder):
    """What FRU keeps during learning: per-client stores, the server's store, round 0."""

    name = "fru"

    def __init__(self, settings: FruSettings | None = None) -> None:
        self.settings = settings or FruSettings()
        self.population: ClientPopulation | None = None
        self.seed = 0

    def serving(self, population: ClientPopulation, seed: int) -> None:
        self.population, self.seed = population, seed

    def begin(self, ledger: StorageLedger, table: Tensor, user: Tensor,
              sharers: np.ndarray) -> None:
        self.ledger = ledger
        self.clients_: dict[int, RowStore] = {}
        self.server = RowStore(SERVER, "fru-server-updates", ledger)
        self.rounds = RowStore(SERVER, "fru-rounds", ledger)
        self.checkpoint = RowStore(SERVER, "fru-checkpoint", ledger)
        self.checkpoint.add(0, table, user)

    def clients(self, round_: int, update: LocalUpdate, weights: Tensor, start: Tensor) -> None:
        if self.population is None:
            raise RuntimeError("FruHistory needs the clients' data (RoundRecorder.serving)")
        positives, history = self.population.user_items(update.users)
        store_round(self.clients_, stored_rows(update, start, positives, history, self.settings,
                                               self.seed, round_), round_, self.ledger)
        self.rounds.add(round_, torch.from_numpy(update.users), weights.float())

    def nodes(self, round_: int, users: Tensor, weights: Tensor, updates: Sequence[NodeUpdate],
              start: Tensor, sparse: Sequence[tuple[int, Tensor, Tensor]]) -> None:
        """Through Flower the rows stay on the nodes: the server keeps who took part."""
        self.rounds.add(round_, users, weights.float())

    def refined(self, round_: int, aggregated: Tensor, refined: Tensor) -> None:
        delta = refined - aggregated
        items = (delta != 0).any(dim=1).nonzero().squeeze(1)
        if len(items):
            kept, rows = select_important_rows(items, delta[items], self.settings.alpha)
            self.server.add(round_, kept.to(id_dtype(len(delta))), rows)

    def replayed_rounds(self) -> list[int]:
        return sorted(set(self.rounds.keys()) | set(self.server.keys()))

    def stored_client_step(self, round_: int, users: Tensor, weights: Tensor, num_items: int,
                           mode: str, server_lr: float) -> Tensor:
        """The round's aggregate rebuilt from what its participants stored."""
        dim = self.checkpoint.get(0)[0].shape[1]
        numerator, row_weight = torch.zeros(num_items, dim), torch.zeros(num_items)
        for user, weight in zip(users.tolist(), weights.tolist(), strict=True):
            record = self.clients_[user].get(round_) if user in self.clients_ else None
            if record is None:
                continue
            items, rows = record
            numerator.index_add_(0, items.long(), rows * weight)
            row_weight.index_add_(0, items.long(), torch.full((len(items),), weight))
        return sparse_aggregate(numerator, row_weight, float(weights.sum()), mode, server_lr)


def fru_unlearn(federation: InProcessFederation, history: FruHistory, config: ReplayConfig,
                first_round: int) -> None:
    """Roll back and replay with calibration (module docstring). ``federation`` already holds
    the updated D_s / G_s and the clients' remaining data; replayed rounds are numbered on
    after ``first_round`` for their random streams."""
    server, cfg = federation.server, federation.config
    server.restore(history.checkpoint.get(0))
    table = server.table
    local, steps = config.local(cfg.local), config.server_steps(cfg.server_steps)
    for k, round_ in enumerate(history.replayed_rounds()):
        participants = history.rounds.get(round_)
        if participants is not None:
            users, weights = participants
            old = history.stored_client_step(round_, users, weights, server.num_items,
                                             cfg.aggregation, cfg.server_lr)
            if k > 0:
                new = fresh_client_step(federation, users.numpy(), table, local,
                                        first_round + round_)
                old = calibrated_step(old, new)
            table = table + old
        table = table + server_step(server, table, history.server.get(round_),
                                    first_round + round_, steps)
    finish(server, table)
