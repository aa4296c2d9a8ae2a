"""The server's user-item graph: built once, normalised once, propagated many times.

LightGCN propagation (Eq. 13) multiplies by the symmetrically normalised adjacency
``D^-1/2 A D^-1/2`` of the bipartite graph; PyG's ``gcn_norm`` computes it and PyG's ``LGConv``
(with ``normalize=False``) applies it. Normalising on every call costs about 10x on an ML-1M-size
graph, so :class:`BipartiteGraph` keeps the normalised sparse matrix and reuses it.

Autograd through a sparse CSR product transposes the matrix on every backward pass (15x the
forward's cost, measured on ML-100K). The normalised bipartite adjacency is symmetric, so the
backward of ``A x`` is ``A g``: :class:`_SymmetricPropagation` tells autograd so, and both
directions run through the same ``LGConv``.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor
from torch_geometric.nn import LGConv
from torch_geometric.nn.conv.gcn_conv import gcn_norm
from torch_geometric.utils import to_torch_csr_tensor

from fedshare.data.interactions import Interactions


class _SymmetricPropagation(torch.autograd.Function):
    """``A x`` for a symmetric sparse ``A`` whose backward is ``A g`` (no transpose)."""

    @staticmethod
    def forward(ctx, x: Tensor, adj: Tensor, conv: LGConv) -> Tensor:  # type: ignore[override]
        ctx.adj, ctx.conv = adj, conv
        return conv(x, adj)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        return ctx.conv(grad, ctx.adj), None, None


class BipartiteGraph:
    """Normalised adjacency of a user-item graph; users ``[0, U)``, items ``[U, U + I)``.

    Args:
        interactions: the edges (for the server, the shared data D_s, Eq. 11).
    """

    def __init__(self, interactions: Interactions) -> None:
        self.num_users = interactions.num_users
        self.num_items = interactions.num_items
        self.num_edges = len(interactions)
        num_nodes = self.num_users + self.num_items
        edge_index, weight = gcn_norm(interactions.bipartite_edge_index(), None,
                                      num_nodes=num_nodes, add_self_loops=False)
        with warnings.catch_warnings():  # torch's notes that sparse CSR is "beta"
            warnings.simplefilter("ignore", UserWarning)
            adj = to_torch_csr_tensor(edge_index.flip(0), weight, (num_nodes, num_nodes))
            # int32 indices: the product otherwise converts 2|E| int64 indices every call
            self.adj = torch.sparse_csr_tensor(adj.crow_indices().int(), adj.col_indices().int(),
                                               adj.values(), adj.shape)
        self._conv = LGConv(normalize=False)

    def __deepcopy__(self, memo: dict) -> BipartiteGraph:
        return self  # immutable once built (torch cannot deep-copy sparse CSR tensors)

    def propagate(self, users: Tensor, items: Tensor, num_layers: int = 3,
                  include_input: bool = True) -> tuple[Tensor, Tensor]:
        """LightGCN (Eq. 13-14) with layer weights ``1 / (L + 1)``.

        Returns the combined user and item embeddings; differentiable w.r.t. both inputs.
        ``include_input=False`` averages layers 1..L only: what reached a node over the edges.
        """
        x = torch.cat([users, items])
        total = x if include_input else torch.zeros_like(x)
        for _ in range(num_layers):
            x = _SymmetricPropagation.apply(x, self.adj, self._conv)
            total = total + x
        out = total / (num_layers + int(include_input))
        return out[: self.num_users], out[self.num_users:]
