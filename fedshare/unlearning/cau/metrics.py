"""Unlearning metrics: Hit_u@K of the forgotten items and the U-score (Eq. 14).

Hit_u@K (paper Sec. 5.1.2, after [46]; lower is better): for each forget sample, score the items
after the prefix before the forgotten item and count a hit when f ranks in the top K.
Two candidate sets (spec "Metrics"): f plus 500 random items not in the session (drawn without
replacement, seeded; all of them if fewer remain), or every item (full ranking, pad excluded).
Rank = number of candidates scoring strictly higher than f: ties count in f's favour, i.e. as
still remembered, the conservative side for an unlearning claim.
U_beta = (1 + beta^2) R (1 - H) / (beta^2 R + (1 - H)), R = Recall@10, H = Hit_u@1, beta = 3.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import Tensor

from fedshare.unlearning.cau.model import CAUModel


def _as_np(scores: Tensor | np.ndarray) -> np.ndarray:
    return scores.detach().cpu().numpy() if isinstance(scores, Tensor) else np.asarray(scores)


def full_hits(scores: Tensor | np.ndarray, forget: Sequence[int] | np.ndarray, k: int
              ) -> np.ndarray:
    """Per sample, 1 if f ranks in the top ``k`` of every item (``scores [N, n_items + 1]``,
    column = item id; column 0, the pad, is excluded), else 0: what a device reports."""
    s = _as_np(scores)[:, 1:].astype(np.float64)
    f = np.asarray(forget, dtype=np.int64) - 1
    own = s[np.arange(s.shape[0]), f]
    return ((s > own[:, None]).sum(axis=1) < k).astype(np.int64)


def hit_u_full(scores: Tensor | np.ndarray, forget: Sequence[int] | np.ndarray, k: int) -> float:
    """Full-ranking Hit_u@k: the mean of :func:`full_hits`."""
    hits = full_hits(scores, forget, k)
    return float(hits.mean()) if len(hits) else 0.0


def sample_negatives(
    n_items: int,
    sessions: Sequence[Sequence[int]],
    n_neg: int,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Per sample, ``n_neg`` distinct item ids in 1..n_items not in that sample's session."""
    out = []
    for sess in sessions:
        pool = np.setdiff1d(np.arange(1, n_items + 1), np.asarray(list(sess), dtype=np.int64))
        out.append(rng.choice(pool, size=min(n_neg, pool.size), replace=False))
    return out


def sampled_hits(
    scores: Tensor | np.ndarray,
    forget: Sequence[int] | np.ndarray,
    negatives: Sequence[np.ndarray],
    k: int,
) -> np.ndarray:
    """Per sample, 1 if f ranks in the top ``k`` among f plus its sample's negatives."""
    s = _as_np(scores).astype(np.float64)
    return np.array(
        [
            int((s[i, neg] > s[i, int(f)]).sum() < k)
            for i, (f, neg) in enumerate(zip(np.asarray(forget), negatives, strict=True))
        ],
        dtype=np.int64,
    )


def hit_u_sampled(
    scores: Tensor | np.ndarray,
    forget: Sequence[int] | np.ndarray,
    negatives: Sequence[np.ndarray],
    k: int,
) -> float:
    """Sampled Hit_u@k: the mean of :func:`sampled_hits`."""
    hits = sampled_hits(scores, forget, negatives, k)
    return float(hits.mean()) if len(hits) else 0.0


def u_score(recall: float, hit_u: float, beta: float = 3.0) -> float:
    """Eq. 14 (0 when both terms are 0)."""
    keep = 1.0 - hit_u
    den = beta**2 * recall + keep
    return 0.0 if den <= 0 else (1.0 + beta**2) * recall * keep / den


def forget_scores(model: CAUModel, prefixes: Tensor, batch_size: int = 1024) -> Tensor:
    """Eval-mode last-position logits ``[N, n_items + 1]`` for the metrics above."""
    return model.eval_logits(prefixes, batch_size)
