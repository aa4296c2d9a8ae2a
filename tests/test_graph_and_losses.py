"""LightGCN propagation against dense matrices; losses against their formulas; central smoke."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedshare.central import CentralConfig, train_bpr
from fedshare.data.interactions import Interactions
from fedshare.data.split import random_split
from fedshare.graph import BipartiteGraph
from fedshare.losses import bpr_loss, info_nce, l2_penalty
from fedshare.models.lightgcn import LightGCN

NUM_USERS, NUM_ITEMS = 7, 9


def _interactions() -> Interactions:
    """A small graph without duplicate edges; user 6 and items 7, 8 have no edge."""
    rng = np.random.default_rng(0)
    dense = rng.random((NUM_USERS, NUM_ITEMS)) < 0.4
    dense[6, :] = False
    dense[:, 7:] = False
    dense[0, 0] = dense[5, 6] = True
    users, items = np.nonzero(dense)
    return Interactions.from_arrays(users, items, NUM_USERS, NUM_ITEMS)


def _dense_propagation_matrix(data: Interactions, num_layers: int) -> np.ndarray:
    """``mean(Â^0, ..., Â^L)`` with Â = D^-1/2 A D^-1/2 built densely (float64)."""
    n = data.num_users + data.num_items
    a = np.zeros((n, n))
    for u, i in zip(data.users, data.items, strict=True):
        a[u, data.num_users + i] = 1.0
        a[data.num_users + i, u] = 1.0
    deg = a.sum(1)
    inv_sqrt = np.zeros(n)
    inv_sqrt[deg > 0] = deg[deg > 0] ** -0.5
    a_hat = inv_sqrt[:, None] * a * inv_sqrt[None, :]
    power = np.eye(n)
    total = np.eye(n)
    for _ in range(num_layers):
        power = a_hat @ power
        total = total + power
    return total / (num_layers + 1)


@pytest.mark.parametrize("num_layers", [0, 1, 3])
def test_propagate_equals_dense_lightgcn(num_layers):
    data = _interactions()
    gen = torch.Generator().manual_seed(num_layers)
    users = torch.randn(NUM_USERS, 5, generator=gen, requires_grad=True)
    items = torch.randn(NUM_ITEMS, 5, generator=gen, requires_grad=True)

    graph = BipartiteGraph(data)
    assert graph.num_users == NUM_USERS
    assert graph.num_items == NUM_ITEMS
    assert graph.num_edges == len(data)
    out_u, out_i = graph.propagate(users, items, num_layers)
    assert out_u.shape == (NUM_USERS, 5)
    assert out_i.shape == (NUM_ITEMS, 5)

    m = _dense_propagation_matrix(data, num_layers)
    x = np.concatenate([users.detach().numpy(), items.detach().numpy()]).astype(np.float64)
    expected = m @ x
    np.testing.assert_allclose(out_u.detach().numpy(), expected[:NUM_USERS], atol=1e-5)
    np.testing.assert_allclose(out_i.detach().numpy(), expected[NUM_USERS:], atol=1e-5)

    # isolated nodes keep e_0 / (L + 1)
    np.testing.assert_allclose(out_u[6].detach().numpy(),
                               users[6].detach().numpy() / (num_layers + 1), atol=1e-6)
    np.testing.assert_allclose(out_i[7:].detach().numpy(),
                               items[7:].detach().numpy() / (num_layers + 1), atol=1e-6)

    # gradients: d sum(out * R) / dx = M^T R, for both inputs
    r = torch.randn(NUM_USERS + NUM_ITEMS, 5, generator=gen)
    ((out_u * r[:NUM_USERS]).sum() + (out_i * r[NUM_USERS:]).sum()).backward()
    grad = m.T @ r.numpy().astype(np.float64)
    assert users.grad is not None and items.grad is not None
    np.testing.assert_allclose(users.grad.numpy(), grad[:NUM_USERS], atol=1e-5)
    np.testing.assert_allclose(items.grad.numpy(), grad[NUM_USERS:], atol=1e-5)
    assert users.grad.abs().sum() > 0 and items.grad.abs().sum() > 0


def test_graph_is_reusable_across_calls():
    data = _interactions()
    graph = BipartiteGraph(data)
    gen = torch.Generator().manual_seed(1)
    users, items = torch.randn(NUM_USERS, 3, generator=gen), torch.randn(NUM_ITEMS, 3,
                                                                          generator=gen)
    first = graph.propagate(users, items, 2)
    second = graph.propagate(users, items, 2)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    m = _dense_propagation_matrix(data, 2)
    x = np.concatenate([users.numpy(), items.numpy()]).astype(np.float64)
    np.testing.assert_allclose(torch.cat(first).numpy(), m @ x, atol=1e-5)


def test_bipartite_edge_index_has_both_directions_with_item_offset():
    users = np.array([0, 0, 2, 1])
    items = np.array([1, 3, 0, 3])
    data = Interactions.from_arrays(users, items, 3, 4)
    edge_index = data.bipartite_edge_index()
    assert edge_index.shape == (2, 8)
    assert edge_index.dtype == torch.long
    edges = set(map(tuple, edge_index.T.tolist()))
    forward = {(u, 3 + i) for u, i in zip(users.tolist(), items.tolist(), strict=True)}
    backward = {(3 + i, u) for u, i in zip(users.tolist(), items.tolist(), strict=True)}
    assert edges == forward | backward
    # users are sources of the first half, item nodes (offset by num_users) of the second
    assert edge_index[0, :4].tolist() == users.tolist()
    assert edge_index[1, :4].tolist() == (items + 3).tolist()
    assert edge_index[0, 4:].tolist() == (items + 3).tolist()
    assert edge_index[1, 4:].tolist() == users.tolist()


def test_to_sparse_equals_interaction_matrix():
    data = _interactions()
    expected = np.zeros((NUM_USERS, NUM_ITEMS), dtype=np.float32)
    expected[data.users, data.items] = 1.0
    sparse = data.to_sparse()
    assert sparse.is_sparse
    assert tuple(sparse.shape) == (NUM_USERS, NUM_ITEMS)
    np.testing.assert_array_equal(sparse.to_dense().numpy(), expected)


def test_lightgcn_module_forward():
    data = _interactions()
    graph = BipartiteGraph(data)
    gen = torch.Generator().manual_seed(0)
    mf = LightGCN(NUM_USERS, NUM_ITEMS, dim=4, num_layers=0, generator=gen)
    u, i = mf(graph)
    assert u is mf.user and i is mf.item

    model = LightGCN(NUM_USERS, NUM_ITEMS, dim=4, num_layers=2,
                     generator=torch.Generator().manual_seed(0))
    u, i = model(graph)
    m = _dense_propagation_matrix(data, 2)
    x = np.concatenate([model.user.detach().numpy(), model.item.detach().numpy()])
    np.testing.assert_allclose(torch.cat([u, i]).detach().numpy(), m @ x.astype(np.float64),
                               atol=1e-6)
    # Xavier uniform bound sqrt(6 / (rows + dim))
    assert model.user.abs().max() <= math.sqrt(6.0 / (NUM_USERS + 4))
    assert model.item.abs().max() <= math.sqrt(6.0 / (NUM_ITEMS + 4))
    # same generator seed -> same initial tables
    assert torch.equal(model.user, mf.user) and torch.equal(model.item, mf.item)


# ----------------------------------------------------------------------------- losses
def test_bpr_loss_formula():
    pos = torch.tensor([2.0, -1.0, 0.0, 30.0, -30.0])
    neg = torch.tensor([1.0, 1.0, 0.0, -5.0, 5.0])
    got = bpr_loss(pos, neg)
    assert got.shape == (5,)  # unreduced
    expected = [-math.log(1.0 / (1.0 + math.exp(-(p - n))))
                for p, n in zip(pos.tolist(), neg.tolist(), strict=True)]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert got[2].item() == pytest.approx(math.log(2.0))
    assert torch.isfinite(got).all()  # numerically stable at large margins


@pytest.mark.parametrize("tau", [0.1, 0.5, 2.0])
def test_info_nce_brute_force(tau):
    gen = torch.Generator().manual_seed(3)
    local = torch.randn(6, 4, generator=gen)
    global_ = torch.randn(6, 4, generator=gen) * 3.0
    lo, g = local.numpy().astype(np.float64), global_.numpy().astype(np.float64)

    def cos(a, b):
        return a @ b / (np.linalg.norm(a) * np.linalg.norm(b))

    terms = []
    for i in range(6):
        num = math.exp(cos(lo[i], g[i]) / tau)
        den = sum(math.exp(cos(lo[i], g[j]) / tau) for j in range(6))
        terms.append(-math.log(num / den))
    got = info_nce(local, global_, tau)
    assert got.dim() == 0
    assert got.item() == pytest.approx(float(np.mean(terms)), rel=1e-5, abs=1e-6)


def test_info_nce_is_scale_invariant_and_minimal_for_aligned_views():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, 3, generator=gen)
    assert info_nce(x, 7.0 * x, 0.2).item() == pytest.approx(info_nce(x, x, 0.2).item(),
                                                              rel=1e-5)
    shuffled = x[torch.tensor([1, 2, 3, 4, 0])]
    assert info_nce(x, x, 0.2) < info_nce(x, shuffled, 0.2)


def test_l2_penalty_sum_of_squares():
    a = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    b = torch.tensor([4.0])
    assert l2_penalty(a, b).item() == pytest.approx(1 + 4 + 9 + 0.25 + 16)
    assert l2_penalty(a).item() == pytest.approx(14.25)
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    l2_penalty(w).backward()
    assert w.grad.tolist() == [2.0, 4.0]


# ----------------------------------------------------------------------------- central smoke
@pytest.mark.parametrize("model_name", ["mf", "lightgcn"])
def test_train_bpr_runs_on_tiny_split(model_name):
    rng = np.random.default_rng(0)
    dense = rng.random((25, 40)) < 0.25
    dense[np.arange(25), np.arange(25)] = True
    users, items = np.nonzero(dense)
    split = random_split(Interactions.from_arrays(users, items, 25, 40), seed=0)
    config = CentralConfig(dim=8, max_epochs=2, eval_every=1, batch_size=64, seed=1)
    epochs_seen = []
    result = train_bpr(split, model_name, config,
                       progress=lambda epoch, valid: epochs_seen.append(epoch))
    assert epochs_seen == [1, 2]
    assert result.model == model_name
    assert result.best_epoch in (1, 2)
    for part in (result.valid, result.test):
        assert set(part) == {"hr@20", "recall@20", "ndcg@20"}
        for value in part.values():
            assert 0.0 <= value <= 1.0
    assert result.config["max_epochs"] == 2
    assert result.to_dict()["model"] == model_name


def test_normalised_adjacency_is_symmetric():
    """The propagation's backward pass relies on A = A^T (fedshare/graph.py)."""
    dense = BipartiteGraph(_interactions()).adj.to_dense()
    assert torch.equal(dense, dense.T)
