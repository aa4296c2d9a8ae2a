"""One row of the unlearning table: utility, forgetting and cost of an unlearned model."""

from __future__ import annotations

import numpy as np

from fedshare.data.interactions import Interactions
from fedshare.data.prepared import PreparedData
from fedshare.metrics import Scorer
from fedshare.unlearning.effect import (
    agreement,
    canary_exposure,
    forgotten_recall,
    membership_auc,
)
from fedshare.unlearning.phase import UnlearningOutcome
from fedshare.unlearning.remaining import remaining_data


def outcome_scorer(outcome: UnlearningOutcome) -> Scorer:
    federation = outcome.federation
    return federation.population.scorer(federation.server.table)


def unlearning_row(outcome: UnlearningOutcome, data: PreparedData,
                   canaries: Interactions | None, retrain: UnlearningOutcome | None) -> dict:
    """Metrics of one method on ``data`` (the learned data, requests and canaries included).

    Forgetting is measured over the unsharing users who still hold training data afterwards
    (the users a method can affect), and separately, with the suffix ``_no_data``, over those
    who unshared everything: their ranking vector no longer depends on any training data, so
    they are cold-start users afterwards and would dilute the first group's figures.
    ``users_with_data`` and ``users_no_data`` count the two groups.
    """
    scorer = outcome_scorer(outcome)
    remaining = remaining_data(data).split.train
    train = data.split.train
    forgotten = train.subset(data.plan.unlearn)
    if canaries is not None and len(canaries):
        is_canary = np.isin(forgotten.users * data.num_items + forgotten.items,
                            canaries.users * data.num_items + canaries.items)
        forgotten = forgotten.subset(~is_canary)
    test = outcome.federation.evaluate("test")
    valid = outcome.federation.evaluate("valid")
    row = {"method": outcome.method, "valid_hr@20": valid["hr@20"],
           "valid_ndcg@20": valid["ndcg@20"], "test_hr@20": test["hr@20"],
           "test_ndcg@20": test["ndcg@20"], "seconds": outcome.seconds,
           "kept_bytes": outcome.kept_bytes, "client_bytes": outcome.client_bytes,
           "server_bytes": outcome.server_bytes, **outcome.traffic.to_dict()}
    unsharing = np.unique(train.users[data.plan.unlearn])
    holding = np.bincount(remaining.users, minlength=data.num_users)[unsharing] > 0
    groups = {"": unsharing[holding], "_no_data": unsharing[~holding]}
    row |= {"users_with_data": int(holding.sum()), "users_no_data": int((~holding).sum())}
    for suffix, users in groups.items():
        metrics = _forgetting(scorer, forgotten, canaries, remaining, data, users,
                              outcome_scorer(retrain) if retrain is not None else None)
        row |= {f"{name}{suffix}": value for name, value in metrics.items()}
    return row


def _forgetting(scorer: Scorer, forgotten: Interactions, canaries: Interactions | None,
                remaining: Interactions, data: PreparedData, users: np.ndarray,
                reference: Scorer | None) -> dict[str, float]:
    """The forgetting metrics over ``users`` (NaN for a group without users)."""
    mine = forgotten.subset(np.isin(forgotten.users, users))
    names = ["forgotten_hr@20", "forgotten_recall@20", "mia_auc"]
    if reference is not None:
        names += ["top20_jaccard", "spearman"]
    if canaries is not None and len(canaries):
        names += ["canary_exposure", "canary_auc"]
    if len(mine) == 0:
        return dict.fromkeys(names, float("nan"))
    metrics = {**forgotten_recall(scorer, mine, remaining),
               "mia_auc": membership_auc(scorer, mine, data.split.test)}
    if reference is not None:
        metrics |= agreement(scorer, reference, np.unique(mine.users), remaining)
    if canaries is not None and len(canaries):
        known = data.split.train.concat(data.split.valid).concat(data.split.test)
        theirs = canaries.subset(np.isin(canaries.users, users))
        metrics |= canary_exposure(scorer, theirs, remaining, known) if len(theirs) else \
            {"canary_exposure": float("nan"), "canary_auc": float("nan")}
    return metrics
