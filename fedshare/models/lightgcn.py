"""LightGCN over a whole user-item graph (Eq. 13-14; L = 3, alpha_l = 1/(L+1)).

Used by the centralised reference and, on the shared graph G_s, by the server. Propagation is
:meth:`fedshare.graph.BipartiteGraph.propagate` (PyG normalisation and ``LGConv``, normalised
once per graph).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fedshare.graph import BipartiteGraph
from fedshare.models.embeddings import xavier_table


class LightGCN(nn.Module):
    """Learnable user and item tables propagated on a fixed graph.

    Args:
        num_users, num_items: sizes of the id spaces.
        dim: embedding size.
        num_layers: L, the propagation depth; ``0`` gives matrix factorisation.
        generator: seeds the Xavier initialisation.
    """

    def __init__(self, num_users: int, num_items: int, dim: int = 32, num_layers: int = 3,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.num_layers = num_layers
        self.user = nn.Parameter(xavier_table(num_users, dim, generator))
        self.item = nn.Parameter(xavier_table(num_items, dim, generator))

    def forward(self, graph: BipartiteGraph | None) -> tuple[Tensor, Tensor]:
        """Final user and item representations (Eq. 14)."""
        if self.num_layers == 0 or graph is None:
            return self.user, self.item
        return graph.propagate(self.user, self.item, self.num_layers)
