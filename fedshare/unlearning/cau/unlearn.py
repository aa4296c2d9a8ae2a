"""The CAU loop on one model (centralised reference; Algorithms 1-2 with Eq. 5-13).

Per step: one forward of the batch in train mode (dropout on, see ``losses`` on the zero-KL
trap), the three task gradients g_u, g_n, g_KL over all trainable parameters (Eq. 9; three
``autograd.grad`` calls on one graph), the MGDA weights from their Gram matrix (Eq. 10), and one
optimizer step along d = sum_i a_i g_i, which is the gradient of Eq. 8 with detached weights
(so no fourth backward). Adam with lr 1e-3 as in the paper (Sec. 5.1.4); SGD as a switch.

Variants: ``difficulty`` in {"gradient", "embedding"} x ``schedule`` in {"hard", "soft"} are the
four CAU variants; ``gradient_scope`` names which Eq. 11 is used ("last": the closed-form output
layer, default, cheap; "full": per-sample autograd over all parameters). Ablations:
``weights="ga"`` (w/o RL: L_u alone, pure gradient ascent), ``weights="equal"`` (w/o PS:
a = (1/3, 1/3, 1/3)), ``schedule="random"`` (w/o CU). ``normalize_grads`` feeds L2-normalised
gradients to the solver only; the update still combines the raw gradients (Eq. 8 weights raw
losses).

Hard: difficulty rescored at every epoch start (Algorithm 1, line 3). Soft: T = E * ceil(|D_f|/B)
steps, difficulty rescored every ceil(|D_f|/B) steps (Algorithm 2 rescores every step; the spec
trades that for cost). Seeded: torch (dropout) and numpy (sampling) from ``seed``; deterministic on
CPU. The model is updated in place; the frozen reference is its state on entry.

Federated use: see the package docstring; :func:`task_gradients` returns per-batch sums-ready
means so devices can upload them and a server can form the batch's Gram matrix.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from fedshare.unlearning.cau.curriculum import (
    hard_batches,
    random_batches,
    soft_batch,
    soft_probabilities,
    steps_per_epoch,
)
from fedshare.unlearning.cau.difficulty import (
    embedding_difficulty,
    gradient_difficulty,
    last_layer_gradient_difficulty,
)
from fedshare.unlearning.cau.losses import reference_log_probs, task_losses
from fedshare.unlearning.cau.mgda import DROP_TOL, combine, gram, min_norm_weights
from fedshare.unlearning.cau.model import CAUModel, ForgetSet, item_log_probs


@dataclass(frozen=True)
class CAUConfig:
    """One CAU run's settings (paper defaults: B = 128, Adam lr 1e-3, tau = 2)."""

    epochs: int = 100
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: Literal["adam", "sgd"] = "adam"
    difficulty: Literal["gradient", "embedding"] = "gradient"
    gradient_scope: Literal["last", "full"] = "last"
    schedule: Literal["hard", "soft", "random"] = "hard"
    weights: Literal["mgda", "equal", "ga"] = "mgda"
    tau: float = 2.0
    zscore: bool = False
    normalize_grads: bool = False
    drop_tol: float = DROP_TOL
    drop_rel_tol: float = 1e-6
    train_mode: bool = True
    seed: int = 0


@dataclass
class CAUResult:
    """What a run did: per step the batch, the weights (a_u, a_n, a_KL) and the losses."""

    batches: list[np.ndarray] = field(default_factory=list)
    weights: list[np.ndarray] = field(default_factory=list)
    losses: list[tuple[float, float, float]] = field(default_factory=list)
    seconds: float = 0.0


def task_gradients(
    model: CAUModel, batch: ForgetSet, ref_log_probs: Tensor, params: Sequence[nn.Parameter]
) -> tuple[Tensor, tuple[float, float, float]]:
    """Eq. 9: flattened (g_u, g_n, g_KL) ``[3, P]`` of the batch-mean losses, and the losses."""
    lp = item_log_probs(model.logits(batch.prefixes))
    losses = task_losses(lp, ref_log_probs, batch.forget, batch.retain)
    rows = []
    for i, loss in enumerate(losses):
        gs = torch.autograd.grad(loss, params, retain_graph=i < 2, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    torch.zeros(p.numel()) if g is None else g.reshape(-1)
                    for g, p in zip(gs, params, strict=True)
                ]
            )
        )
    return torch.stack(rows).detach(), (
        float(losses[0].detach()),
        float(losses[1].detach()),
        float(losses[2].detach()),
    )


def active_mask(m: np.ndarray, tol: float, rel_tol: float) -> np.ndarray:
    """Tasks kept by the solver: gradient norm >= max(tol, rel_tol * largest norm).

    The relative part exists because in float32 the KL gradient at theta = theta_ref is not
    exactly zero but rounding noise (~1e-7 of the other gradients); an absolute 1e-10 alone
    would keep it and the solver would pick it (the zero-KL trap again).
    """
    norms = np.sqrt(np.clip(np.diag(m), 0.0, None))
    return norms >= max(tol, rel_tol * float(norms.max(initial=0.0)))


def solve_weights(grads: Tensor, config: CAUConfig) -> np.ndarray:
    """The step's (a_u, a_n, a_KL): MGDA (Eq. 10), or an ablation's fixed weights."""
    if config.weights == "ga":
        return np.array([1.0, 0.0, 0.0])
    if config.weights == "equal":
        return np.full(3, 1.0 / 3.0)
    raw = gram(grads)
    active = active_mask(raw, config.drop_tol, config.drop_rel_tol)
    m = gram(grads, normalize=True) if config.normalize_grads else raw
    return min_norm_weights(m, active=active)


def score(model: CAUModel, forget: ForgetSet, ref: Tensor, config: CAUConfig) -> np.ndarray:
    """The difficulty of every forget sample under the configured metric."""
    if config.difficulty == "embedding":
        d = embedding_difficulty(model, forget)
    elif config.gradient_scope == "last":
        d = last_layer_gradient_difficulty(model, forget, ref)
    else:
        d = gradient_difficulty(model, forget, ref)
    return d.detach().cpu().numpy().astype(np.float64)


def schedule(scores: Callable[[], np.ndarray], n: int, config: CAUConfig) -> Iterator[np.ndarray]:
    """Yield each step's batch indices into D_f (``n`` samples), calling ``scores()`` for the
    current difficulties when the curriculum rescores (hard: every epoch start; soft: every
    ceil(|D_f|/B) steps; random: never). A federated server passes a ``scores`` that asks the
    devices, so it follows exactly this schedule (``fedshare.sequences.cau_devices``)."""
    b = config.batch_size
    spe = steps_per_epoch(n, b)
    total = config.epochs * spe
    rng = np.random.default_rng(config.seed)
    for epoch in range(config.epochs):
        if config.schedule == "random":
            yield from random_batches(n, b, rng)
        elif config.schedule == "hard":
            yield from hard_batches(scores(), b)
        else:
            dif = scores()
            for j in range(spe):
                p = soft_probabilities(dif, epoch * spe + j + 1, total, config.tau, config.zscore)
                yield soft_batch(p, b, rng)


def cau_unlearn(model: CAUModel, forget: ForgetSet, config: CAUConfig | None = None) -> CAUResult:
    """Unlearn ``forget`` from ``model`` in place with CAU (or an ablation); see the docstring."""
    config = config or CAUConfig()
    if len(forget) == 0:
        return CAUResult()
    torch.manual_seed(config.seed)
    params = [p for p in model.module.parameters() if p.requires_grad]
    ref = reference_log_probs(model, forget.prefixes)
    opt: torch.optim.Optimizer = (
        torch.optim.Adam(params, lr=config.lr)
        if config.optimizer == "adam"
        else torch.optim.SGD(params, lr=config.lr)
    )
    result = CAUResult()
    was_training = model.module.training
    start = time.perf_counter()
    try:
        for idx in schedule(lambda: score(model, forget, ref, config), len(forget), config):
            model.module.train(config.train_mode)
            grads, losses = task_gradients(model, forget.subset(idx), ref[idx], params)
            a = solve_weights(grads, config)
            d = combine(grads, a)
            offset = 0
            for p in params:
                p.grad = d[offset : offset + p.numel()].view_as(p).clone()
                offset += p.numel()
            opt.step()
            result.batches.append(np.asarray(idx))
            result.weights.append(a)
            result.losses.append(losses)
    finally:
        model.module.train(was_training)
    result.seconds = time.perf_counter() - start
    return result
