"""The two composed objectives of the server equal a dense reference written here from the
paper's equations, value and gradient: the refinement of Eq. 18 (cosine BPR on G_s + lambda1 x
InfoNCE of Eq. 17 + the L2 term) and the unlearning step of Algorithm 2 (weight x L_CU of Eq. 25
+ BPR on the updated G_s). The reference builds the normalised adjacency of G_s as a dense
matrix, propagates LightGCN by matrix powers, and writes every loss term out; it shares only
the batch draws (which edges, which negatives) with the code under test."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedshare.data.interactions import Interactions
from fedshare.federated.config import FederatedConfig
from fedshare.federated.server import Server
from fedshare.sampling import sample_negatives
from fedshare.unlearning.algorithm import unlearn_round, unlearning_loss
from fedshare.unlearning.config import UnlearningConfig
from fedshare.unlearning.contrastive import forgotten_views

NUM_USERS, NUM_ITEMS, DIM, LAYERS = 5, 9, 4, 3
EDGES = [(0, 0), (0, 2), (0, 5), (1, 1), (1, 2), (2, 3), (2, 5), (2, 6), (3, 0), (3, 7),
         (4, 4), (4, 6)]


def _interactions(pairs) -> Interactions:
    users, items = (np.array(x) for x in zip(*pairs, strict=True))
    return Interactions.from_arrays(users, items, NUM_USERS, NUM_ITEMS)


def dense_lightgcn(pairs, users: torch.Tensor, items: torch.Tensor, layers: int = LAYERS,
                   include_input: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 13-14 by hand: A_hat = D^-1/2 A D^-1/2 on the (users + items) graph, the mean of the
    layer embeddings E_0..E_L (E_1..E_L without the input)."""
    n = NUM_USERS + NUM_ITEMS
    adjacency = torch.zeros(n, n)
    for u, i in pairs:
        adjacency[u, NUM_USERS + i] = adjacency[NUM_USERS + i, u] = 1.0
    degree = adjacency.sum(1)
    scale = torch.where(degree > 0, degree.rsqrt(), torch.zeros_like(degree))
    a_hat = scale[:, None] * adjacency * scale[None, :]
    x = torch.cat([users, items])
    layers_out = [x] if include_input else []
    for _ in range(layers):
        x = a_hat @ x
        layers_out.append(x)
    mean = torch.stack(layers_out).mean(0)
    return mean[:NUM_USERS], mean[NUM_USERS:]


def dense_bpr(users_g, items_g, u, i, j) -> torch.Tensor:
    """Cosine BPR (Eq. 15 with cosine scores), mean over the batch."""
    cos = lambda a, b: F.cosine_similarity(a, b, dim=-1)  # noqa: E731
    return -F.logsigmoid(cos(users_g[u], items_g[i]) - cos(users_g[u], items_g[j])).mean()


def dense_l2(user, item, u, i, j) -> torch.Tensor:
    """lambda ||Theta||^2 of the batch's rows (layer 0), per batch edge."""
    return (user[u].pow(2).sum() + item[i].pow(2).sum() + item[j].pow(2).sum()) / len(u)


def dense_info_nce(local, global_, tau) -> torch.Tensor:
    """Eq. 17: -log exp(cos(l_b, g_b)/tau) / sum_c exp(cos(l_b, g_c)/tau), mean over b."""
    sim = torch.stack([torch.stack([F.cosine_similarity(local[b], global_[c], dim=0)
                                    for c in range(len(global_))]) for b in range(len(local))])
    return (-(sim.diag() / tau) + torch.logsumexp(sim / tau, dim=1)).mean()


def _captured(server: Server, run) -> tuple[float, torch.Tensor, torch.Tensor]:
    """The loss of the server's first step and its gradient w.r.t. its user and item rows."""
    seen = []

    def capture(loss: torch.Tensor) -> None:
        gu, gi = torch.autograd.grad(loss, [server.user, server.item])
        seen.append((float(loss.detach()), gu, gi))

    server.step = capture  # type: ignore[method-assign]
    run()
    return seen[0]


def _server(config: FederatedConfig) -> Server:
    server = Server(_interactions(EDGES), config)
    with torch.no_grad():  # a trained-looking state: not the initialisation
        server.user.copy_(torch.randn(NUM_USERS, DIM, generator=torch.Generator().manual_seed(3)))
    return server


def _edge_batch(server: Server, rng: np.random.Generator, round_: int, step: int):
    """The same draws as :meth:`Server.bpr_loss` (all edges, in the order drawn)."""
    edges_u, edges_i = server.shared.users, server.shared.items
    n = min(server.config.server_batch_size, len(edges_u))
    pick = rng.choice(len(edges_u), size=n, replace=False)
    u, i = edges_u[pick], edges_i[pick]
    known = np.unique(edges_u * NUM_ITEMS + edges_i)
    j = sample_negatives(u, np.arange(n), known, NUM_ITEMS, server.config.seed,
                         (round_ << 16) + step)
    return u, i, j


def test_the_refinement_objective_equals_eq18_written_out():
    config = FederatedConfig(dim=DIM, seed=4, server_steps=1, lambda1=0.5, tau=0.5, reg=0.01)
    server = _server(config)
    start = torch.randn(NUM_ITEMS, DIM, generator=torch.Generator().manual_seed(5))
    round_ = 7
    value, grad_user, grad_item = _captured(server, lambda: server.refine(start, round_, 1))

    rng = np.random.default_rng([config.seed, round_, 0xC0FFEE])
    u, i, j = _edge_batch(server, rng, round_, 0)
    graph_items = np.flatnonzero(np.bincount([e[1] for e in EDGES], minlength=NUM_ITEMS))
    b = graph_items[rng.choice(len(graph_items), size=len(graph_items), replace=False)]
    user = server.user.detach().clone().requires_grad_()
    item = start.clone().requires_grad_()
    users_g, items_g = dense_lightgcn(EDGES, user, item)
    reference = (dense_bpr(users_g, items_g, u, i, j) + config.reg * dense_l2(user, item, u, i, j)
                 + config.lambda1 * dense_info_nce(item[b], items_g[b], config.tau))
    ref_user, ref_item = torch.autograd.grad(reference, [user, item])
    assert value == pytest.approx(float(reference.detach()), rel=1e-5)
    assert torch.allclose(grad_item, ref_item, atol=1e-6)
    assert torch.allclose(grad_user, ref_user, atol=1e-6)


@pytest.mark.parametrize("in_denominator", [False, True], ids=["eq25", "infonce-form"])
def test_the_unlearning_step_equals_eq25_plus_bpr_written_out(in_denominator):
    config = FederatedConfig(dim=DIM, seed=2, server_steps=1)
    unlearning = UnlearningConfig(rounds=1, steps=1, tau=0.5, weight=0.1,
                                  positive_in_denominator=in_denominator)
    forgotten_pairs = [(0, 5), (2, 5), (3, 7)]
    remaining = [e for e in EDGES if e not in forgotten_pairs]
    generator = torch.Generator().manual_seed(9)
    snapshots = [torch.randn(NUM_ITEMS, DIM, generator=generator) for _ in range(2)]
    server = _server(config)
    server.set_shared(_interactions(remaining))
    views = forgotten_views(snapshots, server.user.detach(), _interactions(forgotten_pairs),
                            LAYERS)
    has_forgotten = torch.zeros(NUM_ITEMS, dtype=torch.bool)
    has_forgotten[[5, 7]] = True
    l_cu = unlearning_loss(server, views, has_forgotten, unlearning)
    local_view = torch.randn(NUM_ITEMS, DIM, generator=generator)
    round_ = 11
    value, grad_user, grad_item = _captured(
        server, lambda: unlearn_round(server, local_view, round_, l_cu, unlearning))

    # the forgotten views by hand: LightGCN on G_f from each snapshot, layer 0 included (Eq. 24)
    user0 = server.user.detach()
    ref_views = torch.stack([dense_lightgcn(forgotten_pairs, user0, s)[1] for s in snapshots])
    assert torch.allclose(views, ref_views, atol=1e-6)
    rng = np.random.default_rng([config.seed, round_, 0xF0E7])
    u, i, j = _edge_batch(server, rng, round_, 0)
    user = server.user.detach().clone().requires_grad_()
    item = local_view.clone().requires_grad_()
    users_g, items_g = dense_lightgcn(remaining, user, item)
    # L_CU over the items of the updated G_s and of I_f (Eq. 25)
    items = sorted({e[1] for e in remaining} | {5, 7})
    terms = []
    for k in items:
        positive = F.cosine_similarity(item[k], items_g[k], dim=0) / unlearning.tau
        if k in (5, 7):
            negatives = torch.stack([F.cosine_similarity(item[k], ref_views[m, k], dim=0)
                                     for m in range(len(snapshots))]) / unlearning.tau
            if in_denominator:
                negatives = torch.cat([positive[None], negatives])
            terms.append(-positive + torch.logsumexp(negatives, dim=0))
        else:
            terms.append(-positive)
    l_cu_ref = torch.stack(terms).mean()
    reference = unlearning.weight * l_cu_ref + dense_bpr(users_g, items_g, u, i, j) \
        + config.reg * dense_l2(user, item, u, i, j)
    ref_user, ref_item = torch.autograd.grad(reference, [user, item])
    assert value == pytest.approx(float(reference.detach()), rel=1e-5)
    assert torch.allclose(grad_item, ref_item, atol=1e-6)
    assert torch.allclose(grad_user, ref_user, atol=1e-6)
