"""``fedshare tune-learning``: the same budget per method, validation only, disjoint plans."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from synthetic import tiny_prepared

from fedshare.errors import FedShareError
from simulations.cli import main
from simulations.tune_learning import candidates, load_chosen, load_grids, select


def test_tune_learning_chooses_on_validation_and_feeds_the_table(tmp_path, capsys):
    folder = tiny_prepared(num_users=30, num_items=60).save(tmp_path / "tiny")
    grids = tmp_path / "grids.toml"
    grids.write_text("[fedshare]\nlambda1 = [0.5, 0.1, 0.3]\n[wo-cl]\ntau = [0.5, 0.2]\n")
    argv = ["tune-learning", "--grids", str(grids), "--budget", "2", "--plans", "7:7",
            "--set", f"prepared={folder}", "--set", "rounds=2", "--set", "dim=8",
            "--out", str(tmp_path / "runs")]
    assert main(argv) == 0
    saved = next((tmp_path / "runs").glob("tune-learning-*"))
    frame = pd.read_csv(saved / "tuning.csv")
    assert frame.groupby("method").size().to_dict() == {"fedshare": 2, "wo-cl": 2}  # budget
    record = json.loads((saved / "chosen.json").read_text())
    for method, entry in record["methods"].items():
        rows = frame[frame["method"] == method]
        best = rows.loc[rows["valid_ndcg@20"].idxmax(), "settings"]
        assert json.loads(best) == entry["settings"]  # the best validation score wins
    assert [p["split_seed"] for p in record["tuning_plans"]] == [7]
    sets = load_chosen(saved / "chosen.json")
    assert set(sets) == {"fedshare", "wo-cl"} and all(s and "=" in s[0] for s in sets.values())


def test_select_breaks_ties_to_the_earlier_entry():
    frame = pd.DataFrame({"method": ["m"] * 4, "candidate": [0, 1, 0, 1],
                          "valid_ndcg@20": [0.2, 0.1, 0.1, 0.2]})
    assert select(frame)["m"]["candidate"] == 0


def test_bad_grids_and_budgets_are_refused(tmp_path):
    grids = tmp_path / "g.toml"
    grids.write_text("[no-such-config]\nlambda1 = [0.5]\n")
    with pytest.raises(FedShareError):
        load_grids(grids)
    grids.write_text("[fedshare]\nlambda1 = [0.5]\n")
    with pytest.raises(FedShareError):
        candidates(load_grids(grids), budget=2)  # shorter than the budget
    grids.write_text("[fedshare]\nno-such-key = [1, 2]\n")
    with pytest.raises(FedShareError):
        candidates(load_grids(grids), budget=2)
    with pytest.raises(FedShareError):
        load_chosen(tmp_path / "missing.json")


def test_the_default_grids_give_every_method_the_same_budget():
    grids = load_grids()
    assert {len(v) for v in candidates(grids).values()} == {6}


def test_the_reported_plan_is_refused(capsys, tmp_path):
    assert main(["tune-learning", "--plans", "0:0", "--out", str(tmp_path / "x")]) == 2
    assert "reported plan" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
