"""Attacks on what the server receives: each scores every item for one target user, higher =
"more likely one of the user's local interactions".

Single-observation attacks read one reply or one secure sum (``delta`` ``[I, d]``,
``row_weight`` ``[I]``):

- ``touched``: the row was uploaded with non-zero weight (the issue's first finding);
- ``row-weight``: the per-row weight itself (in a sum, how much weight touched the row);
- ``delta-norm``: how far the row moved;
- ``projection``: the rows' deltas projected on their main direction (one SVD of the uploaded
  rows); the side holding the more popular items is called positive, since a user's
  positives are on average more popular than uniform negatives;
- ``learned``: logistic regression on the features above plus popularity, trained on replies
  the server simulates itself from its own shared users' data with the public client code
  (:mod:`fedshare.privacy.audit`).

``disaggregation`` attacks a run of secure sums when the server knows who took part in each
round: a row's mean over the rounds the target trained in minus its mean over the others
isolates the target's (consistent) contribution: its local rows are in every one of its
uploads. When participation is ``hidden`` the server has only the sums; ``correlation`` then
looks for the target's rows through each round's total weight (which rises by the target's
|D_u| in the rounds it trains): the covariance over rounds of the total weight with a row's
weight, and with the norm of the row's delta.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

SINGLE = ("touched", "row-weight", "delta-norm", "projection")


def projection(delta: Tensor, row_weight: Tensor, popularity: np.ndarray) -> Tensor:
    """Rows' deltas on the main direction of the uploaded rows, oriented so the more popular
    side is positive."""
    rows = torch.nonzero(row_weight > 0).flatten()
    if len(rows) < 2:
        return torch.zeros(len(delta))
    _, _, vt = torch.linalg.svd(delta[rows].double(), full_matrices=False)
    score = (delta.double() @ vt[0]).float()
    pop = torch.from_numpy(np.asarray(popularity, np.float64))
    side = score[rows] > 0
    up = pop[rows][side].mean() if side.any() else torch.tensor(0.0)
    down = pop[rows][~side].mean() if (~side).any() else torch.tensor(0.0)
    return score if up >= down else -score


def single_scores(delta: Tensor, row_weight: Tensor, popularity: np.ndarray
                  ) -> dict[str, Tensor]:
    """Every single-observation attack's item scores."""
    return {"touched": (row_weight > 0).float(), "row-weight": row_weight.float(),
            "delta-norm": delta.norm(dim=1), "projection": projection(delta, row_weight,
                                                                      popularity)}


def features(delta: Tensor, row_weight: Tensor, popularity_rank: np.ndarray,
             popularity: np.ndarray) -> Tensor:
    """Per-item features of the learned attack, scale-free within one observation."""
    scores = single_scores(delta, row_weight, popularity)
    norm, proj, weight = scores["delta-norm"], scores["projection"], scores["row-weight"]

    def scaled(x: Tensor) -> Tensor:
        top = x.abs().max()
        return x / top if top > 0 else x

    return torch.stack([scores["touched"], scaled(weight), scaled(norm), scaled(proj),
                        scaled(proj).abs(), torch.from_numpy(np.asarray(popularity_rank,
                                                                        np.float32))], 1)


class LearnedAttack:
    """Logistic regression from :func:`features` to "local item" (fit by full-batch L-BFGS)."""

    def __init__(self, x: Tensor, y: Tensor, steps: int = 200) -> None:
        self.mean, self.std = x.mean(0), x.std(0).clamp(min=1e-6)
        self.w = torch.zeros(x.shape[1], requires_grad=True)
        self.b = torch.zeros(1, requires_grad=True)
        optimizer = torch.optim.LBFGS([self.w, self.b], max_iter=steps)
        z = (x - self.mean) / self.std

        def closure() -> Tensor:
            optimizer.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ self.w + self.b,
                                                                        y.float())
            loss = loss + 1e-4 * (self.w**2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)

    def __call__(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return ((x - self.mean) / self.std) @ self.w + self.b


def disaggregation(row_weights: Tensor, deltas: Tensor, took_part: np.ndarray
                   ) -> dict[str, Tensor]:
    """Differences of round sums with and without the target (``took_part[r]``): on the
    row weights, and the norm of the difference of the deltas. ``[R, I]``, ``[R, I, d]``."""
    mask = torch.from_numpy(np.asarray(took_part, bool))
    if mask.all() or not mask.any():
        zero = torch.zeros(row_weights.shape[1])
        return {"disaggregation-weight": zero, "disaggregation-delta": zero}
    weight = row_weights[mask].mean(0) - row_weights[~mask].mean(0)
    delta = (deltas[mask].mean(0) - deltas[~mask].mean(0)).norm(dim=1)
    return {"disaggregation-weight": weight, "disaggregation-delta": delta}


def correlation(row_weights: Tensor, deltas: Tensor, totals: Tensor) -> dict[str, Tensor]:
    """Covariance over rounds of each round's total weight ``[R]`` with every row's weight
    ``[R, I]`` and delta norm (from ``[R, I, d]``): the multi-round attack without knowing
    who took part."""
    total = (totals - totals.mean()).double()

    def cov(values: Tensor) -> Tensor:
        centred = values.double() - values.double().mean(0)
        return (total[:, None] * centred).mean(0).float()

    return {"correlation-weight": cov(row_weights),
            "correlation-delta": cov(deltas.norm(dim=2))}
