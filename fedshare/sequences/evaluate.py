"""Next-item evaluation (CAU paper Sec. 5.1.2; spec "Metrics"): every prefix -> next item.

- Full ranking over all n items; only the pad is excluded. Items already in the prefix stay
  candidates: the spec says "full ranking, pad excluded", and the loaders keep one interaction per
  (user, item), so a target never occurs in its own prefix and exclusion could only flatter.
- Rank = number of items scoring strictly higher than the target (ties favour the target, which
  matters only for degenerate constant scores).
- Recall@k = 1 if rank < k (one relevant item); NDCG@k = 1 / log2(rank + 2) if rank < k.
- Averaged over prediction points (every (prefix, next item) pair of the sessions), not per
  session first: a long session weighs more, as in the paper's per-sample protocol.
  :func:`metric_sums` returns sums and the count so devices can report partial sums.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedshare.sequences.data import PAD
from fedshare.sequences.models import SequenceModel

KS = (10, 20)


def ranks(model: SequenceModel, windows: Tensor) -> Tensor:
    """0-based full-ranking rank of each next item given its prefix, over all prediction points."""
    inputs, targets = windows[:, :-1], windows[:, 1:]
    predict = (inputs != PAD) & (targets != PAD)
    logits = model.scores(model(inputs)[predict])
    target = targets[predict]
    target_score = logits.gather(1, target.unsqueeze(1))
    return (logits > target_score).sum(1)


def metric_sums(model: SequenceModel, windows: Tensor, ks: tuple[int, ...] = KS,
                batch_size: int = 256) -> tuple[dict[str, float], int]:
    """Sums of Recall@k and NDCG@k over the prediction points of ``windows``, and their count."""
    was_training = model.training
    model.eval()
    sums = {f"{m}@{k}": 0.0 for k in ks for m in ("recall", "ndcg")}
    count = 0
    with torch.no_grad():
        for start in range(0, len(windows), batch_size):
            rank = ranks(model, windows[start:start + batch_size]).double()
            count += len(rank)
            for k in ks:
                hit = rank < k
                sums[f"recall@{k}"] += float(hit.sum())
                sums[f"ndcg@{k}"] += float((hit / torch.log2(rank + 2)).sum())
    model.train(was_training)
    return sums, count


def evaluate(model: SequenceModel, windows: Tensor, ks: tuple[int, ...] = KS,
             batch_size: int = 256) -> dict[str, float]:
    """Recall@k and NDCG@k averaged over every prediction point of ``windows``."""
    sums, count = metric_sums(model, windows, ks, batch_size)
    return {name: value / max(count, 1) for name, value in sums.items()}
