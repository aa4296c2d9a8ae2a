"""What FRU and CUFRU share: roll back to round 0, then rebuild the table round by round with
steps whose length comes from the stored history and whose direction is computed afresh.

FedEraser's calibration (``shared/specs/baselines.md``): ``step = ||old|| * new / ||new||``, the
stored update's length in the new update's direction, with norms over the whole update of a
round (one tensor: the item table).

In FedShare's setting the forgotten data are *shared* interactions, and they reached the model
through the server's refinement on G_s (Eq. 18), not through any client's local training. So the
server's refinement is one more participant of every round: its stored update gives the length,
and a short refinement on the *updated* G_s (``ceil(lambda * server_steps)`` steps, the
counterpart of the clients' ``ceil(lambda * L)`` epochs) gives the direction, in every replayed
round including the first (its stored direction carries the forgotten data). Clients' private
user embeddings are not calibrated: they continue from the replay's new updates.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from torch import Tensor

from fedshare.federated.aggregation import aggregate
from fedshare.federated.inprocess import InProcessFederation
from fedshare.federated.server import Server
from fedshare.models.local import LocalTrainConfig


@dataclass(frozen=True)
class ReplayConfig:
    """Settings of the FRU and CUFRU replays (what FRU stores while learning is
    :class:`fedshare.unlearning.fru_selection.FruSettings`, ``phase.learn(fru=...)``).

    Args:
        epoch_fraction: lambda, the replay's share of the local epochs and server steps (0.1).
        interval: CUFRU calibrates with fresh client updates every ``interval``-th round and
            applies the corrected stored aggregate in the others.
    """

    epoch_fraction: float = 0.1
    interval: int = 10

    def __post_init__(self) -> None:
        if not 0.0 < self.epoch_fraction <= 1.0:
            raise ValueError(f"epoch_fraction must lie in (0, 1], got {self.epoch_fraction}")
        if self.interval < 1:
            raise ValueError(f"interval must be at least 1, got {self.interval}")

    def local(self, config: LocalTrainConfig) -> LocalTrainConfig:
        return replace(config, epochs=max(1, math.ceil(self.epoch_fraction * config.epochs)))

    def server_steps(self, steps: int) -> int:
        return max(1, math.ceil(self.epoch_fraction * steps))

    def to_dict(self) -> dict:
        return asdict(self)


def calibrated_step(old: Tensor, new: Tensor) -> Tensor:
    """FRU/FedEraser calibration: the stored update's length in the new update's direction."""
    norm = new.norm()
    if norm == 0:
        return torch.zeros_like(new)
    return old.norm() * new / norm


def dense(items: Tensor, rows: Tensor, num_items: int) -> Tensor:
    """Sparse stored rows (compact item ids) as a full ``[num_items, d]`` update (zeros
    elsewhere)."""
    return torch.zeros(num_items, rows.shape[1]).index_add(0, items.long(), rows)


def sparse_aggregate(numerator: Tensor, row_weight: Tensor, total: float, mode: str,
                     server_lr: float) -> Tensor:
    """Eq. 16 from weighted update sums: ``sum_u w_u delta_u`` per row and the weights behind
    it, divided like :func:`fedshare.federated.aggregation.aggregate` divides."""
    if mode == "eq16":
        step = numerator / total if total > 0 else torch.zeros_like(numerator)
    else:
        touched = row_weight > 0.5  # weights are counts |D_u| >= 1
        step = torch.zeros_like(numerator)
        step[touched] = numerator[touched] / row_weight[touched, None]
    return server_lr * step


def fresh_client_step(federation: InProcessFederation, users: np.ndarray, table: Tensor,
                      local: LocalTrainConfig, round_: int) -> Tensor:
    """The remaining participants train from ``table``; their aggregated update (Eq. 16)."""
    cfg = federation.config
    update = federation.fresh_update(users, table, local, round_)
    return aggregate(table, [update], cfg.aggregation, cfg.server_lr) - table


def server_step(server: Server, table: Tensor, stored: tuple[Tensor, Tensor] | None,
                round_: int, steps: int) -> Tensor:
    """The server as a participant: a short refinement on the updated G_s gives the direction,
    its stored update (item ids and rows, or nothing) the length (see module docstring)."""
    if not server.refines:
        return torch.zeros_like(table)
    old = dense(*stored, server.num_items) if stored else torch.zeros_like(table)
    return calibrated_step(old, server.refine(table, round_, steps) - table)


def finish(server: Server, table: Tensor) -> None:
    """The replayed table becomes V_s."""
    server.table = table.detach().clone()
    with torch.no_grad():
        server.item.copy_(server.table)
