"""Hit_u of the forget samples (spec "Metrics"), computable by the devices that hold them.

The server never holds the forget samples, so each requesting device scores its own and reports
one hit indicator per sample and metric (:func:`forget_hits`); the server averages them, which is
the union's Hit_u. For that to equal the in-process score
(:func:`fedshare.sequences.unlearning_methods.score`), a sample's 500 sampled negatives must not
depend on which other samples exist: :func:`request_negatives` seeds each sample's draw by
(seed, session, position) alone, and both sides call it.
"""

from __future__ import annotations

import numpy as np

from fedshare.sequences.cau_devices import cau_view
from fedshare.sequences.data import SequenceData
from fedshare.sequences.models import SequenceModel
from fedshare.unlearning.cau.metrics import forget_scores, full_hits, sampled_hits, u_score
from fedshare.unlearning.cau.model import ForgetSet

NEGATIVES = 500
KS = (1, 5)
HIT_METRICS = tuple(f"hit_u{kind}@{k}" for kind in ("", "_full") for k in KS)
"""Sampled (500 negatives) and full-ranking Hit_u@1 and @5, lower is better."""


def request_negatives(data: SequenceData, requests: dict[int, list[int]], seed: int,
                      n_neg: int = NEGATIVES) -> list[np.ndarray]:
    """Per forget sample, in :func:`fedshare.sequences.requests.forget_set`'s order (sessions
    ascending, positions ascending): ``n_neg`` distinct items outside its session, drawn by a
    generator seeded with (seed, session, position)."""
    out = []
    for session in sorted(requests):
        items = data.session(session)
        pool = np.setdiff1d(np.arange(1, data.num_items + 1), items)
        for position in sorted(set(requests[session])):
            rng = np.random.default_rng([seed, 0x417, session, position])
            out.append(rng.choice(pool, size=min(n_neg, pool.size), replace=False))
    return out


def forget_hits(model: SequenceModel, forget: ForgetSet, negatives: list[np.ndarray]
                ) -> dict[str, np.ndarray]:
    """Per sample and metric of :data:`HIT_METRICS`, 1 on a hit (eval mode, no dropout)."""
    scores = forget_scores(cau_view(model), forget.prefixes)
    f = forget.forget.numpy()
    hits = {f"hit_u@{k}": sampled_hits(scores, f, negatives, k) for k in KS}
    return hits | {f"hit_u_full@{k}": full_hits(scores, f, k) for k in KS}


def mean_hits(hits: dict[str, np.ndarray]) -> dict[str, float]:
    """Hit_u per metric over every sample reported."""
    return {name: float(v.mean()) if len(v) else 0.0 for name, v in hits.items()}


def with_u_score(metrics: dict[str, float]) -> dict[str, float]:
    """``metrics`` plus the U-score (Eq. 14, beta 3) from Recall@10 and sampled Hit_u@1."""
    return {**metrics, "u_score": u_score(metrics["recall@10"], metrics["hit_u@1"])}
