"""Algorithm 2 on a server, whatever runs the clients (in process or through Flower)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from fedshare.federated.server import Server
from fedshare.unlearning.config import UnlearningConfig
from fedshare.unlearning.contrastive import forgotten_views
from fedshare.unlearning.store import SharedStore


def run_algorithm2(server: Server, store: SharedStore, config: UnlearningConfig,
                   first_round: int, remaining_round: Callable[[int], Tensor]) -> None:
    """Lines 3-17 of Algorithm 2, then complete the erasure.

    Args:
        server: the learned server; ``store`` already holds the accepted requests and
            ``server.shared`` the updated D_s.
        remaining_round: runs one remaining-data federated round and returns its local view.
        first_round: rounds are numbered on after the learning phase's.
    """
    forgotten = store.forgotten()
    views = forgotten_views(list(server.snapshots), server.user.detach(), forgotten,
                            server.config.num_layers, config.forgotten_graph,
                            config.include_self)
    has_forgotten = torch.zeros(server.num_items, dtype=torch.bool)
    has_forgotten[torch.from_numpy(np.unique(forgotten.items))] = True
    l_cu = server.unlearning_loss(views, has_forgotten, config)
    for r in range(1, config.rounds + 1):
        round_ = first_round + r
        local_view = remaining_round(round_) if config.remaining_fl else server.table
        server.unlearn_round(local_view, round_, l_cu, config)
    complete_erasure(server, store)


def complete_erasure(server: Server, store: SharedStore) -> None:
    """The pre-request snapshots have served: delete them (the current table starts the next
    history), and drop the unshared interactions from the store."""
    server.snapshots.clear()
    server.snapshots.append(server.table)
    store.erase_pending()
