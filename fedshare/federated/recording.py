"""Hooks at the moments of every learning round: how unlearning baselines record the learning
phase they will later undo, and how a Flower run commits each round to its state database.

FRU keeps client-side update histories and CUFRU a server-side "transfer station"; both watch
the same three moments of every round of Algorithm 1: the clients' local updates, the aggregate
(Eq. 16) and the server's refinement (Eq. 18). A recorder sees them through
:class:`RoundRecorder` instead of patching the training loop, so learning code stays one path.

A recorder is read-only once learning ends: deep copies of a learned federation share it (every
unlearning method starts from a copy, and copying hundreds of MB of history per method would
measure the copy, not the method).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from torch import Tensor

from fedshare.models.local import LocalUpdate
from fedshare.storage_ledger import StorageLedger

if TYPE_CHECKING:
    from fedshare.federated.population import ClientPopulation, NodeUpdate


class RoundRecorder:
    """No-op base: override the moments a baseline needs."""

    name = "recorder"

    def begin(self, ledger: StorageLedger, table: Tensor, user: Tensor,
              sharers: np.ndarray) -> None:
        """Before round 1: the run's ledger (every store reports to it), the initial table,
        the server's initial user embeddings and the users holding shared data."""

    def serving(self, population: ClientPopulation, seed: int) -> None:
        """Before round 1: the clients' data and the run's seed (a client-side store, FRU's,
        selects its rows from what the user's node holds)."""

    def clients(self, round_: int, update: LocalUpdate, weights: Tensor, start: Tensor) -> None:
        """Local training of round ``round_`` from ``start``; ``weights[b]`` is |D_u| of batch
        position ``b``."""

    def nodes(self, round_: int, users: Tensor, weights: Tensor, updates: Sequence[NodeUpdate],
              start: Tensor, sparse: Sequence[tuple[int, Tensor, Tensor]]) -> None:
        """Through Flower, instead of :meth:`clients`: the round's accepted node replies (each
        the FedAvg mean of its users' tables, from ``start``), the ``users`` that trained in
        them with their |D_u|, and the per-user sparse updates (user, item ids, rows) the nodes
        sent, if the recorder asked for any (CUFRU's sharers)."""

    def refined(self, round_: int, aggregated: Tensor, refined: Tensor) -> None:
        """The server turned the aggregate of ``round_`` into the new global table."""

    def committed(self, round_: int, table: Tensor) -> None:
        """Round ``round_`` is final with global table ``table`` (unchanged if it failed)."""

    def __deepcopy__(self, memo: dict) -> RoundRecorder:
        return self
