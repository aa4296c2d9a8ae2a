"""Which data plans a table's settings were chosen on, and which plans it reports on.

A result should be reported on plans (split and plan seeds) other than those its settings were
tuned on. Until issue 15's tuning protocol exists, this records where the current defaults came
from, as they are:
- FedShare's learning and unlearning settings were chosen on ML-100K's default plan: split
  seed 0, plan seed 0, groups 1:2:7, gamma 0.3 (README: "How the unlearning settings were
  chosen").
- FRU's and CUFRU's settings are their papers', with no search (FRU's ``FruSettings``: alpha =
  beta = 0.5 from its paper; the semi-hard pool's R = 0.1 is our choice, its paper giving no
  value we have).

Every table's ``summary.json`` names both sets of plans (``tuning_plans``,
``reported_plans``) and says whether they overlap, so a figure from a tuned plan cannot pass
for one from a fresh plan.
"""

from __future__ import annotations

from fedshare.data.prepared import PreparedData

DEFAULT_PLAN = {"dataset": "ml-100k", "split_seed": 0, "plan_seed": 0,
                "groups": [0.1, 0.2, 0.7], "gamma": 0.3}
TUNING_PLANS: dict[str, list[dict]] = {"fedshare": [DEFAULT_PLAN], "fru": [], "cufru": []}


def plan_of(data: PreparedData) -> dict:
    """The identity of ``data``'s plan: dataset, seeds, groups and gamma (and a fingerprint of
    the split, which tells two same-named datasets apart)."""
    config = data.plan.config
    return {"dataset": data.dataset, "split_seed": int(data.split_seed),
            "plan_seed": int(config.seed), "groups": [float(g) for g in config.group_fractions],
            "gamma": float(config.unshare_user_fraction), "fingerprint": data.fingerprint()}


def plan_record(reported: list[PreparedData],
                tuning: dict[str, list[dict]] | None = None) -> dict:
    """What a table's ``summary.json`` says about plans (``tuning``: :data:`TUNING_PLANS`)."""
    tuning = TUNING_PLANS if tuning is None else tuning
    plans = [plan_of(data) for data in reported]
    tuned = [p for ps in tuning.values() for p in ps]
    overlap = any(all(plan[k] == t[k] for k in t) for plan in plans for t in tuned)
    return {"tuning_plans": tuning, "reported_plans": plans, "reported_on_a_tuning_plan": overlap}
