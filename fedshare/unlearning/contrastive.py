"""FedShare's contrastive unlearning (Sec. IV-D, Eq. 23-25, Algorithm 2).

Per round r of T_un: the remaining-data federated round gives the new local view V_loc (Eq. 16);
LightGCN on the updated G_s from V_loc gives the new global view; LightGCN on the forgotten graph
G_f from each of the M snapshots gives the forgotten views (Eq. 24); the table is updated by
minimising

    L_CU = sum_i -log exp(cos(l_i, g_i)/tau) / sum_{v in V_if} exp(cos(l_i, v)/tau)   (Eq. 25)

with forgotten views as negatives only for items in I_f; for other items the term reduces to
the alignment ``-cos(l_i, g_i)/tau``.

Choices: Eq. 25 is used as written (the positive is not in the denominator;
``positive_in_denominator`` gives the usual InfoNCE form). Forgotten views are Eq. 14 on G_f,
layer 0 included (``include_self``), with the server's user embeddings for the users of G_f; they
depend only on the snapshots, the fixed G_f and those embeddings, so they are computed once per
phase rather than every round (same values). The paper does not say whether BPR on the updated G_s
joins L_CU: ``bpr`` switches it, and it does by default (decided on validation: without it the
table collapses). L_CU enters with ``weight`` beside BPR. Defaults (README, "Unlearning",
:class:`~fedshare.unlearning.config.UnlearningConfig`): 20 rounds x 10 Adam steps at lr 0.03,
tau 0.5, weight 0.1. Ablations: ``forgotten_graph=False`` uses the raw snapshots as forgotten
views; ``remaining_fl=False`` reuses the previous table as the local view.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fedshare.data.interactions import Interactions
from fedshare.errors import FedShareError
from fedshare.graph import BipartiteGraph
from fedshare.loss_kernels import KernelLoss, as_array, contrastive_unlearning


def contrastive_unlearning_loss(local: Tensor, global_: Tensor, forgotten: Tensor,
                                has_forgotten: Tensor, tau: float,
                                positive_in_denominator: bool = False) -> Tensor:
    """L_CU (Eq. 25), mean over items.

    Args:
        local: new local views ``[n, d]``. global_: new global views ``[n, d]``.
        forgotten: forgotten views ``[M, n, d]`` of the same items.
        has_forgotten: ``[n]`` boolean, items in I_f (only they get forgotten negatives).
        positive_in_denominator: the usual InfoNCE form (softmax over the positive and the
            forgotten views), which stops pushing once the positive dominates.
    """
    local_n = F.normalize(local, dim=-1)
    positive = (local_n * F.normalize(global_, dim=-1)).sum(-1) / tau
    negative = (local_n[None] * F.normalize(forgotten, dim=-1)).sum(-1) / tau  # [M, n]
    if positive_in_denominator:
        softmax = torch.logsumexp(torch.cat([positive[None], negative]), dim=0) - positive
        return torch.where(has_forgotten, softmax, -positive).mean()
    denominator = torch.logsumexp(negative, dim=0)
    return (-positive + torch.where(has_forgotten, denominator, 0.0)).mean()


class ContrastiveUnlearningLoss:
    """L_CU (Eq. 25) over a fixed item set, in the form the server's unlearning steps use.

    The value of :func:`contrastive_unlearning_loss` on ``items`` (a test checks value and
    gradient), at a fraction of the cost per step: the forgotten views are constant through the
    phase, so they are normalised once and kept only for the items of I_f (the only ones with
    forgotten negatives), and the loss and its gradient come from one compiled pass
    (:func:`fedshare.loss_kernels.contrastive_unlearning`).

    Args:
        forgotten: forgotten views ``[M, I, d]`` of every item. has_forgotten: ``[I]``, I_f.
        items: the items the loss averages over (those of G_s and I_f).
    """

    def __init__(self, forgotten: Tensor, has_forgotten: Tensor, items: Tensor, tau: float,
                 positive_in_denominator: bool = False) -> None:
        self.tau, self.positive_in_denominator = float(tau), bool(positive_in_denominator)
        self.mask = np.zeros(len(has_forgotten), dtype=bool)
        self.mask[items.numpy()] = True
        self.count = len(items)
        targets = items[has_forgotten.index_select(0, items)]  # I_f among ``items``
        self.targets = targets.numpy().astype(np.int64)
        self.negatives = as_array(F.normalize(forgotten.index_select(1, targets), dim=-1))

    def __call__(self, local: Tensor, global_: Tensor) -> Tensor:
        """L_CU of the local and global item tables ``[I, d]``, differentiable w.r.t. both."""
        local_a, global_a = as_array(local), as_array(global_)
        grad_local, grad_global = np.zeros_like(local_a), np.zeros_like(global_a)
        value = contrastive_unlearning(local_a, global_a, self.mask, self.count, self.targets,
                                       self.negatives, self.tau, self.positive_in_denominator,
                                       grad_local, grad_global)
        return KernelLoss.apply(local, global_, value, torch.from_numpy(grad_local),
                                torch.from_numpy(grad_global))


def forgotten_views(snapshots: list[Tensor], users: Tensor, forgotten: Interactions,
                    num_layers: int, use_graph: bool = True, include_self: bool = True
                    ) -> Tensor:
    """Forgotten views ``[M, I, d]``: LightGCN on G_f (Eq. 23) from each snapshot (Eq. 24), or
    the raw snapshots (ablation w/o forgotten graph)."""
    if not snapshots:
        raise FedShareError("contrastive unlearning needs at least one snapshot (M >= 1)")
    if not use_graph:
        return torch.stack(snapshots)
    graph = BipartiteGraph(forgotten)
    with torch.no_grad():
        return torch.stack([graph.propagate(users, table, num_layers, include_self)[1]
                            for table in snapshots])
