"""Which data plans a table's settings were chosen on, and which plans it reports on.

A result should be reported on plans (split and plan seeds) other than those its settings were
tuned on. Without a ``chosen.json`` of ``fedshare tune-unlearning`` (:mod:`simulations.tuning`),
this records where the current defaults came from, as they are:
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

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedshare.data.interactions import Interactions
from fedshare.data.prepared import PreparedData, prepare
from fedshare.data.sharing import SharingConfig, make_plan
from fedshare.data.split import split_by_parts, split_parts
from fedshare.errors import FedShareError

DEFAULT_PLAN = {"dataset": "ml-100k", "split_seed": 0, "plan_seed": 0,
                "groups": [0.1, 0.2, 0.7], "gamma": 0.3}
TUNING_PLANS: dict[str, list[dict]] = {"fedshare": [DEFAULT_PLAN], "fru": [], "cufru": []}
LEARNING_PLANS: list[dict] = [DEFAULT_PLAN]
"""Where the learning phase's settings (``simulations/configs/fedshare.toml``) were chosen: a
table run with a ``chosen.json`` names them as ``tuning_plans["learning"]``."""


def parse_plans(text: str) -> list[tuple[int, int]]:
    """``"2:2,3:3"`` -> ``[(2, 2), (3, 3)]``: (split seed, plan seed) pairs, no repeats."""
    plans = []
    for part in text.split(","):
        split, sep, plan = part.strip().partition(":")
        try:
            pair = (int(split), int(plan))
        except ValueError:
            raise FedShareError(f"a plan is SPLIT_SEED:PLAN_SEED, got {part.strip()!r}") from None
        if not sep or min(pair) < 0:
            raise FedShareError(f"a plan is SPLIT_SEED:PLAN_SEED (>= 0), got {part.strip()!r}")
        plans.append(pair)
    if len(set(plans)) != len(plans):
        raise FedShareError(f"a plan is named twice in {text!r}")
    return plans


def label(plan: Mapping[str, Any]) -> str:
    """``split:plan`` seeds of a plan record."""
    return f"{plan['split_seed']}:{plan['plan_seed']}"


def fresh_plan(run: Mapping[str, Any], split_seed: int, plan_seed: int,
               groups: Sequence[float] | None = None, gamma: float | None = None
               ) -> PreparedData:
    """The run config's dataset, split with ``split_seed`` and planned with ``plan_seed``, in
    memory. ``groups`` / ``gamma``: the plan's user ratio and unsharing fraction (default: those
    of the run's data: the paper's 1:2:7 and 0.3 for a named dataset, the folder's own for a
    ``prepared`` one).

    A ``prepared`` folder is re-split: its interactions (all three parts, ordered by user,
    item, timestamp) are split again with ``split_seed`` and its split fractions, so a fresh
    plan of a folder differs from ``prepare(dataset, split_seed=...)`` of the same dataset (the
    fingerprint of :func:`plan_of` tells them apart).
    """
    if run.get("prepared"):
        base = PreparedData.load(str(run["prepared"]))
        old = base.plan.config
        sharing = SharingConfig(tuple(groups) if groups is not None else old.group_fractions,
                                old.partial_share_fraction,
                                old.unshare_user_fraction if gamma is None else gamma,
                                old.unshare_item_fraction, plan_seed)
        parts = [base.split.train, base.split.valid, base.split.test]
        frame = np.concatenate([np.stack([p.users, p.items, p.frame["timestamp"].to_numpy()])
                                for p in parts], axis=1)
        frame = frame[:, np.lexsort(frame[::-1])]
        whole = Interactions.from_arrays(frame[0], frame[1], base.num_users, base.num_items,
                                         frame[2])
        split = split_by_parts(whole, split_parts(whole, base.split_fractions, split_seed))
        return PreparedData(base.dataset, split, make_plan(split.train, sharing), split_seed,
                            base.split_fractions)
    default = SharingConfig()
    sharing = SharingConfig(tuple(groups) if groups is not None else default.group_fractions,
                            unshare_user_fraction=default.unshare_user_fraction
                            if gamma is None else gamma, seed=plan_seed)
    path = run.get("data-path")
    return prepare(str(run.get("dataset") or "ml-100k"), str(path) if path else None,
                   split_seed=split_seed, sharing=sharing)


def seed_clash(reported: Mapping[str, Any], tuning: Sequence[Mapping[str, Any]]) -> str | None:
    """Why ``reported`` is not disjoint from the ``tuning`` plans (None when it is): on the same
    dataset, a shared split seed means the same split (the tuning saw its users' data), a
    shared plan seed the same draw of sharing groups and unsharing users."""
    for plan in tuning:
        if plan.get("dataset") != reported["dataset"]:
            continue
        for key, what in (("split_seed", "split"), ("plan_seed", "plan")):
            if plan.get(key) == reported[key]:
                return (f"reported plan {label(reported)} shares its {what} seed with tuning "
                        f"plan {label(plan)} on {reported['dataset']}")
    return None


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
