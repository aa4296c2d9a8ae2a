"""Algorithm 2 on a server, whatever runs the clients (in process or through Flower)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from fedshare.federated.server import Server
from fedshare.unlearning.config import UnlearningConfig
from fedshare.unlearning.contrastive import ContrastiveUnlearningLoss, forgotten_views
from fedshare.unlearning.shared_store import SharedStore


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
    if config.reset_orphans:
        reset_orphans(server, forgotten.items)
    views = forgotten_views(list(server.snapshots), server.user.detach(), forgotten,
                            server.config.num_layers, config.forgotten_graph,
                            config.include_self)
    has_forgotten = torch.zeros(server.num_items, dtype=torch.bool)
    has_forgotten[torch.from_numpy(np.unique(forgotten.items))] = True
    l_cu = unlearning_loss(server, views, has_forgotten, config)
    for r in range(1, config.rounds + 1):
        round_ = first_round + r
        local_view = remaining_round(round_) if config.remaining_fl else server.table
        unlearn_round(server, local_view, round_, l_cu, config)
    complete_erasure(server, store)


def reset_orphans(server: Server, forgotten_items: np.ndarray) -> Tensor:
    """The ``fedshare-reset`` variant (:class:`UnlearningConfig`): forgotten items with no edge
    left in the updated G_s get their initial rows back; returns those items."""
    orphans = np.setdiff1d(np.unique(forgotten_items), server.graph_items.numpy())
    index = torch.from_numpy(orphans)
    table = server.table.clone()
    table[index] = server.initial_table()[index]
    server.table = table
    with torch.no_grad():
        server.item.copy_(table)
    return index


def unlearning_loss(server: Server, forgotten: Tensor, has_forgotten: Tensor,
                    unlearning: UnlearningConfig) -> ContrastiveUnlearningLoss:
    """L_CU (Eq. 25) of an unlearning phase, over the items of the updated G_s and I_f."""
    items = torch.unique(torch.cat([server.graph_items, has_forgotten.nonzero().squeeze(1)]))
    return ContrastiveUnlearningLoss(forgotten, has_forgotten, items, unlearning.tau,
                                     unlearning.positive_in_denominator)


def unlearn_round(server: Server, local_view: Tensor, round_: int,
                  l_cu: ContrastiveUnlearningLoss, unlearning: UnlearningConfig) -> Tensor:
    """Algorithm 2, lines 12-17: minimise L_CU (Eq. 25), optionally + BPR on the updated G_s,
    starting from the new local view, with the server's refinement optimiser at the phase's
    own step size; the result becomes V_s."""
    cfg = server.config
    rng = np.random.default_rng([cfg.seed, round_, 0xF0E7])
    with torch.no_grad():
        server.item.copy_(local_view)
    for group in server.optimizer.param_groups:  # the phase's own step size, then back
        group["lr"] = unlearning.lr
    for step in range(unlearning.steps):
        if server.graph is not None:
            users_g, items_g = server.graph.propagate(server.user, server.item, cfg.num_layers)
        else:
            users_g, items_g = server.user, server.item / (cfg.num_layers + 1)
        loss = unlearning.weight * l_cu(server.item, items_g)
        if unlearning.bpr and server.graph is not None:
            loss = loss + server.bpr_loss(users_g, items_g, rng, round_, step)
        server.step(loss)
    for group in server.optimizer.param_groups:
        group["lr"] = cfg.server_refine_lr
    server.table = server.item.detach().clone()
    return server.table


def complete_erasure(server: Server, store: SharedStore) -> None:
    """The pre-request snapshots have served: delete them (the current table starts the next
    history), and drop the unshared interactions from the store."""
    server.snapshots.clear()
    server.snapshots.append(server.table)
    store.erase_pending()
