"""Full-ranking top-K metrics (Sec. V-C), vectorised and chunked over users.

Every item is ranked for every user (no sampled candidates), the user's training items (and, when
scoring test, validation items) are excluded, and the held-out items are the relevant ones:

- HR@K: 1 if at least one held-out item is in the top K;
- Recall@K: held-out items in the top K / number of held-out items;
- NDCG@K: DCG of the top K over the ideal DCG of ``min(K, #held-out)`` hits (RecBole's form).

Scores are averaged over users with at least one held-out item. :func:`topk_sums` returns the
per-metric sums and user count so that federated clients can report partial sums to be averaged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from fedshare.data.interactions import Interactions

Scorer = Callable[[Tensor], Tensor]  # user ids [B] -> scores [B, num_items]


def interaction_mask(users: Tensor, data: Sequence[Interactions], num_items: int) -> Tensor:
    """Dense boolean ``[B, num_items]`` marking the items of ``users`` in any of ``data``."""
    mask = torch.zeros(len(users), num_items, dtype=torch.bool)
    pos = torch.full((int(users.max()) + 1 if len(users) else 0,), -1, dtype=torch.long)
    pos[users] = torch.arange(len(users))
    for part in data:
        u = torch.from_numpy(part.users)
        keep = u < len(pos)
        u, i = u[keep], torch.from_numpy(part.items)[keep]
        row = pos[u]
        mask[row[row >= 0], i[row >= 0]] = True
    return mask


def topk_metrics(scores: Tensor, relevant: Tensor, exclude: Tensor, k: int) -> dict[str, Tensor]:
    """Per-user HR / Recall / NDCG at ``k`` for one chunk.

    Args:
        scores: ``[B, I]`` model scores.
        relevant: ``[B, I]`` boolean, the held-out items.
        exclude: ``[B, I]`` boolean, items never recommended (training items).
    """
    scores = scores.masked_fill(exclude, float("-inf"))
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    hits = relevant.gather(1, top).float()
    n_rel = relevant.sum(1).float()
    discount = 1.0 / torch.log2(torch.arange(2, top.shape[1] + 2, dtype=torch.float32))
    dcg = (hits * discount).sum(1)
    ideal = torch.cumsum(discount, 0)[(n_rel.clamp(max=top.shape[1]) - 1).clamp(min=0).long()]
    return {"hr": (hits.sum(1) > 0).float(), "recall": hits.sum(1) / n_rel.clamp(min=1),
            "ndcg": dcg / ideal}


def topk_sums(scorer: Scorer, heldout: Interactions, exclude: Sequence[Interactions],
              ks: Sequence[int] = (20,), users: np.ndarray | None = None,
              chunk_size: int = 1024) -> tuple[dict[str, float], int]:
    """Sums of ``{hr,recall,ndcg}@k`` over users with held-out items, and their count.

    Args:
        scorer: maps a tensor of user ids to their scores over all items.
        heldout: the relevant items (validation or test).
        exclude: interactions whose items are masked out (training; validation for test).
        users: restrict to these users (default: every user with a held-out item).
    """
    counts = heldout.user_degrees()
    candidates = np.flatnonzero(counts > 0)
    if users is not None:
        candidates = np.intersect1d(candidates, np.asarray(users))
    sums = {f"{m}@{k}": 0.0 for k in ks for m in ("hr", "recall", "ndcg")}
    with torch.no_grad():
        for start in range(0, len(candidates), chunk_size):
            chunk = torch.from_numpy(candidates[start:start + chunk_size])
            scores = scorer(chunk)
            relevant = interaction_mask(chunk, [heldout], heldout.num_items)
            masked = interaction_mask(chunk, exclude, heldout.num_items)
            for k in ks:
                for name, values in topk_metrics(scores, relevant, masked, k).items():
                    sums[f"{name}@{k}"] += float(values.sum())
    return sums, len(candidates)


def evaluate_topk(scorer: Scorer, heldout: Interactions, exclude: Sequence[Interactions],
                  ks: Sequence[int] = (20,), users: np.ndarray | None = None,
                  chunk_size: int = 1024) -> dict[str, float]:
    """Mean ``{hr,recall,ndcg}@k`` over users with held-out items (see module docstring)."""
    sums, n = topk_sums(scorer, heldout, exclude, ks, users, chunk_size)
    return {name: value / max(n, 1) for name, value in sums.items()}


def embedding_scorer(user_vectors: Tensor, item_vectors: Tensor, cosine: bool = False) -> Scorer:
    """Scores as dot products (or cosines) of user and item vectors."""
    if cosine:
        user_vectors = torch.nn.functional.normalize(user_vectors, dim=-1)
        item_vectors = torch.nn.functional.normalize(item_vectors, dim=-1)
    return lambda users: user_vectors[users] @ item_vectors.T
