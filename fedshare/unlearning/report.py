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
    """Metrics of one method on ``data`` (the learned data, requests and canaries included)."""
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
           "server_bytes": outcome.server_bytes,
           **forgotten_recall(scorer, forgotten, remaining),
           "mia_auc": membership_auc(scorer, forgotten, data.split.test)}
    users = np.unique(forgotten.users)
    if retrain is not None:
        row.update(agreement(scorer, outcome_scorer(retrain), users, remaining))
    if canaries is not None and len(canaries):
        known = train.concat(data.split.valid).concat(data.split.test)
        row.update(canary_exposure(scorer, canaries, remaining, known))
    return row
