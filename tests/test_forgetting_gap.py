"""The forgetting-gap study runs end to end on a tiny dataset and measures itself against
Retrain consistently (Retrain is never above Retrain; the counts cover the users)."""

from __future__ import annotations

from synthetic import tiny_prepared

from simulations.forgetting_gap import DIAGNOSTICS, gap_table


def test_the_gap_study_runs_and_is_consistent(tmp_path):
    folder = tiny_prepared(num_users=30, num_items=60, unshare_user_fraction=0.5).save(
        tmp_path / "tiny")
    frame = gap_table(0, [f"prepared={folder}", "rounds=3", "dim=8", "server-steps=1",
                          "local-epochs=1"], 2).set_index("method")
    assert list(frame.index) == ["no-unlearning", "fedshare", "fru", "cufru", "retrain",
                                 *DIAGNOSTICS]
    users = frame.attrs["users"]
    assert users > 0 and frame.loc["retrain", "users_above_retrain"] == 0
    assert frame.loc["fru", "users_above_fru"] == 0
    assert frame["users_above_retrain"].between(0, users).all()
    assert frame["canary_exposure"].between(0, 1).all()
