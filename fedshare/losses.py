"""Losses of the learning phase, as plain functions of embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def bpr_loss(pos_scores: Tensor, neg_scores: Tensor) -> Tensor:
    """BPR (Eq. 15 without its L2 term): ``-ln sigma(s_ui - s_uj)`` per pair, unreduced.

    With cosine scores this is the paper's cosine BPR; with dot products, standard BPR.
    """
    return -F.logsigmoid(pos_scores - neg_scores)


def info_nce(local: Tensor, global_: Tensor, tau: float) -> Tensor:
    """InfoNCE between two views (Eq. 17), in-batch negatives, mean over the batch.

    Row ``i`` of ``local`` is pulled towards row ``i`` of ``global_`` and pushed from the other
    rows: ``-log exp(cos(l_i, g_i)/tau) / sum_j exp(cos(l_i, g_j)/tau)``.
    """
    # 1/tau scales the n x d view rather than the n x n logits (and their gradient)
    logits = (F.normalize(local, dim=-1) / tau) @ F.normalize(global_, dim=-1).T
    return F.cross_entropy(logits, torch.arange(len(local), device=local.device))


def sampled_rows_l2(table: Tensor, *rows: Tensor) -> Tensor:
    """``sum_k ||table[r_k]||^2`` over every index ``r_k`` in ``rows`` (repeats count): the L2
    term of a sampled batch (Eq. 15, Eq. 18) as a count-weighted sum over the table, which
    spares a gather per index set and the scatter-add of its backward (same value)."""
    counts = torch.bincount(torch.cat(rows), minlength=len(table)).to(table.dtype)
    return counts @ table.pow(2).sum(1)


def l2_penalty(*tensors: Tensor) -> Tensor:
    """Sum of squared L2 norms, the ``lambda ||Theta||^2`` term of Eq. 15 and Eq. 18."""
    return sum(t.pow(2).sum() for t in tensors)
