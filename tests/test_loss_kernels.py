"""The compiled server losses equal their autograd definitions, value and gradient."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedshare.loss_kernels import cosine_bpr_loss
from fedshare.losses import bpr_loss, sampled_rows_l2
from fedshare.unlearning.contrastive import ContrastiveUnlearningLoss, contrastive_unlearning_loss

NUM_USERS, NUM_ITEMS, DIM = 9, 40, 6


def _tables(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(NUM_USERS, DIM, generator=generator, requires_grad=True),
            torch.randn(NUM_ITEMS, DIM, generator=generator, requires_grad=True))


def _close(got: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cosine_bpr_equals_autograd_on_cosine_similarity(seed):
    users, items = _tables(seed)
    rng = np.random.default_rng(seed)
    u, i, j = (rng.integers(0, n, size=200) for n in (NUM_USERS, NUM_ITEMS, NUM_ITEMS))
    expected = bpr_loss(F.cosine_similarity(users[u], items[i]),
                        F.cosine_similarity(users[u], items[j])).mean()
    expected_grads = torch.autograd.grad(3.0 * expected, (users, items))
    got = cosine_bpr_loss(users, items, u, i, j)
    _close(got, expected.detach())
    for g, e in zip(torch.autograd.grad(3.0 * got, (users, items)), expected_grads, strict=True):
        _close(g, e)


def test_cosine_bpr_by_hand():
    # one pair: cos(u, i) = 1, cos(u, j) = 0, so the loss is ln(1 + e^-1)
    users = torch.tensor([[2.0, 0.0]], requires_grad=True)
    items = torch.tensor([[3.0, 0.0], [0.0, 0.5]], requires_grad=True)
    loss = cosine_bpr_loss(users, items, np.array([0]), np.array([0]), np.array([1]))
    assert float(loss.detach()) == pytest.approx(np.log1p(np.exp(-1.0)), rel=1e-6)
    loss.backward()
    s = 1.0 / (1.0 + np.e)  # sigma(-1) = dL/dcos(u, j) = -dL/dcos(u, i)
    # d cos(u, j) / du = (j^ - 0 * u^) / |u| = (0, 1) / 2; d cos(u, i) / du = 0 (aligned)
    np.testing.assert_allclose(users.grad.numpy(), [[0.0, s / 2]], rtol=1e-6)
    # d/dj of +cos(u, j): (u^ - 0) / |j| = (1, 0) / 0.5; d/di is 0 (already aligned)
    np.testing.assert_allclose(items.grad.numpy(), [[0.0, 0.0], [2 * s, 0.0]], rtol=1e-6,
                               atol=1e-7)


def test_sampled_rows_l2_equals_the_gathered_sum():
    _, items = _tables(4)
    rows = (torch.tensor([3, 3, 7, 0]), torch.tensor([7, 39]))
    expected = items[torch.cat(rows)].pow(2).sum()
    expected_grad, = torch.autograd.grad(expected, items)
    got = sampled_rows_l2(items, *rows)
    _close(got, expected.detach())
    _close(torch.autograd.grad(got, items)[0], expected_grad)


def _unlearning_case(seed: int, forgotten_share: float):
    generator = torch.Generator().manual_seed(seed)
    forgotten = torch.randn(3, NUM_ITEMS, DIM, generator=generator)
    has = torch.rand(NUM_ITEMS, generator=generator) < forgotten_share
    graph_items = torch.randperm(NUM_ITEMS, generator=generator)[:25]
    items = torch.unique(torch.cat([graph_items, has.nonzero().squeeze(1)]))
    local = torch.randn(NUM_ITEMS, DIM, generator=generator, requires_grad=True)
    global_ = torch.randn(NUM_ITEMS, DIM, generator=generator, requires_grad=True)
    return forgotten, has, items, local, global_


@pytest.mark.parametrize("positive_in_denominator", [False, True])
@pytest.mark.parametrize(("seed", "forgotten_share"), [(0, 0.3), (1, 0.0), (2, 1.0)])
def test_phase_loss_equals_eq25_on_its_items(seed, forgotten_share, positive_in_denominator):
    forgotten, has, items, local, global_ = _unlearning_case(seed, forgotten_share)
    expected = contrastive_unlearning_loss(local[items], global_[items], forgotten[:, items],
                                           has[items], 0.5, positive_in_denominator)
    expected_grads = torch.autograd.grad(0.1 * expected, (local, global_))
    loss = ContrastiveUnlearningLoss(forgotten, has, items, 0.5, positive_in_denominator)
    got = loss(local, global_)
    _close(got, expected.detach())
    for g, e in zip(torch.autograd.grad(0.1 * got, (local, global_)), expected_grads,
                    strict=True):
        _close(g, e)
    # rows outside ``items`` get no gradient
    outside = torch.ones(NUM_ITEMS, dtype=torch.bool)
    outside[items] = False
    assert torch.autograd.grad(loss(local, global_), local)[0][outside].abs().sum() == 0


def test_phase_loss_backpropagates_through_what_made_its_inputs():
    forgotten, has, items, local, global_ = _unlearning_case(3, 0.3)
    base = global_.detach().clone().requires_grad_(True)
    expected = contrastive_unlearning_loss(local[items], (2.0 * base)[items],
                                           forgotten[:, items], has[items], 0.5)
    got = ContrastiveUnlearningLoss(forgotten, has, items, 0.5)(local, 2.0 * base)
    _close(torch.autograd.grad(got, base)[0], torch.autograd.grad(expected, base)[0])
