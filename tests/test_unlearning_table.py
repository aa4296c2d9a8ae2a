"""The unlearning table end to end on a tiny dataset: every method's row, forgetting split by
whether the unsharing users still hold data, and the folder it writes (leased while written)."""

from __future__ import annotations

import json

import pandas as pd
from synthetic import tiny_prepared

from fedshare.run_lease import ensure_free
from fedshare.unlearning.config import UnlearningConfig
from fedshare.unlearning.phase import METHODS
from simulations.plans import TUNING_PLANS, plan_of, plan_record
from simulations.unlearning_table import unlearning_table


def test_the_unlearning_table_reports_both_user_groups(tmp_path):
    folder = tiny_prepared(num_users=30, num_items=60, unshare_user_fraction=0.5).save(
        tmp_path / "tiny")
    out, stats, figures = unlearning_table(
        (0,), [f"prepared={folder}", "rounds=2", "dim=8", "server-steps=1", "local-epochs=1"],
        UnlearningConfig(rounds=1, steps=1), canaries=2, out=tmp_path / "tables",
        progress=lambda line: None)
    ensure_free(out)  # the lease ends with the command
    frame = pd.read_csv(out / "unlearning_table.csv")
    assert sorted(frame["method"]) == sorted(METHODS) == sorted(stats.index)
    groups = frame["users_with_data"] + frame["users_no_data"]
    assert (groups == groups.iloc[0]).all() and (frame["users_with_data"] > 0).all()
    table = (out / "unlearning_table.md").read_text()
    assert "users_with_data" in table and "canary_exposure_no_data" in table
    summary = json.loads((out / "summary.json").read_text())
    assert summary["targets"] == figures and "canary_excess_removed" in figures
    assert summary["reported_plans"][0]["dataset"] == "synthetic"
    assert summary["tuning_plans"] == TUNING_PLANS and not summary["reported_on_a_tuning_plan"]


def test_a_table_says_when_it_reports_on_a_plan_its_settings_were_tuned_on():
    data = tiny_prepared()
    plan = {k: v for k, v in plan_of(data).items() if k != "fingerprint"}
    assert plan == {"dataset": "synthetic", "split_seed": 0, "plan_seed": 0,
                    "groups": [0.25, 0.25, 0.5], "gamma": 0.3}
    assert plan_record([data], {"fedshare": [plan]})["reported_on_a_tuning_plan"]
    assert not plan_record([data], {"fedshare": [{**plan, "plan_seed": 1}]})[
        "reported_on_a_tuning_plan"]
