"""How well a model forgot: metrics on the users who unshared (Sec. V-E1, V-E3).

All take a ``scorer`` (user ids -> scores over every item), the way clients rank:

- forgotten-interaction HR / Recall@K: each forgotten interaction is a held-out item, the
  user's remaining training items are excluded;
- membership-inference AUC: forgotten interactions vs the same users' never-seen test items,
  separated by score (0.5 = indistinguishable);
- agreement with Retrain: mean Jaccard overlap of top-K lists and mean Spearman correlation
  of the scores over the items a user can be recommended;
- canary exposure: mean rank percentile of a user's canaries among the items outside its
  remaining training items, and the canary AUC against random never-seen items. The reference
  is Retrain's value, not 0.5: a random ranking would give 0.5, but canaries are random items,
  mostly unpopular, which a model that never saw them ranks low (Retrain: 0.30-0.36 on
  ML-100K).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from fedshare.data.interactions import Interactions
from fedshare.metrics import Scorer, interaction_mask, topk_sums
from fedshare.sampling import sample_negatives


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Probability that a random positive outscores a random negative (ties count half)."""
    if len(positive) == 0 or len(negative) == 0:
        return float("nan")
    scores = np.concatenate([positive, negative])
    order = scores.argsort(kind="stable")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    # Average ranks over ties.
    sorted_scores = scores[order]
    _, start, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    for s, c in zip(start, counts, strict=True):
        if c > 1:
            ranks[order[s:s + c]] = ranks[order[s:s + c]].mean()
    n_pos = len(positive)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * len(negative)))


def pair_scores(scorer: Scorer, pairs: Interactions) -> np.ndarray:
    """Scores of (user, item) pairs."""
    if len(pairs) == 0:
        return np.zeros(0)
    users = np.unique(pairs.users)
    position = {int(u): k for k, u in enumerate(users)}
    with torch.no_grad():
        scores = scorer(torch.from_numpy(users))
    rows = torch.tensor([position[int(u)] for u in pairs.users])
    return scores[rows, torch.from_numpy(pairs.items)].numpy()


def forgotten_recall(scorer: Scorer, forgotten: Interactions, remaining: Interactions,
                     k: int = 20) -> dict[str, float]:
    sums, n = topk_sums(scorer, forgotten, [remaining], (k,))
    return {f"forgotten_hr@{k}": sums[f"hr@{k}"] / max(n, 1),
            f"forgotten_recall@{k}": sums[f"recall@{k}"] / max(n, 1)}


def membership_auc(scorer: Scorer, forgotten: Interactions, test: Interactions) -> float:
    users = np.unique(forgotten.users)
    same_users = test.subset(np.isin(test.users, users))
    return auc(pair_scores(scorer, forgotten), pair_scores(scorer, same_users))


def _masked(scorer: Scorer, users: Tensor, remaining: Interactions) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        scores = scorer(users)
    return scores, interaction_mask(users, [remaining], scores.shape[1])


def agreement(scorer: Scorer, reference: Scorer, users: np.ndarray, remaining: Interactions,
              k: int = 20) -> dict[str, float]:
    """Top-K Jaccard overlap and Spearman correlation with a reference model (Retrain)."""
    u = torch.from_numpy(np.asarray(users, dtype=np.int64))
    a, mask = _masked(scorer, u, remaining)
    b, _ = _masked(reference, u, remaining)
    a = a.masked_fill(mask, float("-inf"))
    b = b.masked_fill(mask, float("-inf"))
    top_a, top_b = a.topk(k, dim=1).indices, b.topk(k, dim=1).indices
    jaccard, spearman = [], []
    for row in range(len(u)):
        sa, sb = set(top_a[row].tolist()), set(top_b[row].tolist())
        jaccard.append(len(sa & sb) / len(sa | sb))
        keep = ~mask[row]
        ra = a[row, keep].argsort().argsort().float()
        rb = b[row, keep].argsort().argsort().float()
        spearman.append(float(torch.corrcoef(torch.stack([ra, rb]))[0, 1]))
    return {f"top{k}_jaccard": float(np.mean(jaccard)), "spearman": float(np.mean(spearman))}


def canary_exposure(scorer: Scorer, canaries: Interactions, remaining: Interactions,
                    known: Interactions, seed: int = 0, negatives_per_user: int = 50
                    ) -> dict[str, float]:
    """Mean rank percentile of canaries and their AUC vs random unseen items (compare both
    with Retrain's: a model that never saw the canaries still ranks them below 0.5).

    Args:
        canaries: the canary interactions (already unshared).
        remaining: the remaining training interactions (excluded from the ranking).
        known: every interaction of the split (never drawn as a random unseen item).
    """
    users = np.unique(canaries.users)
    u = torch.from_numpy(users)
    scores, mask = _masked(scorer, u, remaining)
    position = {int(x): k for k, x in enumerate(users)}
    rows = torch.tensor([position[int(x)] for x in canaries.users])
    canary_scores = scores[rows, torch.from_numpy(canaries.items)]
    candidates = scores[rows].masked_fill(mask[rows], float("nan"))
    below = (candidates < canary_scores[:, None]).sum(1).float()
    total = (~mask[rows]).sum(1).float() - 1  # the canary itself is a candidate
    percentile = (below / total.clamp(min=1)).mean().item()
    excluded = np.unique(np.concatenate([known.users * known.num_items + known.items,
                                         canaries.users * canaries.num_items + canaries.items]))
    owners = np.repeat(users, negatives_per_user)
    slots = np.tile(np.arange(negatives_per_user), len(users))
    random_items = sample_negatives(owners, slots, excluded, known.num_items, seed, 0xA0D1)
    random_pairs = Interactions.from_arrays(owners, random_items, known.num_users,
                                            known.num_items)
    return {"canary_exposure": percentile,
            "canary_auc": auc(canary_scores.numpy(), pair_scores(scorer, random_pairs))}
