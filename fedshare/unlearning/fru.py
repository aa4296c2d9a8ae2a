"""Building blocks of the FRU baseline (Yuan et al., WSDM 2023; ``shared/specs/baselines.md``).

FRU keeps, on each client and for every round it took part in, the most important rows of its
item-embedding update: among the rows it touched (its positives and sampled negatives), the
top-``alpha`` fraction by L2 norm of ``v_i(after) - v_i(received)``. Unlearning replays the rounds
without the leaving users and calibrates each round with the stored update's length and the new
update's direction (FedEraser-style): ``step = ||old|| * new / ||new||``.

This module holds the Flower-free pieces: row selection, the per-client store (accounted in the
storage ledger) and the calibration step. The replay itself is not built yet (issue 5).
Choices: ``ceil(alpha * touched rows)`` rows are kept (at least one when any row was touched);
item ids are stored as int64 beside float32 rows, and both count in the ledger.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from fedshare.models.local import LocalUpdate
from fedshare.storage import StorageLedger, client, tensor_bytes

KIND = "fru-updates"


def select_important_rows(items: Tensor, deltas: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """The top-``alpha`` fraction of update rows by L2 norm (ties broken by item id)."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must lie in (0, 1], got {alpha}")
    keep = math.ceil(alpha * len(items))
    order = np.lexsort((items.numpy(), -deltas.norm(dim=1).numpy()))[:keep]
    chosen = torch.from_numpy(np.sort(order))
    return items[chosen], deltas[chosen]


def calibrated_step(old: Tensor, new: Tensor) -> Tensor:
    """FRU/FedEraser calibration: the stored update's length in the new update's direction."""
    norm = new.norm()
    if norm == 0:
        return torch.zeros_like(new)
    return old.norm() * new / norm


@dataclass
class ClientUpdateStore:
    """One client's stored updates: round -> (item ids, update rows)."""

    user: int
    ledger: StorageLedger
    rounds: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)

    def add(self, round_: int, items: Tensor, deltas: Tensor) -> None:
        self.rounds[round_] = (items.to(torch.int64).clone(), deltas.detach().clone())
        self._report()

    def drop(self) -> None:
        """Forget everything (the client leaves, or the store has served)."""
        self.rounds.clear()
        self._report()

    @property
    def nbytes(self) -> int:
        return sum(tensor_bytes(i, d) for i, d in self.rounds.values())

    def _report(self) -> None:
        self.ledger.set(client(self.user), KIND, self.nbytes)


def store_round(stores: dict[int, ClientUpdateStore], update: LocalUpdate, start: Tensor,
                round_: int, alpha: float, ledger: StorageLedger) -> None:
    """After a round of local training, every trained user keeps its important rows."""
    for b, user in enumerate(update.users.tolist()):
        mine = update.row_user == b
        if not bool(mine.any()):
            continue
        items = update.row_item[mine]
        deltas = update.row_value[mine] - start[items]
        kept_items, kept_rows = select_important_rows(items, deltas, alpha)
        store = stores.setdefault(user, ClientUpdateStore(user, ledger))
        store.add(round_, kept_items, kept_rows)


def expected_bytes(touched_rows: list[int], alpha: float, dim: int) -> int:
    """The analytic size of one client's store: per round, ceil(alpha * touched) rows of
    ``dim`` float32 plus one int64 id each."""
    return sum(math.ceil(alpha * n) * (dim * 4 + 8) for n in touched_rows)
