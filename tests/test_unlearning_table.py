"""The unlearning table end to end on a tiny dataset: every method's row, forgetting split by
whether the unsharing users still hold data, and the folder it writes (leased while written)."""

from __future__ import annotations

import json

import pandas as pd
from synthetic import tiny_prepared

from fedshare.run_lease import ensure_free
from fedshare.unlearning.config import UnlearningConfig
from fedshare.unlearning.phase import METHODS
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
